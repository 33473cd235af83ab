"""The training engine on tiny models: distributed steps, resume, Table 1 wiring, EMA,
weight decay by layer type, NaN and SIGTERM handling, load_model."""
import dataclasses
import json
import os
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

from sat_tf import activations, distribute, model_weights, rundir, training
from sat_tf.ema import ExponentialMovingAverage
from sat_tf.step import replica_random_streams
from sat_tf.config import (AttackConfig, DataConfig, Experiment, LoopConfig, ModelConfig,
                           OptimizerConfig, RuntimeConfig, ScheduleConfig, TrainConfig)

SIZE = 16
CLASSES = 4


def tiny_resnet(num_classes, image_size, activation="silu", dropout=0.0):
    """conv-BN-act, one residual block, pooling, (dropout), dense: a tiny ResNet."""
    inp = keras.Input((image_size, image_size, 3), name="images")
    x = keras.layers.Rescaling(2.0 / 255.0, -1.0, name="scale")(inp)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = activations.Activation(activation, name="stem_act")(x)
    y = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="block_conv")(x)
    y = keras.layers.BatchNormalization(momentum=0.9, name="block_bn")(y)
    x = keras.layers.Add(name="block_add")([x, y])
    x = activations.Activation(activation, name="block_act")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    return keras.Model(inp, keras.layers.Dense(num_classes, name="fc")(x), name="tiny_resnet")


def tiny_resnet_dropout(num_classes, image_size):
    return tiny_resnet(num_classes, image_size, dropout=0.5)


def no_bn_net(num_classes, image_size, activation="relu"):
    inp = keras.Input((image_size, image_size, 3), name="images")
    x = keras.layers.Rescaling(2.0 / 255.0, -1.0, name="scale")(inp)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", name="conv")(x)
    x = activations.Activation(activation, name="act")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, keras.layers.Dense(num_classes, name="fc")(x), name="no_bn")


# The section of each field the tests set by its plain name (the names are unique across the
# train, optimizer, schedule and loop sections; "optimizer" and "lr_schedule" are the names).
_PATHS = {"optimizer": "optimizer.name", "lr_schedule": "schedule.name",
          **{f.name: f"{section}.{f.name}" for section, cls in
             (("train", TrainConfig), ("optimizer", OptimizerConfig),
              ("schedule", ScheduleConfig), ("loop", LoopConfig))
             for f in dataclasses.fields(cls) if f.name != "name"}}


def experiment(model_dir, *, strategy="mirrored", devices=None, **fields):
    cfg = dict(global_batch_size=16, train_steps=6, steps_per_loop=2, summary_every_steps=2,
               checkpoint_every_steps=100, eval_steps=2, base_learning_rate=0.4,
               lr_schedule="constant", warmup_epochs=0.0, label_smoothing=0.1,
               weight_decay=1e-3, optimizer="sgd_nesterov")
    cfg.update(fields)
    return Experiment(
        model=ModelConfig(name="resnet-18"),  # replaced by the tests' model_fn
        data=DataConfig(dataset="synthetic", synthetic_image_size=SIZE,
                        synthetic_num_classes=CLASSES, synthetic_train_examples=256,
                        synthetic_eval_examples=32),
        train_attack=AttackConfig(epsilon=8.0, step_size=8.0, num_steps=1),
        eval_attack=AttackConfig(epsilon=8.0, step_size=4.0, num_steps=2, clean_start_prob=0.0),
        runtime=RuntimeConfig(strategy=strategy, devices=devices),
        model_dir=str(model_dir)).replace(**{_PATHS[k]: v for k, v in cfg.items()})


def _weights(model):
    return [np.array(w) for w in model.weights]


def _silent(_line):
    pass


# ---- the distributed step ---------------------------------------------------------------------

def test_mirrored_adversarial_training_learns_and_logs(tmp_path):
    exp = experiment(tmp_path, train_steps=24, steps_per_loop=4, summary_every_steps=8,
                     checkpoint_every_steps=8, eval_every_steps=24)
    lines = []
    trainer = training.Trainer(exp, model_fn=tiny_resnet, log=lines.append)
    assert trainer.num_replicas == 2 and trainer.per_replica_batch_size == 8
    result = trainer.train()
    assert result["status"] == "completed" and result["step"] == 24
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert losses[-1] < 0.85 * losses[0], losses
    # Evaluation ran through sat_tf.evaluation on the eval split (32 examples).
    assert result["eval"]["examples"] == 32
    assert 0.0 <= result["eval"]["attacks"][0]["accuracy"] <= result["eval"]["clean_top1"]
    # Checkpoints every 8 steps; experiment.json round-trips, with the facts the run looked
    # up recorded (head, input size, split sizes, preprocessing).
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-24")
    with open(tmp_path / "experiment.json") as f:
        stored = Experiment.from_dict(json.load(f))
    assert stored == rundir.resolve_experiment(exp) == trainer.experiment
    assert (stored.model.num_classes, stored.model.image_size) == (4, 16)
    assert (stored.data.num_train_examples, stored.data.num_eval_examples) == (
        exp.data.synthetic_train_examples, 32)
    assert stored.data.preprocessing == "resize" and stored.data.label_base == 1
    progress = [s for s in lines if s.startswith("step ")]
    assert progress[0].startswith("step 8/24 | loss ") and "img/s | ETA" in progress[0]
    # TensorBoard events written without the tensorboard package.
    tags = set()
    for event_file in tf.io.gfile.glob(str(tmp_path / "train" / "events.*")):
        for event in tf.compat.v1.train.summary_iterator(event_file):
            tags.update(v.tag for v in event.summary.value)
    assert {"loss", "learning_rate", "adversarial_accuracy", "clean_accuracy", "images_per_sec",
            "clean_and_adversarial_examples"} <= tags


def test_bn_moving_statistics_agree_across_replicas(tmp_path):
    trainer = training.Trainer(experiment(tmp_path, train_steps=2), model_fn=tiny_resnet,
                               log=_silent)
    trainer.train()
    stats = model_weights.batch_norm_statistics(trainer.model)
    assert len(stats) == 4
    for v in stats:
        copies = [np.array(c) for c in v.value.values]
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1])
    assert not np.allclose(np.array(stats[0]), 0.0)  # moved from the initial zeros


def test_two_replicas_make_the_same_first_update_as_one(tmp_path):
    kw = dict(train_steps=1, steps_per_loop=1, summary_every_steps=1, weight_decay=0.05)
    exp2 = experiment(tmp_path / "two", **kw)
    exp1 = experiment(tmp_path / "one", devices=("/cpu:0",), **kw)
    for exp in (exp1, exp2):
        exp.train_attack = AttackConfig(epsilon=8.0, step_size=8.0, num_steps=1,
                                        random_start=False, clean_start_prob=0.0)
    two = training.Trainer(exp2, model_fn=no_bn_net, log=_silent)
    one = training.Trainer(exp1, model_fn=no_bn_net, log=_silent)
    assert (two.num_replicas, one.num_replicas) == (2, 1)
    before = _weights(one.model)
    for a, b in zip(before, _weights(two.model)):
        np.testing.assert_array_equal(a, b)
    two.train()
    one.train()
    moved = 0.0
    for a, b, w0 in zip(_weights(one.model), _weights(two.model), before):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        moved = max(moved, float(np.abs(a - w0).max()))
    assert moved > 1e-3


def _disable_determinism():
    tf_config.disable_op_determinism()


def test_interrupt_and_resume_is_bitwise_identical(tmp_path):
    kw = dict(train_steps=6, steps_per_loop=2, ema_decay=0.9, resume_input="skip",
              checkpoint_every_steps=2)
    a = experiment(tmp_path / "a", **kw)
    b = experiment(tmp_path / "b", **kw)
    for exp in (a, b):
        exp.runtime.deterministic = True
        exp.train_attack = AttackConfig(epsilon=8.0, step_size=8.0, num_steps=1,
                                        clean_start_prob=0.5)
    model_fn = tiny_resnet_dropout   # dropout: the RNG state must resume too
    try:
        straight = training.Trainer(a, model_fn=model_fn, log=_silent)
        straight.train()
        first = training.Trainer(b, model_fn=model_fn, log=_silent)
        assert first.train(until_step=3)["status"] == "stopped"
        del first
        lines = []
        resumed = training.Trainer(b, model_fn=model_fn, log=lines.append)
        assert any("Restored" in s and "(step 3)" in s for s in lines)
        assert resumed.train()["status"] == "completed"
    finally:
        _disable_determinism()
    assert int(resumed.step.numpy()) == int(straight.step.numpy()) == 6
    for x, y in zip(_weights(straight.model), _weights(resumed.model)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(straight.ema.averages, resumed.ema.averages):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


# ---- Table 1 wiring ---------------------------------------------------------------------------

def _batch():
    images = tf.random.stateless_uniform([8, SIZE, SIZE, 3], [1, 2], 0.0, 255.0)
    labels = tf.random.stateless_uniform([8], [3, 4], 0, CLASSES, dtype=tf.int32)
    return images, labels


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


def probed_net(num_classes, image_size):
    """no_bn_net with a Probe on the activations of 8-image batches."""
    inp = keras.Input((image_size, image_size, 3), name="images")
    x = keras.layers.Rescaling(2.0 / 255.0, -1.0, name="scale")(inp)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", name="conv")(x)
    x = activations.Activation("relu", name="act")(x)
    x = Probe((8, image_size // 2, image_size // 2, 6), name="probe")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, keras.layers.Dense(num_classes, name="fc")(x), name="probed")


def test_attacker_backward_changes_the_attack_not_the_forward(tmp_path):
    """Table 1's attacker arm: the attack's forward pass is still ReLU's (the probe sees
    relu(conv(x)) during PGD-1 from x), its gradient is not, and the weight update's loss and
    gradients are those of the plain model."""
    images, labels = _batch()
    seed = tf.constant([0, 0], tf.int64)
    advs, updates = {}, {}
    for rule in (None, "parametric_softplus"):
        exp = experiment(tmp_path / str(rule), strategy="one_device", global_batch_size=8)
        exp.train_attack = AttackConfig(epsilon=8.0, step_size=8.0, num_steps=1,
                                        random_start=False, clean_start_prob=0.0, backward=rule)
        trainer = training.Trainer(exp, model_fn=probed_net, log=_silent)
        advs[rule] = trainer.train_step.attack(images, labels, seed).numpy()
        model = trainer.model
        pre = keras.Model(model.input, model.get_layer("conv").output)(images).numpy()
        assert (pre < 0).mean() > 0.2 and (pre > 0).mean() > 0.2     # ReLU's kink matters
        np.testing.assert_array_equal(model.get_layer("probe").seen.numpy(), np.maximum(pre, 0))
        loss, _, grads = trainer.train_step.loss_and_gradients(images, labels)
        updates[rule] = [float(loss)] + [g.numpy() for g in grads]
    for a, b in zip(updates[None], updates["parametric_softplus"]):
        np.testing.assert_array_equal(a, b)                       # the optimizer's pass
    assert np.mean(advs[None] != advs["parametric_softplus"]) > 0.01   # different gradients


def test_optimizer_backward_changes_weight_gradients_not_the_loss(tmp_path):
    images, labels = _batch()
    out = {}
    for rule in (None, "relu", "parametric_softplus"):
        exp = experiment(tmp_path / str(rule), strategy="one_device", optimizer_backward=rule)
        trainer = training.Trainer(exp, model_fn=no_bn_net, log=_silent)
        loss, _, grads = trainer.train_step.loss_and_gradients(images, labels)
        out[rule] = (float(loss), [g.numpy() for g in grads])
    assert out[None][0] == out["parametric_softplus"][0] == out["relu"][0]
    for natural, relu_rule in zip(out[None][1], out["relu"][1]):   # relu's rule = its gradient
        np.testing.assert_allclose(natural, relu_rule, rtol=1e-6, atol=1e-8)
    conv_kernel = 0
    assert not np.allclose(out[None][1][conv_kernel], out["parametric_softplus"][1][conv_kernel])


def test_clean_mode_trains_on_the_clean_images(tmp_path):
    images, labels = _batch()
    trainer = training.Trainer(experiment(tmp_path, strategy="one_device", adversarial=False),
                               model_fn=no_bn_net, log=_silent)
    np.testing.assert_array_equal(trainer.train_step.attack(images, labels, tf.constant([0, 0])), images)


def test_loss_is_smoothed_cross_entropy_plus_half_wd_sum_of_squares(tmp_path):
    images, labels = _batch()
    exp = experiment(tmp_path, strategy="one_device", global_batch_size=8, weight_decay=0.01,
                     label_smoothing=0.2)
    trainer = training.Trainer(exp, model_fn=no_bn_net, log=_silent)
    loss, logits, _ = trainer.train_step.loss_and_gradients(images, labels)
    logp = tf.nn.log_softmax(logits).numpy()
    target = np.full([8, CLASSES], 0.2 / CLASSES)
    target[np.arange(8), labels.numpy()] += 0.8
    ce = -(target * logp).sum(1).mean()
    l2 = sum(float(np.sum(np.square(w))) for w in trainer.model.trainable_weights)  # no BN here
    assert float(loss) == pytest.approx(ce + 0.01 * 0.5 * l2, rel=1e-5)


# ---- weights selected by layer type; EMA -----------------------------------------------------

def test_weight_decay_and_bn_statistics_are_selected_by_layer_type():
    inp = keras.Input((8, 8, 3), name="images")
    x = keras.layers.Conv2D(4, 3, name="batch_normalization_conv")(inp)     # misleading names
    x = keras.layers.BatchNormalization(name="dense_like")(x)
    x = activations.Activation("smooth_relu", name="act")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inp, keras.layers.Dense(3, name="batch_norm_head")(x))
    decayed = {w.path for w in model_weights.decayed_weights(model)}
    assert decayed == {"batch_normalization_conv/kernel", "batch_normalization_conv/bias",
                       "act/beta", "batch_norm_head/kernel", "batch_norm_head/bias"}
    assert {w.path for w in model_weights.batch_norm_statistics(model)} == {
        "dense_like/moving_mean", "dense_like/moving_variance"}
    # The release's ResNet decays only tensorpack's ".*/W": the conv and dense kernels.
    kernels = {w.path for w in model_weights.decayed_weights(model, "kernels")}
    assert kernels == {"batch_normalization_conv/kernel", "batch_norm_head/kernel"}


def test_resnet_recipe_decays_kernels_and_efficientnet_recipe_every_non_bn_weight():
    from sat_tf import models, recipes
    resnet = models.build_model("resnet-18", activation="smooth_relu", num_classes=10,
                                image_size=32)
    convs = [l for l in resnet._flatten_layers() if isinstance(l, keras.layers.Conv2D)]
    dense = [l for l in resnet._flatten_layers() if isinstance(l, keras.layers.Dense)]
    decayed = model_weights.decayed_weights(resnet, recipes.resnet().optimizer.weight_decay_scope)
    assert len(decayed) == len(convs) + len(dense) == 21        # 20 convs (3 shortcuts) + fc
    assert all(w.path.endswith("kernel") for w in decayed)
    names = {w.path for w in decayed}
    assert not any("beta" in n or "bias" in n or "gamma" in n for n in names)
    smooth_betas = [w for w in resnet.trainable_weights if w.path.endswith("/beta")
                    and "bn" not in w.path]
    everything = model_weights.decayed_weights(resnet, recipes.efficientnet().optimizer.weight_decay_scope)
    assert len(everything) == 21 + 1 + len(smooth_betas)          # + fc bias + SmoothReLU betas


def biased_net(num_classes, image_size):
    """no_bn_net with biases initialised to 1 (Keras' default 0 would hide a decayed bias)."""
    inp = keras.Input((image_size, image_size, 3), name="images")
    x = keras.layers.Rescaling(2.0 / 255.0, -1.0, name="scale")(inp)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", bias_initializer="ones",
                            name="conv")(x)
    x = activations.Activation("relu", name="act")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(num_classes, bias_initializer="ones", name="fc")(x)
    return keras.Model(inp, out, name="biased")


def test_the_trainer_decays_the_recipes_weights(tmp_path):
    """The loss's weight decay term is wd/2 * sum of squares over exactly the recipe's set."""
    images, labels = _batch()
    out = {}
    for scope in ("kernels", "non_bn"):
        exp = experiment(tmp_path / scope, strategy="one_device", global_batch_size=8,
                         weight_decay=0.5, weight_decay_scope=scope)
        trainer = training.Trainer(exp, model_fn=biased_net, log=_silent)
        loss, _, _ = trainer.train_step.loss_and_gradients(images, labels)
        out[scope] = (float(loss), trainer.model)
    model = out["kernels"][1]
    biases = sum(float(np.sum(np.square(model.get_layer(n).bias))) for n in ("conv", "fc"))
    assert biases == 6 + CLASSES
    np.testing.assert_allclose(out["non_bn"][0] - out["kernels"][0], 0.5 * 0.5 * biases,
                               rtol=1e-4)


def test_ema_closed_form_covers_weights_and_bn_statistics():
    model = tiny_resnet(CLASSES, SIZE)
    ema = ExponentialMovingAverage(model, decay=0.99)
    targets = list(model.trainable_weights) + model_weights.batch_norm_statistics(model)
    assert len(ema.averages) == len(targets)
    w0 = [np.array(v) for v in targets]
    for v in targets:
        v.assign(np.array(v) + 1.0)
    ema.update(0)        # num_updates 1: decay min(0.99, 2/11); a = 2/11 w0 + 9/11 (w0 + 1)
    for avg, w in zip(ema.averages, w0):
        np.testing.assert_allclose(avg.numpy(), w + 9 / 11, rtol=1e-6, atol=1e-6)
    ema.update(10_000)   # decay 0.99: a += 0.01 (w - a)
    expected = 9 / 11 + 0.01 * (2 / 11)
    for avg, w in zip(ema.averages, w0):
        np.testing.assert_allclose(avg.numpy(), w + expected, rtol=1e-6, atol=1e-6)
    with ema.swapped():
        np.testing.assert_allclose(np.array(targets[0]), w0[0] + expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(targets[0]), w0[0] + 1.0)


def test_ema_matches_tensorflows_with_num_updates_after_the_step_increment():
    """The TPU code: ``tf.train.ExponentialMovingAverage(decay, num_updates=global_step)``
    applied after the step's increment, so update t (0-based) uses num_updates t + 1."""
    model = no_bn_net(CLASSES, SIZE)
    ours = ExponentialMovingAverage(model, decay=0.9)
    step = tf.Variable(0, dtype=tf.int64)
    reference = tf.compat.v1.train.ExponentialMovingAverage(0.9, num_updates=step)
    weights = model.trainable_weights
    reference.apply([w.value for w in weights])
    rng = np.random.default_rng(0)
    for t in range(5):
        for w in weights:
            w.assign(np.array(w) + rng.normal(size=w.shape).astype("float32"))
        ours.update(t)           # our step t, before the increment ...
        step.assign_add(1)       # ... the TPU code increments first and then averages
        reference.apply([w.value for w in weights])
        for avg, w in zip(ours.averages, weights):
            np.testing.assert_allclose(avg.numpy(), reference.average(w.value).numpy(),
                                       rtol=1e-5, atol=1e-6)


def test_load_model_restores_ema_or_trained_weights(tmp_path):
    trainer = training.Trainer(experiment(tmp_path, train_steps=4, ema_decay=0.5),
                               model_fn=tiny_resnet, log=_silent)
    trainer.train()
    model, exp, step = rundir.load_model(str(tmp_path), model_fn=tiny_resnet)
    assert step == 4 and exp == trainer.experiment
    n = len(trainer.model.trainable_weights)
    for w, avg in zip(model.trainable_weights, trainer.ema.averages[:n]):
        np.testing.assert_array_equal(np.array(w), avg.numpy())
    raw, _, _ = rundir.load_model(str(tmp_path), use_ema=False, model_fn=tiny_resnet)
    for w, trained in zip(raw.weights, trainer.model.weights):
        np.testing.assert_array_equal(np.array(w), np.array(trained))
    assert not np.array_equal(np.array(raw.trainable_weights[0]),
                              np.array(model.trainable_weights[0]))
    with pytest.raises(ValueError, match="no experiment.json"):
        rundir.load_model(str(tmp_path / "nothing"))


# ---- stopping ---------------------------------------------------------------------------------

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    exp = experiment(tmp_path, train_steps=8, steps_per_loop=1, summary_every_steps=1,
                     checkpoint_every_steps=1)
    trainer = training.Trainer(exp, model_fn=no_bn_net, log=_silent)
    trainer.train(until_step=2)
    good = tf.train.latest_checkpoint(str(tmp_path))
    assert good.endswith("ckpt-2")
    kernel = trainer.model.get_layer("fc").kernel
    kernel.assign(tf.fill(kernel.shape, np.nan))
    with pytest.raises(training.TrainingDiverged, match="ckpt-2") as e:
        trainer.train()
    assert "NaN or Inf" in str(e.value) and "\n" not in str(e.value)
    assert tf.train.latest_checkpoint(str(tmp_path)) == good
    assert not tf.io.gfile.glob(str(tmp_path / "ckpt-3*"))
    model, _, step = rundir.load_model(str(tmp_path), model_fn=no_bn_net)
    assert step == 2 and all(np.isfinite(np.array(w)).all() for w in model.weights)


def test_sigterm_saves_a_checkpoint_and_returns(tmp_path):
    exp = experiment(tmp_path, train_steps=40, steps_per_loop=2, summary_every_steps=2)
    before = signal.getsignal(signal.SIGTERM)

    def log(line):
        if line.startswith("step 2/"):
            os.kill(os.getpid(), signal.SIGTERM)

    trainer = training.Trainer(exp, model_fn=no_bn_net, log=log)
    result = trainer.train()
    assert result["status"] == "preempted" and result["step"] == 2
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-2")
    assert signal.getsignal(signal.SIGTERM) is before


# ---- XLA and mixed precision ------------------------------------------------------------------

@pytest.mark.parametrize("runtime, compute_dtype", [
    (dict(jit_compile=True), "float32"),
    (dict(mixed_precision="mixed_bfloat16"), "bfloat16"),
    (dict(mixed_precision="mixed_float16", strategy="mirrored"), "float16"),
])
def test_xla_and_mixed_precision_steps(tmp_path, runtime, compute_dtype):
    exp = experiment(tmp_path, strategy="one_device", train_steps=2)
    for k, v in runtime.items():
        setattr(exp.runtime, k, v)
    try:
        trainer = training.Trainer(exp, model_fn=tiny_resnet, log=_silent)
        result = trainer.train()
        assert trainer.model.get_layer("stem").compute_dtype == compute_dtype
        assert trainer.model.get_layer("stem").kernel.dtype == "float32"
        assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer) == (
            compute_dtype == "float16")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert result["step"] == 2 and np.isfinite(result["train"]["loss"])


# ---- issue 8: traffic, per-replica randomness, prompt SIGTERM, one evaluation trace ------------

def _count_merge_calls(trainer, monkeypatch):
    """merge_calls made while tracing one training step (each is a cross-replica sync point;
    on a TPU, an ONLY_FIRST_REPLICA update inside one broadcasts the value to every replica)."""
    from tensorflow.python.distribute import distribute_lib
    calls = []
    original = distribute_lib.ReplicaContext.merge_call

    def counting(self, merge_fn, args=(), kwargs=None):
        calls.append(merge_fn)
        return original(self, merge_fn, args, kwargs)

    monkeypatch.setattr(distribute_lib.ReplicaContext, "merge_call", counting)
    images, labels = next(iter(trainer._train_dataset(0)))
    one_step = tf.function(lambda x, y: trainer.strategy.run(trainer._replica_step,
                                                             args=(x, y, tf.constant(False))))
    one_step.get_concrete_function(images, labels)
    monkeypatch.undo()
    return len(calls)


def test_ema_and_step_add_no_cross_replica_traffic(tmp_path, monkeypatch):
    counts = {}
    for ema in (None, 0.99):
        trainer = training.Trainer(experiment(tmp_path / str(ema), ema_decay=ema),
                                   model_fn=tiny_resnet, log=_silent)
        counts[ema] = _count_merge_calls(trainer, monkeypatch)
    assert counts[0.99] == counts[None], counts
    # Per replica (each replica thread enters every merge_call): Keras' optimizer's gradient
    # all-reduce, update and iteration count, and our batch-norm statistics all-reduce.
    assert counts[None] == 4 * trainer.num_replicas, counts
    # The averages are per-replica copies that agree, and each tracks the weights.
    trainer.train()
    for avg in trainer.ema.averages:
        copies = [np.array(c) for c in avg.values]
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1])
    step_copies = [int(c.numpy()) for c in trainer.step.values]
    assert step_copies == [6, 6]


def test_each_replica_draws_its_own_dropout_masks():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = tiny_resnet_dropout(CLASSES, SIZE)
    weights = {id(w) for w in model.weights}
    states = [v for v in model.variables if id(v) not in weights]
    assert states, "the dropout layer's seed generator state"
    before = [np.array(c) for c in states[0].value.values]
    features = keras.Model(model.input, model.get_layer("dropout").output)
    ones = tf.ones([4, SIZE, SIZE, 3]) * 128.0

    @tf.function
    def step():
        def replica_fn():
            ctx = tf.distribute.get_replica_context()
            with replica_random_streams(states, ctx.replica_id_in_sync_group):
                return features(ones, training=True)
        return strategy.run(replica_fn)

    masks = [np.array(x) == 0 for x in strategy.experimental_local_results(step())]
    assert masks[0].mean() > 0.2 and masks[1].mean() > 0.2          # rate 0.5 dropout ran
    assert not np.array_equal(masks[0], masks[1])                   # ... with different masks
    after = [np.array(c) for c in states[0].value.values]
    np.testing.assert_array_equal(after[0], after[1])               # the states still agree
    assert after[0][0] == before[0][0] and after[0][1] > before[0][1]   # seed kept, counter on
    # Replica 0 draws what one replica without the context draws.
    with strategy.scope():
        twin = tiny_resnet_dropout(CLASSES, SIZE)
    twin.set_weights(model.get_weights())
    twin_states = [v for v in twin.variables if id(v) not in {id(w) for w in twin.weights}]
    twin_states[0].assign(before[0])
    twin_features = keras.Model(twin.input, twin.get_layer("dropout").output)
    plain = strategy.experimental_local_results(
        tf.function(lambda: strategy.run(lambda: twin_features(ones, training=True)))())
    np.testing.assert_array_equal(np.array(plain[0]) == 0, masks[0])
    np.testing.assert_array_equal(np.array(plain[1]) == 0, masks[0])


def test_sigterm_inside_a_long_loop_stops_within_a_step(tmp_path):
    """A preemption notice gives ~30 s: SIGTERM must not wait for a 1000-step loop to end."""
    import threading
    import time
    exp = experiment(tmp_path, strategy="one_device", train_steps=1000, steps_per_loop=1000,
                     summary_every_steps=1000, checkpoint_every_steps=1000)
    trainer = training.Trainer(exp, model_fn=no_bn_net, log=_silent)
    seen = {}

    def send_when_training():
        deadline = time.time() + 120
        while time.time() < deadline:
            step = int(trainer.step.numpy())     # read while the graph loop runs
            if step >= 3:
                seen["step"] = step
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    sender = threading.Thread(target=send_when_training)
    sender.start()
    result = trainer.train()
    sender.join()
    assert "step" in seen
    assert result["status"] == "preempted"
    assert seen["step"] <= result["step"] <= seen["step"] + 3, (seen, result["step"])
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith(f"ckpt-{result['step']}")


def test_periodic_evaluation_is_traced_once(tmp_path):
    exp = experiment(tmp_path, train_steps=4, steps_per_loop=1, summary_every_steps=1,
                     eval_every_steps=2)
    trainer = training.Trainer(exp, model_fn=no_bn_net, log=_silent)
    trainer.train()
    assert trainer._evaluator.tracing_count == 1
    assert trainer.evaluate()["examples"] == 32
    assert trainer._evaluator.tracing_count == 1


# ---- issue 9: loss scaling, XLA, the EMA in the step and in evaluation, BN not decayed, ------
# ---- per-step / per-replica attack seeds, the chief ------------------------------------------

