"""The paper's training recipes (DESIGN.md §5): what is trained and how long, the optimizer and
the learning-rate schedule, as one :class:`Recipe` of config sections.

Pure data, no TensorFlow. ``base_learning_rate`` is per 256 images; the trainer scales it by
``global_batch_size / 256``.

    Experiment(model=..., **recipes.resnet().sections())
"""
from __future__ import annotations

import dataclasses

from sat_tf import names
from sat_tf.config import OptimizerConfig, ScheduleConfig, TrainConfig


@dataclasses.dataclass
class Recipe:
    train: TrainConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig

    def sections(self) -> dict:
        """The sections as :class:`~sat_tf.config.Experiment` keyword arguments."""
        return {"train": self.train, "optimizer": self.optimizer, "schedule": self.schedule}


def resnet(*, global_batch_size: int = 1024, train_epochs: float = 100,
           decay_boundaries: tuple[float, ...] = (30.0, 60.0, 90.0), lr_schedule: str = "step",
           optimizer_backward: str | None = None) -> Recipe:
    """ResNet: Nesterov momentum 0.9, LR 0.1 x batch/256, 5-epoch linear warm-up, /10 at the
    boundaries (30, 60, 90 of 100 in tensorpack; 30, 60, 80 of 90 on TPU), L2 1e-4 on the
    convolution and dense kernels only (the release's ".*/W"), label smoothing 0.1."""
    return Recipe(
        TrainConfig(global_batch_size=global_batch_size, train_epochs=train_epochs,
                    label_smoothing=0.1, ema_decay=None, optimizer_backward=optimizer_backward),
        OptimizerConfig(name="sgd_nesterov", momentum=0.9, weight_decay=1e-4,
                        weight_decay_scope="kernels"),
        ScheduleConfig(name=lr_schedule, base_learning_rate=0.1, warmup_epochs=5.0,
                       decay_boundaries=tuple(decay_boundaries), decay_factor=0.1))


def efficientnet(*, global_batch_size: int = 4096, train_epochs: float = 350,
                 ema_decay: float | None = None) -> Recipe:
    """EfficientNet: RMSProp (decay 0.9, momentum 0.9, eps 1e-3), LR 0.016 x batch/256,
    5-epoch warm-up, x0.97 every 2.4 epochs, L2 1e-5 over every non-BN weight (the TPU code's
    ``tf.nn.l2_loss`` over trainable variables without "batch_normalization"), label smoothing 0.1,
    optional EMA 0.9999 (only "L1-Enhanced" used it)."""
    return Recipe(
        TrainConfig(global_batch_size=global_batch_size, train_epochs=train_epochs,
                    label_smoothing=0.1, ema_decay=ema_decay),
        OptimizerConfig(name="rmsprop", momentum=0.9, rmsprop_decay=0.9, epsilon=1e-3,
                        weight_decay=1e-5, weight_decay_scope="non_bn"),
        ScheduleConfig(name="exponential", base_learning_rate=0.016, warmup_epochs=5.0,
                       decay_epochs=2.4, decay_rate=0.97))


def cifar(*, global_batch_size: int = 128, train_epochs: float | None = 110,
          train_steps: int | None = None, lr_schedule: str = "step",
          warmup_epochs: float = 0.0) -> Recipe:
    """The standard CIFAR-10 adversarial-training setting (Madry et al. / Rice et al.):
    SGD momentum 0.9, LR 0.1 x batch/128, /10 at epochs 100 and 105 of 110, L2 5e-4.
    (base_learning_rate is per 256 images, hence 0.2.)"""
    return Recipe(
        TrainConfig(global_batch_size=global_batch_size,
                    train_epochs=None if train_steps else train_epochs, train_steps=train_steps,
                    label_smoothing=0.0, ema_decay=None),
        OptimizerConfig(name="sgd", momentum=0.9, weight_decay=5e-4),
        ScheduleConfig(name=lr_schedule, base_learning_rate=0.2, warmup_epochs=warmup_epochs,
                       decay_boundaries=(100.0, 105.0), decay_factor=0.1))


# The recipe each model family trains with by default (keys: sat_tf.families.FAMILIES).
BY_FAMILY = {"resnet": resnet, "resnext": resnet, "wrn": resnet, "efficientnet": efficientnet}


def for_model(name: str) -> Recipe:
    """The paper's recipe for model ``name``: EfficientNet's for EfficientNets, else ResNet's."""
    family, _ = names.model(name)
    return BY_FAMILY[family]()
