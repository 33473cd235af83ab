"""Learning-rate schedules: pure functions of the global step (DESIGN.md §5).

The experiment's ``schedule`` section names the schedule and holds its numbers; the ``train``
section gives the batch size and the length. The peak learning rate is ``base_learning_rate *
global_batch_size / 256``. Epochs are ``step / steps_per_epoch`` with a fractional
``steps_per_epoch = num_train_examples / global_batch_size``, as in the TPU ResNet and
EfficientNet code. Every schedule starts with a linear warm-up, ``peak * step / warmup_steps``
for ``step < warmup_steps`` (0 at step 0, as the TPU code), and then follows:

* ``step``: ``peak * decay_factor ** k`` with k the number of boundaries (epochs) reached,
  ``step >= boundary * steps_per_epoch`` (ResNet: /10 at 30, 60, 90 or 30, 60, 80);
* ``exponential``: ``peak * decay_rate ** floor(step / (decay_epochs * steps_per_epoch))``
  counted from step 0, staircase (EfficientNet: x0.97 every 2.4 epochs);
* ``cosine``: ``0.5 * peak * (1 + cos(pi * t))`` with t going from 0 at the end of the
  warm-up to 1 at the last step;
* ``constant``: ``peak``.

Each schedule is one entry of :data:`TABLE`, keyed like ``sat_tf.config.LR_SCHEDULES``; a test
checks that the names agree.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import keras
import tensorflow as tf

from sat_tf.config import ScheduleConfig, TrainConfig


def peak_learning_rate(schedule: ScheduleConfig, global_batch_size: int) -> float:
    """``base_learning_rate`` scaled linearly by ``global_batch_size / 256``."""
    return schedule.base_learning_rate * global_batch_size / 256.0


def steps_per_epoch(train: TrainConfig, num_train_examples: int) -> float:
    return num_train_examples / train.global_batch_size


def total_steps(train: TrainConfig, num_train_examples: int) -> int:
    """``train_steps`` if set, else ``train_epochs`` epochs rounded to a whole step (>= 1)."""
    if train.train_steps is not None:
        return int(train.train_steps)
    return max(1, int(round(train.train_epochs * steps_per_epoch(train, num_train_examples))))


# --------------------------------------------------------------------------------------------
# The schedules after the warm-up:
# (step as float32, schedule section, peak, steps_per_epoch, total_steps) -> learning rate.

def _step(step, c: ScheduleConfig, peak: float, steps_per_epoch: float, total_steps: int):
    k = tf.zeros([], tf.float32)
    for boundary in c.decay_boundaries:
        k += tf.cast(step >= boundary * steps_per_epoch, tf.float32)
    return peak * tf.pow(float(c.decay_factor), k)


def _exponential(step, c: ScheduleConfig, peak: float, steps_per_epoch: float,
                 total_steps: int):
    return peak * tf.pow(float(c.decay_rate), tf.floor(step / (c.decay_epochs * steps_per_epoch)))


def _cosine(step, c: ScheduleConfig, peak: float, steps_per_epoch: float, total_steps: int):
    warmup = c.warmup_epochs * steps_per_epoch
    t = tf.clip_by_value((step - warmup) / max(total_steps - warmup, 1.0), 0.0, 1.0)
    return 0.5 * peak * (1.0 + tf.cos(math.pi * t))


def _constant(step, c: ScheduleConfig, peak: float, steps_per_epoch: float, total_steps: int):
    return tf.constant(peak, tf.float32)


TABLE: dict[str, Callable] = {"step": _step, "cosine": _cosine, "exponential": _exponential,
                              "constant": _constant}


def learning_rate(step, schedule: ScheduleConfig, *, global_batch_size: int,
                  steps_per_epoch: float, total_steps: int):
    """The learning rate at ``step`` (a Python number or a scalar tensor), a float32 tensor."""
    step = tf.cast(step, tf.float32)
    peak = peak_learning_rate(schedule, global_batch_size)
    lr = TABLE[schedule.name](step, schedule, peak, steps_per_epoch, total_steps)
    warmup_steps = schedule.warmup_epochs * steps_per_epoch
    if warmup_steps > 0:
        lr = tf.where(step < warmup_steps, peak * step / warmup_steps, lr)
    return tf.cast(lr, tf.float32)


@keras.saving.register_keras_serializable(package="sat_tf")
class Schedule(keras.optimizers.schedules.LearningRateSchedule):
    """:func:`learning_rate` as a Keras schedule, evaluated at the optimizer's iteration."""

    def __init__(self, schedule: ScheduleConfig | dict, *, global_batch_size: int,
                 steps_per_epoch: float, total_steps: int):
        self.schedule = (schedule if isinstance(schedule, ScheduleConfig)
                         else ScheduleConfig(**schedule))
        self.global_batch_size = int(global_batch_size)
        self.steps_per_epoch = float(steps_per_epoch)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        return learning_rate(step, self.schedule, global_batch_size=self.global_batch_size,
                             steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps)

    def get_config(self):
        return {"schedule": dataclasses.asdict(self.schedule),
                "global_batch_size": self.global_batch_size,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}
