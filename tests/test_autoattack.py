"""APGD, Square and the AutoAttack sequence against independent truth: the paper's checkpoint
formula and p schedule, the DLR formulas, the budget and the box, epsilon 0, the closed-form
optimum on a linear model, a model with no useful gradient (where PGD cannot move and Square
must still win, without ever asking for a gradient), determinism, XLA, and on a small network
trained on real digits: APGD at least as strong as PGD, more iterations never helping the
model, AutoAttack at least as strong as each of its parts."""
import dataclasses
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from sat_tf import apgd, attacks, autoattack, evaluation, square
from sat_tf.config import AttackConfig
from sat_tf.data import digits

SEED = tf.constant([3, 4], tf.int64)


def conv_net(classes=10, size=8, channels=3):
    keras.utils.set_random_seed(1)
    inp = keras.Input((size, size, channels))
    x = keras.layers.Rescaling(1 / 64.0, offset=-2.0)(inp)
    x = keras.layers.Conv2D(6, 3, activation="silu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(classes)(x))


def extreme_images(n=6, size=8, channels=3):
    """Random pixels with whole rows at 0 and at 255, so the box binds."""
    x = tf.random.stateless_uniform([n, size, size, channels], [5, 6], 0.0, 255.0).numpy()
    x[:, 0], x[:, 1] = 0.0, 255.0
    return tf.constant(x)


def config(method, eps=8.0, steps=4, **kw):
    mode = "targeted" if method == "apgd-t" else "untargeted"
    return AttackConfig(epsilon=eps, num_steps=steps, method=method, mode=mode,
                        clean_start_prob=0.0, num_targets=3, queries=30, **kw)


def run_any(model, x, y, cfg, seed=SEED, compact=True):
    if cfg.method == "autoattack":
        return autoattack.autoattack(model, x, y, cfg, seeds=[seed], compact=compact)[0]
    return autoattack.run(model, x, y, cfg, seed=seed, compact=compact)


# ---- schedules and losses ------------------------------------------------------------------

def test_checkpoints_follow_the_papers_formula():
    """p_0 = 0, p_1 = 0.22, p_j+1 = p_j + max(p_j - p_j-1 - 0.03, 0.06); checkpoints at
    ceil(p_j N) (Croce & Hein 2020, Sec. 3.2)."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    paper = [math.ceil(round(q * 100, 6)) for q in p[1:]]
    assert apgd.checkpoints(100) == paper == [22, 41, 57, 70, 80, 87, 93, 99]
    for n in (1, 5, 10, 37, 200):
        marks = apgd.checkpoints(n)
        assert marks and marks == sorted(set(marks)) and marks[-1] <= n
    assert apgd.checkpoints(0) == []


def test_square_p_schedule_is_the_papers_table():
    """p halves after 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of 10,000 queries."""
    for query, divisor in [(0, 1), (10, 1), (11, 2), (50, 2), (51, 4), (500, 8), (501, 16),
                           (1001, 32), (2001, 64), (4001, 128), (6001, 256), (8001, 512),
                           (9999, 512)]:
        assert float(square.fraction(query, 10000)) == pytest.approx(0.8 / divisor)
    # Rescaled to the budget: 1,000 queries reach the last halving at query 801.
    assert float(square.fraction(801, 1000)) == pytest.approx(0.8 / 512)
    # 32x32 images: the first window covers sqrt(0.8) of the side; the last ones one pixel.
    assert square.window_side(0, 10000, 32, 32) == round(math.sqrt(0.8 * 1024)) == 29
    assert square.window_side(9000, 10000, 32, 32) == 1


def test_dlr_losses_against_their_formulas():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 10)).astype(np.float32)
    y = rng.integers(0, 10, 50)
    t = (y + rng.integers(1, 10, 50)) % 10
    assert (np.argmax(z, 1) != y).any() and (np.argmax(z, 1) == y).any()
    s = -np.sort(-z, axis=1)
    other = np.array([np.max(np.delete(row, label)) for row, label in zip(z, y)])
    zy, zt = z[np.arange(50), y], z[np.arange(50), t]
    expected = -(zy - other) / (s[:, 0] - s[:, 2] + 1e-12)
    np.testing.assert_allclose(apgd.dlr_loss(z, y), expected, rtol=1e-5)
    expected_t = -(zy - zt) / (s[:, 0] - 0.5 * (s[:, 2] + s[:, 3]) + 1e-12)
    np.testing.assert_allclose(apgd.dlr_targeted_loss(z, y, t), expected_t, rtol=1e-5)
    np.testing.assert_allclose(square.margin(z, y), zy - other, rtol=1e-6)
    # The losses are scale-invariant (the point of DLR) and need enough classes.
    np.testing.assert_allclose(apgd.dlr_loss(7 * z, y), expected, rtol=1e-4)
    with pytest.raises(ValueError, match="at least 4 classes; the model has 3"):
        apgd.dlr_targeted_loss(z[:, :3], y % 3, t % 3)


# ---- invariants ----------------------------------------------------------------------------

METHODS = ["apgd-ce", "apgd-t", "square", "autoattack"]


@pytest.mark.parametrize("method", METHODS)
def test_budget_box_and_zero_epsilon(method):
    model, x = conv_net(), extreme_images()
    y = tf.argmax(model(x), -1, output_type=tf.int32)
    for compact in (True, False):
        out = run_any(model, x, y, config(method, eps=8.0), compact=compact)
        adv = out.images.numpy()
        assert np.abs(adv - x.numpy()).max() <= 8.0 + 1e-3
        assert adv.min() >= 0.0 and adv.max() <= 255.0
        assert out.forward.shape == out.backward.shape == (6,)
    out = run_any(model, x, y, config(method, eps=0.0))
    np.testing.assert_array_equal(out.images.numpy(), x.numpy())
    dlr = apgd.apgd(model, x, y, epsilon=8.0, num_steps=3, loss="dlr", seed=SEED).numpy()
    assert np.abs(dlr - x.numpy()).max() <= 8.0 + 1e-3 and 0 <= dlr.min() <= dlr.max() <= 255


def linear_model(w, y, eps, floor=5.0):
    """Two-class linear logits (x / 255) @ w, with the true logit of each example of ``y``
    offset so its margin stays at least ``floor`` anywhere in the eps-ball: never fooled, and
    the cross-entropy's gradient stays far from underflow."""
    w = tf.constant(w, tf.float32)
    y = tf.constant(y, tf.int32)
    diff = tf.transpose(tf.gather(tf.transpose(w), y) - tf.gather(tf.transpose(w), 1 - y))
    reach = eps / 255.0 * tf.reduce_sum(tf.abs(diff), axis=0)

    def logits(x, offset=None):
        z = tf.reshape(x, [tf.shape(x)[0], -1]) / 255.0 @ w
        return z if offset is None else z + offset
    state = {}

    def model(x):
        if "offset" not in state:      # set on the clean images, the first call
            z = logits(x)
            margin = tf.gather(z, y, batch_dims=1) - tf.gather(z, 1 - y, batch_dims=1)
            state["offset"] = tf.one_hot(y, 2) * (floor + reach - margin)[:, None]
        return logits(x, state["offset"])
    return model


def linear_optimum(w, x, y, eps):
    direction = np.sign(w[:, 1 - y] - w[:, y]).T.reshape(x.shape)
    return np.clip(x + eps * direction, 0.0, 255.0)


def test_apgd_reaches_the_closed_form_optimum_of_a_linear_model():
    """Two classes, linear logits: the cross-entropy is largest at the corner
    clip(x + eps sign(w_other - w_y)), whatever the start; the model is never fooled, so APGD
    returns its best point."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(48, 2)).astype(np.float32)
    x = rng.uniform(0, 255, size=(5, 4, 4, 3)).astype(np.float32)
    y = np.array([0, 1, 0, 1, 1])
    model = linear_model(w, y, 8.0)
    model(tf.constant(x))
    for random_start in (True, False):
        out, fooled = apgd.apgd_with_status(model, x, y, epsilon=8.0, num_steps=5,
                                            random_start=random_start, seed=SEED)
        assert not fooled.numpy().any()
        np.testing.assert_allclose(out.numpy(), linear_optimum(w, x, y, 8.0), atol=1e-3)


def test_apgd_halves_its_step_to_close_in_on_an_interior_optimum():
    """The loss peaks inside the ball at x* (two classes, margin c + |x - x*|^2 / s): a fixed
    sign step oscillates around x* at its own size; APGD's checkpoints halve the step (the
    loss stops rising in most steps) and its best point converges on x*. 100 iterations halve
    up to 8 times (2 eps / 256): APGD ends within eps / 16 of x*, PGD with step eps / 4 does
    not."""
    eps = 16.0
    rng = np.random.default_rng(3)
    x = rng.uniform(40, 215, size=(4, 4, 4, 1)).astype(np.float32)
    star = x + rng.uniform(-0.6, 0.6, size=x.shape).astype(np.float32) * eps
    y = tf.zeros([4], tf.int32)

    def model(t):
        m = 3.0 + tf.reduce_sum(tf.square(t - star), axis=[1, 2, 3]) / 2000.0
        return tf.stack([m, tf.zeros_like(m)], axis=1)
    out, fooled = apgd.apgd_with_status(model, x, y, epsilon=eps, num_steps=100, seed=SEED)
    assert not fooled.numpy().any()
    assert np.abs(out.numpy() - star).max() < eps / 16
    pgd = attacks.pgd(model, x, y, AttackConfig(epsilon=eps, step_size=eps / 4, num_steps=100,
                                                clean_start_prob=0.0), seed=SEED)
    assert np.abs(pgd.numpy() - star).max() > eps / 16


def no_gradient_model():
    """Class 0 when the mean pixel is above 128, else class 1; its input gradient is zero
    (stop_gradient) and asking for it at all is an error."""
    @tf.custom_gradient
    def forbidden(x):
        def grad(_):
            raise AssertionError("Square asked for a gradient")
        return tf.identity(x), grad

    def logits(x, guard=True):
        x = forbidden(x) if guard else x
        m = tf.reduce_mean(tf.stop_gradient(x), axis=[1, 2, 3])
        return tf.stack([m - 128.0, tf.zeros_like(m)], axis=1)
    return logits


def test_square_wins_where_gradients_are_useless_and_never_asks_for_one():
    """Mean pixel 128 + eps/2: the mean must drop by more than eps/2. PGD sees a zero gradient
    and only its random start moves (the mean of 64 uniform draws: std 0.07 eps); Square's
    search gets there."""
    eps = 16.0
    rng = np.random.default_rng(2)
    x = rng.uniform(64, 192, size=(8, 8, 8, 1)).astype(np.float32)
    x += 128.0 + eps / 2 + 0.1 - x.mean(axis=(1, 2, 3), keepdims=True)
    x, y = tf.constant(x), tf.zeros([8], tf.int32)
    model = no_gradient_model()
    assert (np.argmax(model(x), 1) == 0).all()
    pgd = attacks.pgd(lambda t: model(t, guard=False), x, y,
                      AttackConfig(epsilon=eps, step_size=2.0, num_steps=20,
                                   clean_start_prob=0.0), seed=SEED)
    assert (np.argmax(model(pgd), 1) == 0).all()           # PGD fooled none
    adv, queries = tf.function(lambda: square.square(model, x, y, epsilon=eps, num_queries=300,
                                                     seed=SEED, return_queries=True))()
    assert (np.argmax(model(adv), 1) == 1).all()           # Square fooled all
    assert np.abs(adv.numpy() - x.numpy()).max() <= eps + 1e-3
    q = queries.numpy()
    assert (q >= 2).all() and (q <= 300).all()


def test_square_redraws_signs_that_would_change_nothing():
    """Every pixel already at x + eps: a window with all signs + would waste the query, so
    the signs drawn always hold a - somewhere (3 channels, 8 draws: all + has probability
    8^-8 per example); where the box clips x + eps and x - eps apart nothing is forced."""
    x = tf.random.stateless_uniform([200, 6, 6, 3], [1, 1], 20.0, 230.0)
    window = tf.random.stateless_uniform([200, 6, 6, 1], [2, 2]) < 0.3
    signs = square._changing_signs(x, x + 8.0, window, 8.0, tf.constant([5, 5], tf.int64))
    assert signs.shape == (200, 1, 1, 3)
    assert set(np.unique(signs.numpy())) <= {-1.0, 1.0}
    assert (signs.numpy().min(axis=-1) < 0).all()
    # Without a constraint the draws are fair coins.
    free = square._changing_signs(x, x, window, 8.0, tf.constant([5, 5], tf.int64)).numpy()
    assert 0.4 < (free > 0).mean() < 0.6


# ---- determinism, XLA, distribution --------------------------------------------------------

def test_same_seed_same_images_other_seed_other_images():
    model, x = conv_net(), extreme_images()
    y = tf.argmax(model(x), -1, output_type=tf.int32)
    for method in ("apgd-ce", "square"):
        a = run_any(model, x, y, config(method)).images.numpy()
        b = run_any(model, x, y, config(method)).images.numpy()
        c = run_any(model, x, y, config(method), seed=tf.constant([9, 9], tf.int64)).images
        np.testing.assert_array_equal(a, b)
        assert np.abs(a - c.numpy()).max() > 1.0


def test_the_attacks_compile_with_xla():
    """The linear model's optimum is reached under jit_compile too; the evaluator's per-batch
    function with the whole sequence over fixed shapes (compact=False, as on a TPU) compiles
    and counts what it counts without XLA."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(48, 2)).astype(np.float32)
    x = rng.uniform(0, 255, size=(4, 4, 4, 3)).astype(np.float32)
    y = np.array([0, 1, 1, 0])
    model = linear_model(w, y, 8.0)
    model(tf.constant(x))
    jit = tf.function(lambda: apgd.apgd(model, x, y, epsilon=8.0, num_steps=4, seed=SEED),
                      jit_compile=True)
    np.testing.assert_allclose(jit().numpy(), linear_optimum(w, x, y, 8.0), atol=1e-3)
    # The evaluator's whole per-batch function with AutoAttack over fixed shapes, as a TPU
    # compiles it (tests/test_tpu_readiness.py compiles the PGD one on a ResNet).
    net, xs = conv_net(), extreme_images()
    ys = tf.argmax(net(xs), -1, output_type=tf.int32)
    mask = tf.constant([1.0] * 5 + [0.0])
    cfg = dataclasses.replace(config("autoattack", eps=16.0, steps=2), num_targets=1)
    counts = lambda: evaluation._batch_counts(net, xs, ys, mask, [cfg], 1, SEED, 1,
                                              compact=False)
    compiled = tf.function(counts, jit_compile=True)()
    n, top1, _, correct, *_, stages = compiled
    assert float(n) == 5.0 and float(top1) == 5.0
    after = stages.numpy()[0]
    assert 5.0 >= after[0] >= after[1] >= after[2] >= float(correct[0])
    assert after[0] < 5.0                  # the attack does something at eps 16
    for with_xla, without in zip(compiled, tf.function(counts)()):
        np.testing.assert_allclose(with_xla.numpy(), without.numpy(), rtol=1e-6)


