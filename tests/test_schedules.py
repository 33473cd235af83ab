"""Learning-rate schedules at their corner points."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from sat_tf import config, recipes, schedules
from sat_tf.config import ScheduleConfig, TrainConfig

# 1000 examples, batch 100: 10 steps per epoch; peak = 0.1 * 100 / 256.
N = 1000
PEAK = 0.1 * 100 / 256


def _cfg(**kw):
    """(train, schedule) sections: batch 100, 100 epochs, base LR 0.1, 5 warm-up epochs."""
    train = dict(global_batch_size=100, train_epochs=100)
    schedule = dict(base_learning_rate=0.1, warmup_epochs=5.0)
    for k, v in kw.items():
        (train if k in ("global_batch_size", "train_epochs", "train_steps") else schedule)[k] = v
    return TrainConfig(**train), ScheduleConfig(**schedule)


def _lr(cfg, step):
    train, schedule = cfg
    return float(schedules.learning_rate(
        step, schedule, global_batch_size=train.global_batch_size,
        steps_per_epoch=schedules.steps_per_epoch(train, N),
        total_steps=schedules.total_steps(train, N)))


def test_table_has_every_schedule_the_config_accepts():
    assert sorted(schedules.TABLE) == sorted(config.LR_SCHEDULES)
    assert len(config.LR_SCHEDULES) == len(set(config.LR_SCHEDULES))


def test_peak_is_linearly_scaled_by_batch_over_256():
    assert schedules.peak_learning_rate(ScheduleConfig(base_learning_rate=0.1), 100
                                        ) == pytest.approx(PEAK)
    assert schedules.peak_learning_rate(ScheduleConfig(base_learning_rate=0.016), 4096
                                        ) == pytest.approx(0.256)


def test_steps_per_epoch_and_total_steps():
    train, _ = _cfg()
    assert schedules.steps_per_epoch(train, N) == 10.0
    assert schedules.total_steps(train, N) == 1000
    train, _ = _cfg(train_epochs=None, train_steps=37)
    assert schedules.total_steps(train, N) == 37
    train, _ = _cfg(global_batch_size=256)
    assert schedules.total_steps(train, 1000) == round(100 * 1000 / 256)


@pytest.mark.parametrize("schedule", ["step", "cosine", "exponential", "constant"])
def test_linear_warmup_from_zero(schedule):
    cfg = _cfg(name=schedule)
    assert _lr(cfg, 0) == 0.0
    assert _lr(cfg, 25) == pytest.approx(PEAK * 0.5)
    assert _lr(cfg, 49) == pytest.approx(PEAK * 49 / 50)
    # Warm-up ends at 5 epochs = step 50 with the schedule's own value there.
    expected_at_50 = {"step": PEAK, "cosine": PEAK, "constant": PEAK,
                      "exponential": PEAK * 0.97 ** 2}[schedule]
    assert _lr(cfg, 50) == pytest.approx(expected_at_50)


def test_no_warmup_starts_at_peak():
    assert _lr(_cfg(warmup_epochs=0.0, name="step"), 0) == pytest.approx(PEAK)


def test_step_decay_at_epoch_boundaries():
    cfg = _cfg(name="step", decay_boundaries=(30.0, 60.0, 90.0), decay_factor=0.1)
    assert _lr(cfg, 299) == pytest.approx(PEAK)
    assert _lr(cfg, 300) == pytest.approx(PEAK * 0.1)
    assert _lr(cfg, 599) == pytest.approx(PEAK * 0.1)
    assert _lr(cfg, 600) == pytest.approx(PEAK * 0.01)
    assert _lr(cfg, 899) == pytest.approx(PEAK * 0.01)
    assert _lr(cfg, 900) == pytest.approx(PEAK * 0.001)
    assert _lr(cfg, 10_000) == pytest.approx(PEAK * 0.001)


def test_exponential_staircase_every_2_4_epochs_from_step_zero():
    cfg = _cfg(name="exponential", decay_epochs=2.4, decay_rate=0.97)  # 24 steps
    assert _lr(cfg, 71) == pytest.approx(PEAK * 0.97 ** 2)
    assert _lr(cfg, 72) == pytest.approx(PEAK * 0.97 ** 3)
    assert _lr(cfg, 95) == pytest.approx(PEAK * 0.97 ** 3)
    assert _lr(cfg, 960) == pytest.approx(PEAK * 0.97 ** 40, rel=1e-5)


def test_cosine_from_end_of_warmup_to_zero_at_the_last_step():
    cfg = _cfg(name="cosine")           # warm-up 50 steps, 1000 steps in all
    assert _lr(cfg, 525) == pytest.approx(PEAK / 2)
    assert _lr(cfg, 1000) == pytest.approx(0.0, abs=1e-9)
    assert _lr(cfg, 5000) == pytest.approx(0.0, abs=1e-9)
    quarter = 50 + 950 // 4 + 0.5              # t = 1/4: 0.5 * (1 + cos(pi/4))
    assert _lr(cfg, quarter) == pytest.approx(PEAK * 0.5 * (1 + np.cos(np.pi / 4)))


def test_constant_after_warmup():
    cfg = _cfg(name="constant")
    assert _lr(cfg, 50) == _lr(cfg, 999_999) == pytest.approx(PEAK)


def test_schedule_object_is_the_pure_function_and_traces():
    cfg = recipes.efficientnet(global_batch_size=256).schedule
    sched = schedules.Schedule(cfg, global_batch_size=256, steps_per_epoch=10.0,
                               total_steps=1000)
    fn = tf.function(lambda s: sched(s))
    for step in (0, 3, 50, 73, 999):
        assert float(fn(tf.constant(step, tf.int64))) == pytest.approx(
            float(schedules.learning_rate(step, cfg, global_batch_size=256,
                                          steps_per_epoch=10.0, total_steps=1000)))


def test_schedule_serialization_round_trip():
    _, cfg = _cfg(name="step", decay_boundaries=(3.0, 7.0))
    sched = schedules.Schedule(cfg, global_batch_size=100, steps_per_epoch=10.0,
                               total_steps=100)
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sched))
    assert isinstance(revived, schedules.Schedule)
    assert (revived.global_batch_size, revived.steps_per_epoch, revived.total_steps) == (
        100, 10.0, 100)
    for step in (0, 29, 49, 50, 69, 70, 99):
        assert float(revived(step)) == float(sched(step))
    assert float(revived(99)) == pytest.approx(PEAK * 0.01)
