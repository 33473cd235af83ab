"""The exponential moving average (EMA) of a model's weights, as the TPU EfficientNet code
keeps it (DESIGN.md §5: "applied after the step increment")."""
from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from sat_tf.model_weights import batch_norm_statistics


class ExponentialMovingAverage(tf.Module):
    """Averages of a model's trainable weights and batch-norm moving statistics.

    As ``tf.train.ExponentialMovingAverage(decay, num_updates=global_step)`` in the TPU code,
    applied after the step increment: update number t (0-based) uses ``num_updates = t + 1``
    and the decay ``min(decay, (1 + num_updates) / (10 + num_updates))``. The averages are
    checkpointed with the run; :meth:`swapped` / :meth:`copy_to_model` put them in the model
    for evaluation and export.

    Under a distribution strategy each replica keeps and updates its own copy of the averages
    (``ON_READ`` variables; a checkpoint or a cross-replica read takes the first replica's), so
    an update moves no data between replicas: the weights and batch-norm statistics it
    averages are already the same on every replica.
    """

    def __init__(self, model: keras.Model, decay: float):
        super().__init__(name="ema")
        self.decay = float(decay)
        targets = list(model.trainable_weights) + batch_norm_statistics(model)
        self._targets = _Untracked(targets)
        self.averages = [
            tf.Variable(tf.convert_to_tensor(v), trainable=False, name=f"ema_{i}",
                        synchronization=tf.VariableSynchronization.ON_READ,
                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            for i, v in enumerate(targets)]

    def update(self, step) -> None:
        """Update number ``step`` (0-based: the global step before its increment), in replica
        or cross-replica context."""
        num_updates = tf.cast(step, tf.float32) + 1.0
        decay = tf.minimum(self.decay, (1.0 + num_updates) / (10.0 + num_updates))
        for avg, v in zip(self.averages, self._targets.value):
            avg.assign_sub((1.0 - decay) * (avg - tf.cast(tf.convert_to_tensor(v), avg.dtype)))

    def reset(self) -> None:
        """The averages start again from the model's current weights (after a warm start)."""
        for avg, v in zip(self.averages, self._targets.value):
            avg.assign(tf.cast(tf.convert_to_tensor(v), avg.dtype))

    def copy_to_model(self) -> None:
        for avg, v in zip(self.averages, self._targets.value):
            v.assign(avg.read_value())

    @contextlib.contextmanager
    def swapped(self):
        """The averages in the model inside the context, the trained weights after it."""
        backup = [tf.identity(tf.convert_to_tensor(v)) for v in self._targets.value]
        self.copy_to_model()
        try:
            yield
        finally:
            for v, b in zip(self._targets.value, backup):
                v.assign(b)


class _Untracked:
    """Holds objects without making them checkpoint dependencies of their owner."""

    def __init__(self, value):
        self.value = value