def test_mixed_float16_update_equals_the_float32_update(tmp_path):
    """Loss scaling: under mixed_float16 the gradients are of the scaled loss and the
    LossScaleOptimizer unscales them, so two steps move every weight as float32 does (an
    unscaled loss would shrink the update by the initial scale, 2**15)."""
    moved = {}
    for policy in ("none", "mixed_float16"):
        exp = experiment(tmp_path / policy, strategy="one_device", base_learning_rate=0.01)
        exp.runtime.mixed_precision = policy
        try:
            trainer = training.Trainer(exp, model_fn=tiny_resnet, log=_silent)
            before = [w.numpy() for w in trainer.model.trainable_weights]
            trainer.run_steps(iter(trainer._train_dataset(0)), tf.constant(2))
            moved[policy] = [w.numpy() - b for w, b in zip(trainer.model.trainable_weights, before)]
        finally:
            keras.mixed_precision.set_global_policy("float32")
    assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    assert trainer.model.get_layer("stem").compute_dtype == "float16"
    for f32, f16, w in zip(moved["none"], moved["mixed_float16"],
                           trainer.model.trainable_weights):
        assert np.abs(f32).max() > 1e-5, w.path              # the premise: every weight moved
        np.testing.assert_allclose(f16, f32, rtol=0, atol=0.05 * np.abs(f32).max(),
                                   err_msg=w.path)


@pytest.mark.parametrize("jit", [False, True])
def test_jit_compile_marks_the_step_for_xla(tmp_path, jit):
    """RuntimeConfig.jit_compile: the traced training loop calls the attack-forward-backward
    function through a call marked ``_XlaMustCompile`` (what tf.function(jit_compile=True)
    emits); without it nothing in the loop is marked."""
    exp = experiment(tmp_path, strategy="one_device")
    exp.runtime.jit_compile = jit
    trainer = training.Trainer(exp, model_fn=no_bn_net, log=_silent)
    graph = trainer.run_steps.get_concrete_function(
        iter(trainer._train_dataset(0)), tf.constant(1)).graph.as_graph_def()
    marked = [f.signature.name for f in graph.library.function if f.attr["_XlaMustCompile"].b]
    calls = [n.op for f in graph.library.function for n in f.node_def
             if n.attr["_XlaMustCompile"].b]
    if jit:
        assert [name for name in marked if "forward_backward" in name], marked
        assert calls, "no call of the XLA-compiled function"
    else:
        assert marked == [] and calls == []


def _ema_targets(model):
    return list(model.trainable_weights) + model_weights.batch_norm_statistics(model)


def test_trainer_updates_the_ema_after_every_step(tmp_path):
    """After step t (0-based) every average follows a <- d a + (1 - d) w with
    d = min(decay, (2 + t) / (11 + t)), starting from the initial weights, for the trainable
    weights and the batch-norm statistics."""
    decay = 0.5
    trainer = training.Trainer(experiment(tmp_path, strategy="one_device", ema_decay=decay),
                               model_fn=tiny_resnet, log=_silent)
    targets = _ema_targets(trainer.model)
    assert len(trainer.ema.averages) == len(targets)
    expected = [w.numpy().astype(np.float64) for w in targets]
    iterator = iter(trainer._train_dataset(0))
    for t in range(3):
        trainer.run_steps(iterator, tf.constant(1))
        d = min(decay, (2.0 + t) / (11.0 + t))
        weights = [w.numpy().astype(np.float64) for w in targets]
        expected = [d * a + (1.0 - d) * w for a, w in zip(expected, weights)]
        for avg, e, v in zip(trainer.ema.averages, expected, targets):
            np.testing.assert_allclose(avg.numpy(), e, rtol=1e-5, atol=1e-6, err_msg=v.path)
    # The premise: weights and averages have drifted apart, so an average never updated (or
    # updated with another decay) is caught.
    assert max(np.abs(e - w).max() for e, w in zip(expected, weights)) > 1e-3


def test_evaluate_reports_the_accuracy_of_the_averaged_weights(tmp_path):
    """With a zero classifier kernel the model predicts argmax(bias). The EMA bias points at
    the most frequent eval label, the trained bias at the rarest: clean top-1 must be the
    share of the most frequent, and the trained weights are back afterwards."""
    from sat_tf import data as data_lib
    exp = experiment(tmp_path, strategy="one_device", ema_decay=0.9)
    trainer = training.Trainer(exp, model_fn=no_bn_net, log=_silent)
    labels = np.concatenate([y.numpy()[m.numpy() > 0] for _, y, m in data_lib.build_dataset(
        exp.data, split="eval", batch_size=8, image_size=SIZE)])
    counts = np.bincount(labels, minlength=CLASSES)
    ema_class, raw_class = int(np.argmax(counts)), int(np.argmin(counts))
    assert counts[ema_class] != counts[raw_class]                # the premise
    fc = trainer.model.get_layer("fc")
    index = {id(w): i for i, w in enumerate(_ema_targets(trainer.model))}
    for cls, assign in ((ema_class, lambda w, v: trainer.ema.averages[index[id(w)]].assign(v)),
                        (raw_class, lambda w, v: w.assign(v))):
        assign(fc.kernel, np.zeros(fc.kernel.shape, np.float32))
        assign(fc.bias, np.eye(CLASSES, dtype=np.float32)[cls])
    result = trainer.evaluate()
    assert result["examples"] == len(labels) == 32
    assert result["clean_correct"] == counts[ema_class]
    assert result["attacks"][0]["correct"] == counts[ema_class]       # constant logits
    np.testing.assert_array_equal(fc.bias.numpy(), np.eye(CLASSES)[raw_class])


@pytest.mark.parametrize("scope", ["kernels", "non_bn"])
def test_weight_decay_in_the_loss_skips_batch_norm(tmp_path, scope):
    """tiny_resnet has two batch norms; with gamma = 3 and beta = 2 a decayed gamma or beta
    would add 0.25 * (9 + 4) * 8 per layer to the loss. The decay term is wd/2 * sum w^2 over
    the conv kernels and the classifier (its bias only with "non_bn")."""
    images, labels = _batch()
    exp = experiment(tmp_path, strategy="one_device", global_batch_size=8, weight_decay=0.5,
                     weight_decay_scope=scope, label_smoothing=0.0)
    trainer = training.Trainer(exp, model_fn=tiny_resnet, log=_silent)
    model = trainer.model
    for bn in ("stem_bn", "block_bn"):
        model.get_layer(bn).gamma.assign(tf.fill([8], 3.0))
        model.get_layer(bn).beta.assign(tf.fill([8], 2.0))
    model.get_layer("fc").bias.assign(tf.ones([CLASSES]))
    loss, logits, _ = trainer.train_step.loss_and_gradients(images, labels)
    ce = float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)))
    decayed = [model.get_layer(n).kernel for n in ("stem", "block_conv", "fc")]
    if scope == "non_bn":
        decayed.append(model.get_layer("fc").bias)
    l2 = sum(float(np.sum(np.square(w.numpy().astype(np.float64)))) for w in decayed)
    assert float(loss) - ce == pytest.approx(0.5 * 0.5 * l2, rel=1e-4)


def test_attack_seeds_differ_per_step_and_replica_and_20_percent_start_clean(tmp_path):
    """PGD-0 from a random start returns its starting point: the clean image (a clean start)
    or image + noise drawn from the step's and the replica's seed. Over 40 steps x 2 replicas
    the clean starts follow Binomial(80, 0.2) (outside [6, 27] with probability < 0.3 %),
    and no two random starts share their noise."""
    exp = experiment(tmp_path, train_steps=40)
    exp.train_attack = AttackConfig(epsilon=8.0, step_size=8.0, num_steps=0, random_start=True,
                                    clean_start_prob=0.2)
    trainer = training.Trainer(exp, model_fn=no_bn_net, log=_silent)
    assert trainer.num_replicas == 2
    iterator = iter(trainer._train_dataset(0))
    clean_starts, noises = 0, []
    for _ in range(40):
        trainer.run_steps(iterator, tf.constant(1))   # keeps (clean | attacked) examples
        for pair in trainer._example_images.values:   # one copy per replica
            pair = pair.numpy()
            clean, attacked = pair[:, :, :SIZE], pair[:, :, SIZE:]
            if np.array_equal(clean, attacked):
                clean_starts += 1
            else:
                inside = (clean >= 8.0) & (clean <= 247.0)   # noise not clipped at 0 or 255
                noises.append(np.where(inside, attacked - clean, np.nan))
    assert 6 <= clean_starts <= 27, clean_starts
    for i in range(len(noises)):
        for j in range(i):
            both = ~np.isnan(noises[i]) & ~np.isnan(noises[j])
            assert both.sum() > 100
            # The same seed gives the same noise up to float rounding (~2e-5).
            assert np.abs(noises[i][both] - noises[j][both]).max() > 1.0, (i, j)


class _FakeMultiWorker(tf.distribute.MultiWorkerMirroredStrategy):
    """Only what _chief reads: the type and the cluster resolver (no cluster is started)."""

    def __init__(self, cluster, task_type, task_id):
        self._resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id)

    @property
    def cluster_resolver(self):
        return self._resolver


@pytest.mark.parametrize("cluster, task_type, task_id, expected", [
    ({"worker": ["a:1", "b:1", "c:1"]}, "worker", 0, (True, 0)),      # no chief job: worker 0
    ({"worker": ["a:1", "b:1", "c:1"]}, "worker", 2, (False, 2)),
    ({"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "chief", 0, (True, 0)),
    ({"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "worker", 0, (False, 0)),
    ({"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "worker", 1, (False, 1)),
])
def test_chief_is_the_chief_job_else_worker_0(cluster, task_type, task_id, expected):
    assert distribute.chief(_FakeMultiWorker(cluster, task_type, task_id)) == expected


def test_single_process_strategies_are_the_chief():
    assert distribute.chief(tf.distribute.get_strategy()) == (True, 0)
    assert distribute.chief(tf.distribute.OneDeviceStrategy("/cpu:0")) == (True, 0)
    assert distribute.chief(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])) == (True, 0)