# ---- on a small network trained on real digits ---------------------------------------------

@pytest.fixture(scope="module")
def digits_mlp():
    """An MLP (8x8 -> 32 SiLU -> 10) trained 15 epochs on scikit-learn's real digit scans;
    96.4 % on the 359 held-out scans."""
    split = digits.load()
    (tx, ty), (ex, ey) = split["train"], split["eval"]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Rescaling(1 / 255.0),
                              keras.layers.Flatten(), keras.layers.Dense(32, activation="silu"),
                              keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(tx[..., None].astype("float32"), ty, batch_size=64, epochs=15, verbose=0)
    return model, tf.constant(ex[..., None], tf.float32), tf.constant(ey, tf.int32)


def batches(x, y, size):
    """The eval contract: (images, labels, mask) batches of one static size, padding masked."""
    n = int(x.shape[0])
    pad = -n % size
    x = tf.concat([x, tf.zeros([pad, *x.shape[1:]])], 0)
    y = tf.concat([y, tf.zeros([pad], tf.int32)], 0)
    mask = tf.concat([tf.ones([n]), tf.zeros([pad])], 0)
    return tf.data.Dataset.from_tensor_slices((x, y, mask)).batch(size, drop_remainder=True)


def robust_accuracy(model, x, y, adv):
    clean = np.argmax(model(x), 1) == y.numpy()
    return float(np.mean(clean & (np.argmax(model(adv), 1) == y.numpy())))


def test_apgd_is_at_least_as_strong_as_pgd_on_real_digits(digits_mlp):
    """At eps 16 with 10 iterations: PGD with the paper's evaluation step (1 pixel) cannot even
    reach the ball's surface; with Madry's step 2.5 eps / steps it can. APGD needs no step
    size and must match the better of them (tolerance: 2 of 359 examples); 20 APGD iterations
    never do worse than 5."""
    model, x, y = digits_mlp
    tol = 2 / 359
    pgd = {step: robust_accuracy(model, x, y, attacks.pgd(model, x, y, AttackConfig(
        epsilon=16.0, step_size=step, num_steps=10, clean_start_prob=0.0), seed=SEED))
        for step in (1.0, 4.0)}
    a10 = robust_accuracy(model, x, y, apgd.apgd(model, x, y, epsilon=16.0, num_steps=10,
                                                 seed=SEED))
    assert a10 <= min(pgd.values()) + tol, (a10, pgd)
    assert a10 < pgd[1.0] - 0.05           # the fixed small step is far weaker
    a5, a20 = (robust_accuracy(model, x, y, apgd.apgd(model, x, y, epsilon=16.0, num_steps=n,
                                                      seed=SEED)) for n in (5, 20))
    assert a20 <= a5 + tol


def test_autoattack_is_at_least_as_strong_as_its_parts_on_real_digits(digits_mlp):
    """Through the evaluator (two batches): AutoAttack's rows fall stage by stage, and its
    robust accuracy is no higher than APGD-CE's, APGD-T's or Square's alone, nor PGD's; Square
    alone, without gradients, finds adversarial digits."""
    model, x, y = digits_mlp
    common = dict(epsilon=16.0, clean_start_prob=0.0, num_targets=3, queries=200)
    cfgs = [AttackConfig(num_steps=10, step_size=4.0, **common),
            AttackConfig(num_steps=10, method="apgd-ce", **common),
            AttackConfig(num_steps=10, method="apgd-t", mode="targeted", **common),
            AttackConfig(num_steps=0, method="square", **common),
            AttackConfig(num_steps=10, method="autoattack", **common)]
    result = evaluation.evaluate(model, batches(x, y, 180), cfgs)
    rows = result["attacks"]
    n, tol = result["examples"], 2
    assert n == 359
    pgd, ce, t, sq, aa = (r["correct"] for r in rows)
    stages = [s["correct"] for s in rows[-1]["stages"]]
    assert result["clean_correct"] >= stages[0] >= stages[1] >= stages[2] >= aa
    assert aa <= min(pgd, ce, t, sq) + tol
    assert stages[0] <= ce + tol            # the first stage is APGD-CE
    assert sq < result["clean_correct"] - 10
    assert result["robust_correct"] <= aa
    # Passes, summed over the split: PGD 10 + 10 on every example; APGD-CE one clean forward
    # for all, then 11 + 11 on the clean-correct ones; Square forward only.
    total = lambda row, key: round(row[f"{key}_passes_per_example"] * n, 6)
    clean = result["clean_correct"]
    assert (total(rows[0], "forward"), total(rows[0], "backward")) == (10 * n, 10 * n)
    assert (total(rows[1], "forward"), total(rows[1], "backward")) == (n + 11 * clean,
                                                                       11 * clean)
    assert total(rows[3], "backward") == 0.0
    assert n + clean <= total(rows[3], "forward") <= n + 200 * clean
    # AutoAttack: APGD-CE's 11 backward passes on each clean-correct example, then APGD-T's 11
    # per target on each survivor, at least one target and at most 3.
    aa_back = total(rows[-1], "backward")
    assert 11 * clean + 11 * stages[0] <= aa_back <= 11 * clean + 33 * stages[0]


