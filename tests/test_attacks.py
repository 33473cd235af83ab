"""PGD against independent truth: closed-form FGSM on a linear model, invariants, BN frozen."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from sat_tf import activations, attacks, data
from sat_tf.config import AttackConfig, DataConfig

TOL = 1e-3  # pixels: float32 rounding of x +- eps near 255


def attack_cfg(**kw):
    base = dict(epsilon=8.0, step_size=2.0, num_steps=5, random_start=True, clean_start_prob=0.0)
    base.update(kw)
    return AttackConfig(**base)


def linear_model(seed=0, size=4, classes=3):
    rng = np.random.default_rng(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Flatten()(inp)
    out = keras.layers.Dense(classes)(x)
    model = keras.Model(inp, out)
    w = rng.normal(0, 0.01, (size * size * 3, classes)).astype(np.float32)
    b = rng.normal(0, 0.1, classes).astype(np.float32)
    model.layers[-1].set_weights([w, b])
    return model, w, b


def in_box(adv, x, eps):
    adv, x = np.asarray(adv), np.asarray(x)
    return (np.all(adv >= x - eps - TOL) and np.all(adv <= x + eps + TOL)
            and adv.min() >= 0.0 and adv.max() <= 255.0)


@pytest.fixture(scope="module")
def trained():
    """A small conv net with batch norm, trained on the synthetic task (fixed seed)."""
    keras.utils.set_random_seed(0)
    cfg = DataConfig(synthetic_image_size=16, synthetic_train_examples=512,
                     synthetic_eval_examples=256)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(2 / 255.0, offset=-1)(inp)
    x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False)(x)
    x = keras.layers.BatchNormalization(momentum=0.9)(x)
    x = activations.Activation("silu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(10)(x)
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.Adam(0.02),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    train = data.build_dataset(cfg, split="train", batch_size=64)
    model.fit(train, steps_per_epoch=40, epochs=1, verbose=0, shuffle=False)
    x, y, _ = next(iter(data.build_dataset(cfg, split="eval", batch_size=256)))
    return model, x, y


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model(x, training=False), -1) == y.numpy()))


def test_zero_epsilon_returns_input_exactly():
    model, _, _ = linear_model()
    x = tf.random.uniform([6, 4, 4, 3], 0, 255, seed=1)
    y = tf.constant([0, 1, 2, 0, 1, 2])
    for kw in (dict(), dict(mode="targeted"), dict(num_steps=0)):
        adv = attacks.pgd(model, x, y, attack_cfg(epsilon=0.0, **kw), seed=[1, 2])
        np.testing.assert_array_equal(adv.numpy(), x.numpy())


def test_fgsm_closed_form_on_linear_softmax():
    """PGD-1 without random start = x + eps * sign(W (softmax(Wx+b) - onehot(y))), clipped."""
    model, w, b = linear_model(seed=3)
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 255, (8, 4, 4, 3)).astype(np.float32)
    x[0, 0, 0] = [0.0, 255.0, 1.0]       # pixels at the range edges must be clipped
    y = rng.integers(0, 3, 8).astype(np.int32)
    logits = x.reshape(8, -1) @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (p - np.eye(3)[y]) @ w.T                                 # dCE/dx
    expected = np.clip(x + 4.0 * np.sign(grad).reshape(x.shape), 0, 255)
    cfg = AttackConfig(epsilon=4.0, step_size=4.0, num_steps=1, random_start=False,
                       clean_start_prob=0.0)
    adv = attacks.pgd(model, x, y, cfg)
    np.testing.assert_allclose(adv.numpy(), expected, atol=TOL)
    # Targeted FGSM descends the target's loss: the opposite sign, with the target's one-hot.
    t = (y + 1) % 3
    grad_t = (p - np.eye(3)[t]) @ w.T
    expected_t = np.clip(x - 4.0 * np.sign(grad_t).reshape(x.shape), 0, 255)
    adv_t = attacks.pgd(model, x, y, AttackConfig(epsilon=4.0, step_size=4.0, num_steps=1,
                                                  random_start=False, clean_start_prob=0.0,
                                                  mode="targeted"), targets=t)
    np.testing.assert_allclose(adv_t.numpy(), expected_t, atol=TOL)


@pytest.mark.parametrize("eps,step,steps,start", [(4, 1, 3, True), (8, 8, 1, True),
                                                  (16, 5, 4, False), (255, 100, 2, True)])
def test_projection_bounds(trained, eps, step, steps, start):
    model, x, y = trained
    adv = attacks.pgd(model, x, y, attack_cfg(epsilon=eps, step_size=step, num_steps=steps,
                                              random_start=start), seed=[0, eps])
    assert adv.dtype == tf.float32 and adv.shape == x.shape
    assert in_box(adv, x, eps)


def test_random_start_and_clean_start_probability():
    model, _, _ = linear_model()
    x = tf.fill([4, 4, 4, 3], 128.0)
    y = tf.zeros([4], tf.int32)
    random = attacks.pgd(model, x, y, attack_cfg(num_steps=0), seed=[5, 6])
    assert np.abs(random.numpy() - 128.0).max() > 1.0 and in_box(random, x, 8.0)
    clean = attacks.pgd(model, x, y, attack_cfg(num_steps=0, clean_start_prob=1.0), seed=[5, 6])
    np.testing.assert_array_equal(clean.numpy(), x.numpy())
    # 20 % of batches start clean: count over many seeds.
    starts = [attacks.pgd(model, x, y, attack_cfg(num_steps=0, clean_start_prob=0.2), seed=[7, i])
              for i in range(200)]
    frac = np.mean([np.array_equal(s.numpy(), x.numpy()) for s in starts])
    assert 0.1 < frac < 0.3
    # Same seed, same result.
    a = attacks.pgd(model, x, y, attack_cfg(num_steps=2), seed=[9, 9])
    b = attacks.pgd(model, x, y, attack_cfg(num_steps=2), seed=[9, 9])
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_more_steps_and_larger_epsilon_never_help_the_model(trained):
    model, x, y = trained
    clean = accuracy(model, x, y)
    assert clean > 0.6, "the fixture model must have learnt the task"
    by_steps = [accuracy(model, attacks.pgd(model, x, y, attack_cfg(num_steps=k), seed=[1, 1]), y)
                for k in (1, 2, 5, 10)]
    by_eps = [accuracy(model, attacks.pgd(model, x, y, attack_cfg(epsilon=e, step_size=e / 4,
                                                                  num_steps=8), seed=[1, 1]), y)
              for e in (1.0, 4.0, 16.0, 64.0)]
    assert all(a >= b for a, b in zip([clean] + by_steps, by_steps)), by_steps
    assert all(a >= b for a, b in zip([clean] + by_eps, by_eps)), by_eps
    assert by_eps[-1] < clean / 2, "a large epsilon must break the model"


def test_targeted_mode_moves_prediction_to_target(trained):
    model, x, y = trained
    targets = (y + 3) % 10
    cfg = attack_cfg(epsilon=64.0, step_size=8.0, num_steps=20, mode="targeted")
    adv = attacks.pgd(model, x, y, cfg, seed=[2, 2], targets=targets)
    logp = lambda z: tf.nn.log_softmax(model(z, training=False)).numpy()[np.arange(256), targets]
    hit = lambda z: float(np.mean(np.argmax(model(z, training=False), -1) == targets.numpy()))
    assert np.mean(logp(adv) > logp(x)) > 0.95
    assert hit(adv) > hit(x) + 0.3
    # Random targets are never the true label.
    t = attacks.random_targets(tf.tile(y, [20]), 10, tf.constant([3, 4], tf.int64))
    assert not np.any(t.numpy() == np.tile(y.numpy(), 20))
    assert set(np.unique(t.numpy())) == set(range(10))


def test_attack_leaves_batch_norm_statistics_and_weights_unchanged(trained):
    model, x, y = trained
    before = [w.numpy().copy() for w in model.weights]
    attacks.pgd(model, x, y, attack_cfg(num_steps=3), seed=[0, 0])
    for b, w in zip(before, model.weights):
        np.testing.assert_array_equal(b, w.numpy())


class Probe(keras.layers.Layer):
    """The identity, keeping the last batch it saw: what a forward pass computed there."""

    def __init__(self, shape, **kwargs):
        super().__init__(**kwargs)
        self.shape = tuple(shape)

    def build(self, input_shape):
        self.seen = self.add_weight(shape=self.shape, initializer="zeros", trainable=False,
                                    name="seen")

    def call(self, x):
        self.seen.assign(x)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape


def test_attacker_backward_rule_changes_gradients_not_forward():
    """Table 1 wiring: ReLU forward, parametric-softplus backward for the attacker only."""
    keras.utils.set_random_seed(1)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Rescaling(1 / 255.0, offset=-0.5)(inp)  # pre-activations near 0
    h = keras.layers.Conv2D(4, 3, name="conv")(h)
    h = activations.Activation("relu")(h)
    h = Probe((4, 6, 6, 4), name="probe")(h)
    h = keras.layers.Flatten()(h)
    model = keras.Model(inp, keras.layers.Dense(3)(h))
    x = tf.random.uniform([4, 8, 8, 3], 0, 255, seed=2)
    y = tf.constant([0, 1, 2, 0])
    natural = attacks.pgd(model, x, y, attack_cfg(epsilon=2.0, step_size=0.25, num_steps=2,
                                                  random_start=False))
    smooth = attacks.pgd(model, x, y, attack_cfg(epsilon=2.0, step_size=0.25, num_steps=2,
                                                 random_start=False, backward="parametric_softplus"))
    assert not np.array_equal(natural.numpy(), smooth.numpy())
    # The attack's forward pass is still ReLU's: PGD-1 from x evaluates the model once, at x,
    # and the probe after the activation saw relu(conv(x)).
    attacks.pgd(model, x, y, attack_cfg(epsilon=2.0, step_size=0.25, num_steps=1,
                                        random_start=False, backward="parametric_softplus"))
    pre = keras.Model(model.input, model.get_layer("conv").output)(x).numpy()
    assert (pre < 0).mean() > 0.2 and (pre > 0).mean() > 0.2        # the kink matters
    np.testing.assert_array_equal(model.get_layer("probe").seen.numpy(), np.maximum(pre, 0.0))
    # The rule only lasts for the attack: the model's own forward/backward are untouched.
    assert activations.current_backward_rule() is None


def test_runs_under_strategy_and_xla(trained):
    model, x, y = trained
    cfg = attack_cfg(num_steps=3)
    eager = attacks.pgd(model, x[:8], y[:8], cfg, seed=[4, 4])
    xla = tf.function(lambda a, b: attacks.pgd(model, a, b, cfg, seed=tf.constant([4, 4])),
                      jit_compile=True)(x[:8], y[:8])
    assert in_box(xla, x[:8], 8.0)
    # Same seed and steps: XLA may reorder float ops, so allow a few sign flips.
    assert np.mean(np.abs(eager.numpy() - xla.numpy()) > TOL) < 0.05
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    dist = strategy.experimental_distribute_values_from_function(
        lambda ctx: (x[ctx.replica_id_in_sync_group * 4:][:4],
                     y[ctx.replica_id_in_sync_group * 4:][:4]))

    @tf.function
    def step(inputs):
        return strategy.run(lambda a, b: attacks.pgd(model, a, b, cfg, seed=tf.constant([4, 4])),
                            args=inputs)

    out = strategy.gather(step(dist), axis=0)
    assert out.shape == (8, 16, 16, 3) and in_box(out, x[:8], 8.0)


def test_one_step_is_the_closed_form_step_without_a_loop():
    """PGD-1 (the paper's training attack) is one signed-gradient step from the random start,
    projected, with no graph loop (XLA:CPU runs a loop body's input-gradient convolutions on
    its slow generic path); more steps keep the loop."""
    model, w, b = linear_model(seed=3)
    x = tf.random.stateless_uniform([6, 4, 4, 3], [1, 1], 0, 255)
    y = tf.constant([0, 1, 2, 0, 1, 2])
    cfg = attack_cfg(epsilon=8.0, step_size=3.0, num_steps=1)
    start = attacks.pgd(model, x, y, attack_cfg(epsilon=8.0, num_steps=0), seed=[2, 5]).numpy()
    # Closed form: d CE / d x = W (softmax - onehot), reshaped to the image.
    z = start.reshape(6, -1) @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = ((p - np.eye(3)[y.numpy()]) @ w.T).reshape(start.shape)
    expected = np.clip(np.clip(start + 3.0 * np.sign(grad), x - 8.0, x + 8.0), 0.0, 255.0)
    fn = tf.function(lambda a, c, k: attacks.pgd(model, a, c, attack_cfg(
        epsilon=8.0, step_size=3.0, num_steps=k), seed=tf.constant([2, 5])), jit_compile=True)
    np.testing.assert_allclose(attacks.pgd(model, x, y, cfg, seed=[2, 5]).numpy(), expected,
                               atol=TOL)
    np.testing.assert_allclose(fn(x, y, 1).numpy(), expected, atol=TOL)

    def loops(k):
        graph = fn.get_concrete_function(x, y, k).graph
        ops = [op.type for op in graph.get_operations()]
        return sum(t in ("While", "StatelessWhile") for t in ops)
    assert loops(1) == 0 and loops(2) == 1


def test_model_that_ignores_its_input_is_not_moved():
    """A constant model has a zero input gradient: PGD without random start returns x."""
    inp = keras.Input((4, 4, 3))
    out = keras.layers.Dense(3)(keras.layers.Flatten()(inp * 0.0))
    model = keras.Model(inp, out)
    x = tf.random.uniform([2, 4, 4, 3], 0, 255, seed=3)
    adv = attacks.pgd(model, x, tf.constant([0, 1]), attack_cfg(random_start=False))
    np.testing.assert_array_equal(adv.numpy(), x.numpy())
    # Not even connected to the input (a callable, e.g. a broken SavedModel function).
    constant = lambda images: tf.zeros([2, 3])
    adv = attacks.pgd(constant, x, tf.constant([0, 1]), attack_cfg(random_start=False))
    np.testing.assert_array_equal(adv.numpy(), x.numpy())


# ---- mixed precision ---------------------------------------------------------------------------

def _conv_net(policy):
    """A conv net under a Keras dtype policy (float32 scaling and logits, as sat_tf.models)."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        inp = keras.Input((8, 8, 3))
        x = keras.layers.Rescaling(2 / 255.0, offset=-1, dtype="float32")(inp)
        x = keras.layers.Conv2D(6, 3, padding="same", name="conv")(x)
        x = activations.Activation("silu")(x)
        x = keras.layers.Flatten()(x)
        return keras.Model(inp, keras.layers.Dense(5, dtype="float32")(x))
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_pgd_moves_the_images_under_mixed_precision(policy):
    """FGSM (PGD-1, no random start, step = epsilon) moves every pixel by +-epsilon along the
    sign of the input gradient, also when the model computes in float16 / bfloat16: the signs
    agree with the float32 twin's (same weights) but where the gradient is within rounding
    of 0."""
    keras.utils.set_random_seed(3)
    reference = _conv_net("float32")
    model = _conv_net(policy)
    model.set_weights(reference.get_weights())
    assert model.get_layer("conv").compute_dtype == policy.split("_")[1]
    x = tf.random.stateless_uniform([16, 8, 8, 3], [1, 1], 4.0, 251.0)   # no clipping at 0, 255
    y = tf.constant(np.arange(16) % 5, tf.int32)
    cfg = AttackConfig(epsilon=4.0, step_size=4.0, num_steps=1, random_start=False,
                       clean_start_prob=0.0)
    expected = attacks.pgd(reference, x, y, cfg).numpy() - x.numpy()
    moved = attacks.pgd(model, x, y, cfg).numpy() - x.numpy()
    assert np.all(np.abs(np.abs(expected) - 4.0) < TOL)
    assert np.mean(np.abs(np.abs(moved) - 4.0) < TOL) > 0.99, np.mean(moved == 0.0)
    assert np.mean(np.sign(moved) == np.sign(expected)) > 0.9
