"""Learning-rate schedules at their corner points, and the optimizers against TF1's."""
import numpy as np
import pytest
import tensorflow as tf

from sat_tf import optimizers, recipes, schedules
from sat_tf.config import TrainConfig

# 1000 examples, batch 100: 10 steps per epoch; peak = 0.1 * 100 / 256.
N = 1000
PEAK = 0.1 * 100 / 256


def _cfg(**kw):
    base = dict(global_batch_size=100, base_learning_rate=0.1, train_epochs=100,
                warmup_epochs=5.0)
    base.update(kw)
    return TrainConfig(**base)


def _lr(cfg, step):
    return float(schedules.learning_rate(step, cfg, steps_per_epoch=schedules.steps_per_epoch(
        cfg, N), total_steps=schedules.total_steps(cfg, N)))


def test_peak_is_linearly_scaled_by_batch_over_256():
    assert schedules.peak_learning_rate(_cfg()) == pytest.approx(PEAK)
    assert schedules.peak_learning_rate(_cfg(global_batch_size=4096, base_learning_rate=0.016)
                                        ) == pytest.approx(0.256)


def test_steps_per_epoch_and_total_steps():
    assert schedules.steps_per_epoch(_cfg(), N) == 10.0
    assert schedules.total_steps(_cfg(), N) == 1000
    assert schedules.total_steps(_cfg(train_epochs=None, train_steps=37), N) == 37
    assert schedules.total_steps(_cfg(global_batch_size=256), 1000) == round(100 * 1000 / 256)


@pytest.mark.parametrize("schedule", ["step", "cosine", "exponential", "constant"])
def test_linear_warmup_from_zero(schedule):
    cfg = _cfg(lr_schedule=schedule)
    assert _lr(cfg, 0) == 0.0
    assert _lr(cfg, 25) == pytest.approx(PEAK * 0.5)
    assert _lr(cfg, 49) == pytest.approx(PEAK * 49 / 50)
    # Warm-up ends at 5 epochs = step 50 with the schedule's own value there.
    expected_at_50 = {"step": PEAK, "cosine": PEAK, "constant": PEAK,
                      "exponential": PEAK * 0.97 ** 2}[schedule]
    assert _lr(cfg, 50) == pytest.approx(expected_at_50)


def test_no_warmup_starts_at_peak():
    assert _lr(_cfg(warmup_epochs=0.0, lr_schedule="step"), 0) == pytest.approx(PEAK)


def test_step_decay_at_epoch_boundaries():
    cfg = _cfg(lr_schedule="step", decay_boundaries=(30.0, 60.0, 90.0), decay_factor=0.1)
    assert _lr(cfg, 299) == pytest.approx(PEAK)
    assert _lr(cfg, 300) == pytest.approx(PEAK * 0.1)
    assert _lr(cfg, 599) == pytest.approx(PEAK * 0.1)
    assert _lr(cfg, 600) == pytest.approx(PEAK * 0.01)
    assert _lr(cfg, 899) == pytest.approx(PEAK * 0.01)
    assert _lr(cfg, 900) == pytest.approx(PEAK * 0.001)
    assert _lr(cfg, 10_000) == pytest.approx(PEAK * 0.001)


def test_exponential_staircase_every_2_4_epochs_from_step_zero():
    cfg = _cfg(lr_schedule="exponential", decay_epochs=2.4, decay_rate=0.97)  # 24 steps
    assert _lr(cfg, 71) == pytest.approx(PEAK * 0.97 ** 2)
    assert _lr(cfg, 72) == pytest.approx(PEAK * 0.97 ** 3)
    assert _lr(cfg, 95) == pytest.approx(PEAK * 0.97 ** 3)
    assert _lr(cfg, 960) == pytest.approx(PEAK * 0.97 ** 40, rel=1e-5)


def test_cosine_from_end_of_warmup_to_zero_at_the_last_step():
    cfg = _cfg(lr_schedule="cosine")           # warm-up 50 steps, 1000 steps in all
    assert _lr(cfg, 525) == pytest.approx(PEAK / 2)
    assert _lr(cfg, 1000) == pytest.approx(0.0, abs=1e-9)
    assert _lr(cfg, 5000) == pytest.approx(0.0, abs=1e-9)
    quarter = 50 + 950 // 4 + 0.5              # t = 1/4: 0.5 * (1 + cos(pi/4))
    assert _lr(cfg, quarter) == pytest.approx(PEAK * 0.5 * (1 + np.cos(np.pi / 4)))


def test_constant_after_warmup():
    cfg = _cfg(lr_schedule="constant")
    assert _lr(cfg, 50) == _lr(cfg, 999_999) == pytest.approx(PEAK)


def test_schedule_object_is_the_pure_function_and_traces():
    cfg = recipes.efficientnet(global_batch_size=256)
    sched = schedules.Schedule(cfg, steps_per_epoch=10.0, total_steps=1000)
    fn = tf.function(lambda s: sched(s))
    for step in (0, 3, 50, 73, 999):
        assert float(fn(tf.constant(step, tf.int64))) == pytest.approx(
            float(schedules.learning_rate(step, cfg, steps_per_epoch=10.0, total_steps=1000)))


# ---- optimizers ------------------------------------------------------------------------------

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


def test_rmsprop_matches_tf1_rmspropoptimizer():
    cfg = recipes.efficientnet(global_batch_size=256)   # decay 0.9, momentum 0.9, eps 1e-3
    ours = _run_keras(optimizers.build_optimizer(cfg, 0.05), GRADS)
    tf1 = _run_tf1(tf.compat.v1.train.RMSPropOptimizer(
        0.05, decay=0.9, momentum=0.9, epsilon=1e-3), GRADS)
    np.testing.assert_allclose(ours, tf1, rtol=1e-6, atol=1e-7)


def test_keras_rmsprop_differs_from_tf1_by_its_zero_start():
    cfg = recipes.efficientnet(global_batch_size=256)
    import keras
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
    cfg = recipes.resnet(global_batch_size=256)
    ours = _run_keras(optimizers.build_optimizer(cfg, 0.1), GRADS)
    tf1 = _run_tf1(tf.compat.v1.train.MomentumOptimizer(0.1, 0.9, use_nesterov=True), GRADS)
    np.testing.assert_allclose(ours, tf1, rtol=1e-6, atol=1e-7)


def test_plain_sgd_momentum_matches_tf1():
    cfg = recipes.cifar()
    ours = _run_keras(optimizers.build_optimizer(cfg, 0.1), GRADS)
    tf1 = _run_tf1(tf.compat.v1.train.MomentumOptimizer(0.1, 0.9), GRADS)
    np.testing.assert_allclose(ours, tf1, rtol=1e-6, atol=1e-7)


def test_mixed_float16_wraps_in_loss_scale_optimizer():
    import keras
    opt = optimizers.build_optimizer(recipes.resnet(), 0.1, mixed_precision="mixed_float16")
    assert isinstance(opt, keras.optimizers.LossScaleOptimizer)
    opt = optimizers.build_optimizer(recipes.resnet(), 0.1, mixed_precision="mixed_bfloat16")
    assert isinstance(opt, keras.optimizers.SGD) and opt.nesterov