def test_restarts_run_each_stage_again_on_the_survivors(digits_mlp):
    """Two restarts: each stage runs twice, the second time only on what the first left, so
    it is not weaker and costs more, but at most twice as much."""
    model, x, y = digits_mlp
    x, y = x[:60], y[:60]
    cfg = AttackConfig(epsilon=16.0, num_steps=3, method="autoattack", clean_start_prob=0.0,
                       num_targets=2, queries=20)
    one, r1 = autoattack.autoattack(model, x, y, cfg, seeds=[SEED])
    two, r2 = autoattack.autoattack(model, x, y, cfg,
                                    seeds=[SEED, tf.constant([8, 8], tf.int64)])
    r1, r2 = r1.numpy(), r2.numpy()
    # Stage 1's first run is the one-restart run (same seed, same examples): example by
    # example, the second run can only remove; later stages see other survivors.
    assert (r2[0] <= r1[0]).all() and r2[-1].sum() <= r1[-1].sum() + 2
    assert (r2[1] <= r2[0]).all() and (r2[2] <= r2[1]).all()
    assert float(tf.reduce_sum(two.backward)) <= 2 * float(tf.reduce_sum(one.backward)) + 1e-6
    assert float(tf.reduce_sum(two.backward)) > float(tf.reduce_sum(one.backward))


def test_autoattack_on_two_replicas_covers_the_split(digits_mlp):
    """Under a 2-replica MirroredStrategy, gathering the survivors (the default on GPUs) and
    with fixed shapes (compact=False, as on a TPU): every example once, the stages
    non-increasing, the two ways close."""
    model, x, y = digits_mlp
    cfg = AttackConfig(epsilon=16.0, num_steps=3, method="autoattack", clean_start_prob=0.0,
                       num_targets=2, queries=20)
    ds = batches(x[:100], y[:100], 40)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    one = evaluation.Evaluator(model, [cfg], strategy=strategy)(ds)
    two = evaluation.Evaluator(model, [cfg], strategy=strategy, compact=False)(ds)
    assert one["examples"] == two["examples"] == 100
    assert one["clean_correct"] == two["clean_correct"]
    for r in (one, two):
        s = [st["correct"] for st in r["attacks"][0]["stages"]]
        assert r["clean_correct"] >= s[0] >= s[1] >= s[2] >= r["attacks"][0]["correct"]
    assert abs(one["robust_correct"] - two["robust_correct"]) <= 4
