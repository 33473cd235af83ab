"""The paper's training recipes as :class:`~sat_tf.config.TrainConfig` factories (DESIGN.md §5).

Pure data, no TensorFlow. ``base_learning_rate`` is per 256 images; the trainer scales it by
``global_batch_size / 256``.
"""
from __future__ import annotations

from sat_tf.config import TrainConfig


def resnet(*, global_batch_size: int = 1024, train_epochs: float = 100,
           decay_boundaries: tuple[float, ...] = (30.0, 60.0, 90.0), lr_schedule: str = "step",
           **overrides) -> TrainConfig:
    """ResNet: Nesterov momentum 0.9, LR 0.1 x batch/256, 5-epoch linear warm-up, /10 at the
    boundaries (30, 60, 90 of 100 in tensorpack; 30, 60, 80 of 90 on TPU), L2 1e-4 on the
    convolution and dense kernels only (the release's ".*/W"), label smoothing 0.1."""
    cfg = TrainConfig(
        global_batch_size=global_batch_size, train_epochs=train_epochs, optimizer="sgd_nesterov",
        momentum=0.9, base_learning_rate=0.1, lr_schedule=lr_schedule, warmup_epochs=5.0,
        decay_boundaries=tuple(decay_boundaries), decay_factor=0.1, weight_decay=1e-4,
        weight_decay_scope="kernels", label_smoothing=0.1, ema_decay=None)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def efficientnet(*, global_batch_size: int = 4096, train_epochs: float = 350,
                 ema_decay: float | None = None, **overrides) -> TrainConfig:
    """EfficientNet: RMSProp (decay 0.9, momentum 0.9, eps 1e-3), LR 0.016 x batch/256,
    5-epoch warm-up, x0.97 every 2.4 epochs, L2 1e-5 over every non-BN weight (the TPU code's
    ``tf.nn.l2_loss`` over trainable variables without "batch_normalization"), label smoothing 0.1,
    optional EMA 0.9999 (only "L1-Enhanced" used it)."""
    cfg = TrainConfig(
        global_batch_size=global_batch_size, train_epochs=train_epochs, optimizer="rmsprop",
        momentum=0.9, rmsprop_decay=0.9, optimizer_epsilon=1e-3, base_learning_rate=0.016,
        lr_schedule="exponential", warmup_epochs=5.0, decay_epochs=2.4, decay_rate=0.97,
        weight_decay=1e-5, weight_decay_scope="non_bn", label_smoothing=0.1,
        ema_decay=ema_decay)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def cifar(*, global_batch_size: int = 128, train_epochs: float | None = 110,
          train_steps: int | None = None, **overrides) -> TrainConfig:
    """The standard CIFAR-10 adversarial-training setting (Madry et al. / Rice et al.):
    SGD momentum 0.9, LR 0.1 x batch/128, /10 at epochs 100 and 105 of 110, L2 5e-4.
    (base_learning_rate is per 256 images, hence 0.2.)"""
    cfg = TrainConfig(
        global_batch_size=global_batch_size, train_epochs=None if train_steps else train_epochs,
        train_steps=train_steps, optimizer="sgd", momentum=0.9, base_learning_rate=0.2,
        lr_schedule="step", warmup_epochs=0.0, decay_boundaries=(100.0, 105.0), decay_factor=0.1,
        weight_decay=5e-4, label_smoothing=0.0, ema_decay=None)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg
