"""The recipes' optimizers as Keras 3 optimizers (DESIGN.md §5).

* ``sgd_nesterov`` / ``sgd``: ``keras.optimizers.SGD``. Keras keeps the velocity in units of
  the step (``v = m v - lr g``), TF1's MomentumOptimizer in units of the gradient
  (``a = m a + g``, step ``lr a``); they agree exactly while the learning rate is constant and
  differ slightly when it changes (warm-up, decay boundaries).
* ``rmsprop``: :class:`TF1RMSprop`, the update of ``tf.compat.v1.train.RMSPropOptimizer`` that
  the EfficientNet recipe was tuned with (decay 0.9, momentum 0.9, epsilon 1e-3).
  ``keras.optimizers.RMSprop`` already puts epsilon inside the square root as TF1 does
  (``lr g / sqrt(ms + eps)``; Keras 2 and PyTorch add it outside, ``sqrt(ms) + eps``), but it
  starts the mean square ``ms`` at 0 where TF1 starts it at 1, which makes its first steps
  about ``1 / sqrt(1 - decay)`` = 3.2 times larger. TF1RMSprop starts it at 1.
* ``adam``: ``keras.optimizers.Adam`` with ``beta_1 = momentum`` and ``epsilon``.

Weight decay is not an optimizer option here: the trainer adds it to the loss as
``wd * 0.5 * sum(w^2)`` (the TPU recipes' ``tf.nn.l2_loss``), so it flows through momentum and
RMSProp exactly as in the reference code.

Each optimizer is one entry of :data:`TABLE`, keyed like ``sat_tf.config.OPTIMIZERS``, built
from the experiment's ``optimizer`` section; a test checks that the names agree.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import keras

from sat_tf.config import OptimizerConfig


@keras.saving.register_keras_serializable(package="sat_tf")
class TF1RMSprop(keras.optimizers.RMSprop):
    """RMSProp exactly as TF1 computes it::

        ms  = rho * ms + (1 - rho) * g^2          (ms starts at 1)
        mom = momentum * mom + lr * g / sqrt(ms + epsilon)
        w  -= mom
    """

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        for v in self._velocities:
            if v is not None:
                v.assign(keras.ops.ones(v.shape, v.dtype))


@dataclasses.dataclass(frozen=True)
class Spec:
    """One optimizer: an entry of :data:`TABLE`.

    ``build(learning_rate, config)`` makes it from the experiment's optimizer section;
    ``slots`` is the number of float32 copies of each weight it keeps (with momentum > 0, as
    every recipe has; SGD without momentum keeps none and RMSProp one, so the count is then an
    upper bound).
    """

    build: Callable[[Any, OptimizerConfig], keras.optimizers.Optimizer]
    slots: int


TABLE: dict[str, Spec] = {
    "sgd_nesterov": Spec(
        lambda lr, c: keras.optimizers.SGD(lr, momentum=c.momentum, nesterov=True), slots=1),
    "sgd": Spec(lambda lr, c: keras.optimizers.SGD(lr, momentum=c.momentum), slots=1),
    "rmsprop": Spec(lambda lr, c: TF1RMSprop(lr, rho=c.rmsprop_decay, momentum=c.momentum,
                                             epsilon=c.epsilon), slots=2),
    "adam": Spec(lambda lr, c: keras.optimizers.Adam(lr, beta_1=c.momentum, epsilon=c.epsilon),
                 slots=2),
}


def slots(name: str) -> int:
    """Float32 copies of each weight the optimizer ``name`` keeps (its momentum, mean square...)."""
    return TABLE[name].slots


def build_optimizer(optimizer: OptimizerConfig, learning_rate, *,
                    mixed_precision: str = "none"):
    """The optimizer ``optimizer.name`` names, stepping with ``learning_rate`` (a number or a
    schedule); wrapped in a ``LossScaleOptimizer`` under ``mixed_float16``."""
    opt = TABLE[optimizer.name].build(learning_rate, optimizer)
    if mixed_precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt
