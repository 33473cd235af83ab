"""Learning-rate schedules: pure functions of the global step (DESIGN.md §5).

The peak learning rate is ``base_learning_rate * global_batch_size / 256``. Epochs are
``step / steps_per_epoch`` with a fractional ``steps_per_epoch = num_train_examples /
global_batch_size``, as in the TPU ResNet and EfficientNet code. Every schedule starts with a
linear warm-up, ``peak * step / warmup_steps`` for ``step < warmup_steps`` (0 at step 0, as the
TPU code), and then follows:

* ``step``: ``peak * decay_factor ** k`` with k the number of boundaries (epochs) reached,
  ``step >= boundary * steps_per_epoch`` (ResNet: /10 at 30, 60, 90 or 30, 60, 80);
* ``exponential``: ``peak * decay_rate ** floor(step / (decay_epochs * steps_per_epoch))``
  counted from step 0, staircase (EfficientNet: x0.97 every 2.4 epochs);
* ``cosine``: ``0.5 * peak * (1 + cos(pi * t))`` with t going from 0 at the end of the
  warm-up to 1 at the last step;
* ``constant``: ``peak``.
"""
from __future__ import annotations

import dataclasses
import math

import keras
import tensorflow as tf

from sat_tf.config import TrainConfig


def peak_learning_rate(train: TrainConfig) -> float:
    """``base_learning_rate`` scaled linearly by ``global_batch_size / 256``."""
    return train.base_learning_rate * train.global_batch_size / 256.0


def steps_per_epoch(train: TrainConfig, num_train_examples: int) -> float:
    return num_train_examples / train.global_batch_size


def total_steps(train: TrainConfig, num_train_examples: int) -> int:
    """``train_steps`` if set, else ``train_epochs`` epochs rounded to a whole step (>= 1)."""
    if train.train_steps is not None:
        return int(train.train_steps)
    return max(1, int(round(train.train_epochs * steps_per_epoch(train, num_train_examples))))


def learning_rate(step, train: TrainConfig, *, steps_per_epoch: float, total_steps: int):
    """The learning rate at ``step`` (a Python number or a scalar tensor), a float32 tensor."""
    step = tf.cast(step, tf.float32)
    peak = peak_learning_rate(train)
    if train.lr_schedule == "step":
        k = tf.zeros([], tf.float32)
        for boundary in train.decay_boundaries:
            k += tf.cast(step >= boundary * steps_per_epoch, tf.float32)
        lr = peak * tf.pow(float(train.decay_factor), k)
    elif train.lr_schedule == "exponential":
        lr = peak * tf.pow(float(train.decay_rate),
                           tf.floor(step / (train.decay_epochs * steps_per_epoch)))
    elif train.lr_schedule == "cosine":
        warmup = train.warmup_epochs * steps_per_epoch
        t = tf.clip_by_value((step - warmup) / max(total_steps - warmup, 1.0), 0.0, 1.0)
        lr = 0.5 * peak * (1.0 + tf.cos(math.pi * t))
    elif train.lr_schedule == "constant":
        lr = tf.constant(peak, tf.float32)
    else:
        raise ValueError(f"Invalid learning-rate schedule {train.lr_schedule!r}; valid choices: "
                         "step, cosine, exponential, constant.")
    warmup_steps = train.warmup_epochs * steps_per_epoch
    if warmup_steps > 0:
        lr = tf.where(step < warmup_steps, peak * step / warmup_steps, lr)
    return tf.cast(lr, tf.float32)


@keras.saving.register_keras_serializable(package="sat_tf")
class Schedule(keras.optimizers.schedules.LearningRateSchedule):
    """:func:`learning_rate` as a Keras schedule, evaluated at the optimizer's iteration."""

    def __init__(self, train: TrainConfig | dict, *, steps_per_epoch: float, total_steps: int):
        self.train = train if isinstance(train, TrainConfig) else TrainConfig(**train)
        self.steps_per_epoch = float(steps_per_epoch)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        return learning_rate(step, self.train, steps_per_epoch=self.steps_per_epoch,
                             total_steps=self.total_steps)

    def get_config(self):
        return {"train": dataclasses.asdict(self.train), "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps}
