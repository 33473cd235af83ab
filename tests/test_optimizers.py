"""The optimizers: against TF1's, the table against the config's names, and the slot counts
against what Keras' optimizers really keep."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from sat_tf import config, optimizers, recipes
from sat_tf.config import OptimizerConfig

GRADS = [np.array([0.5, -2.0, 1e-3], np.float32), np.array([-0.1, 3.0, 0.0], np.float32),
         np.array([1.0, 1.0, -1.0], np.float32), np.array([0.2, -0.7, 4.0], np.float32)]


def _run_keras(opt, grads):
    v = tf.Variable([1.0, -1.0, 0.5])
    opt.build([v])
    for g in grads:
        opt.apply_gradients([(tf.constant(g), v)])
    return v.numpy()


def _run_tf1(opt, grads):
    v = tf.Variable([1.0, -1.0, 0.5])
    for g in grads:
        opt.apply_gradients([(tf.constant(g), v)])
    return v.numpy()


# ---- the table -------------------------------------------------------------------------------

def test_table_has_every_optimizer_the_config_accepts():
    assert sorted(optimizers.TABLE) == sorted(config.OPTIMIZERS)
    assert len(config.OPTIMIZERS) == len(set(config.OPTIMIZERS))


@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("name", config.OPTIMIZERS)
def test_slots_are_the_variables_keras_keeps_per_weight(name, momentum):
    """Counted on a built optimizer: its variables of each weight's shape (the weights' shapes
    are distinct and none is a scalar, like the step counter). Exact with momentum, as every
    recipe has; an upper bound without."""
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2)(keras.layers.Dense(5)(inputs))
    model = keras.Model(inputs, outputs)
    weights = model.trainable_variables
    assert len({tuple(w.shape) for w in weights}) == len(weights) == 4
    opt = optimizers.build_optimizer(OptimizerConfig(name=name, momentum=momentum), 0.1)
    opt.build(weights)
    opt.apply_gradients([(tf.ones_like(w), w) for w in weights])
    counts = {sum(tuple(v.shape) == tuple(w.shape) for v in opt.variables) for w in weights}
    assert len(counts) == 1
    (count,) = counts
    if momentum > 0:
        assert count == optimizers.slots(name)
    else:
        assert count <= optimizers.slots(name)


# ---- against TF1 -----------------------------------------------------------------------------

def test_rmsprop_matches_tf1_rmspropoptimizer():
    cfg = recipes.efficientnet().optimizer   # decay 0.9, momentum 0.9, eps 1e-3
    ours = _run_keras(optimizers.build_optimizer(cfg, 0.05), GRADS)
    tf1 = _run_tf1(tf.compat.v1.train.RMSPropOptimizer(
        0.05, decay=0.9, momentum=0.9, epsilon=1e-3), GRADS)
    np.testing.assert_allclose(ours, tf1, rtol=1e-6, atol=1e-7)


def test_keras_rmsprop_differs_from_tf1_by_its_zero_start():
    cfg = recipes.efficientnet().optimizer
    keras_rms = _run_keras(keras.optimizers.RMSprop(0.05, rho=0.9, momentum=0.9, epsilon=1e-3),
                           GRADS[:1])
    ours = _run_keras(optimizers.build_optimizer(cfg, 0.05), GRADS[:1])
    start = np.array([1.0, -1.0, 0.5])
    # First step: lr g / sqrt((1-rho) g^2 + eps) (Keras) vs lr g / sqrt(rho + (1-rho) g^2 + eps).
    g = GRADS[0].astype(np.float64)
    np.testing.assert_allclose(start - keras_rms, 0.05 * g / np.sqrt(0.1 * g * g + 1e-3),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(start - ours, 0.05 * g / np.sqrt(0.9 + 0.1 * g * g + 1e-3),
                               rtol=1e-5, atol=1e-7)


def test_sgd_nesterov_matches_tf1_momentum_at_constant_lr():
    cfg = recipes.resnet().optimizer
    ours = _run_keras(optimizers.build_optimizer(cfg, 0.1), GRADS)
    tf1 = _run_tf1(tf.compat.v1.train.MomentumOptimizer(0.1, 0.9, use_nesterov=True), GRADS)
    np.testing.assert_allclose(ours, tf1, rtol=1e-6, atol=1e-7)


def test_plain_sgd_momentum_matches_tf1():
    cfg = recipes.cifar().optimizer
    ours = _run_keras(optimizers.build_optimizer(cfg, 0.1), GRADS)
    tf1 = _run_tf1(tf.compat.v1.train.MomentumOptimizer(0.1, 0.9), GRADS)
    np.testing.assert_allclose(ours, tf1, rtol=1e-6, atol=1e-7)


def test_adam_takes_momentum_as_beta_1_and_the_epsilon():
    cfg = OptimizerConfig(name="adam", momentum=0.8, epsilon=1e-3)
    ours = _run_keras(optimizers.build_optimizer(cfg, 0.05), GRADS)
    tf1 = _run_tf1(tf.compat.v1.train.AdamOptimizer(0.05, beta1=0.8, epsilon=1e-3), GRADS)
    np.testing.assert_allclose(ours, tf1, rtol=1e-6, atol=1e-7)


def test_mixed_float16_wraps_in_loss_scale_optimizer():
    cfg = recipes.resnet().optimizer
    opt = optimizers.build_optimizer(cfg, 0.1, mixed_precision="mixed_float16")
    assert isinstance(opt, keras.optimizers.LossScaleOptimizer)
    opt = optimizers.build_optimizer(cfg, 0.1, mixed_precision="mixed_bfloat16")
    assert isinstance(opt, keras.optimizers.SGD) and opt.nesterov
