"""Keras 3 builders for ResNet / ResNeXt (v1.5, post-activation) and Wide-ResNet (pre-activation).

The architecture comes from :mod:`sat_tf.resnet.architecture`; these functions only turn its
blocks into layers. Every nonlinearity is a :class:`sat_tf.activations.Activation`.
"""
from __future__ import annotations

import keras
from keras import layers

from sat_tf.activations import Activation
from sat_tf.batch_norm import BatchNormalization
from sat_tf.resnet.architecture import STEM_FILTERS, WRN_STEM_FILTERS, Block


def resnet_conv_init():
    """He fan-out, truncated normal: tensorpack's ``variance_scaling_initializer(2.0, 'fan_out')``."""
    return keras.initializers.VarianceScaling(2.0, "fan_out", "truncated_normal")


def wrn_conv_init():
    """He fan-out, normal: Zagoruyko & Komodakis' ``normal_(0, sqrt(2 / (k * k * out)))``."""
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def conv(x, filters, kernel_size, stride, name, *, init, groups=1):
    """A bias-free convolution; strided ones pad explicitly by (k - 1) // 2, k // 2 first."""
    if stride > 1 and kernel_size > 1:
        total = kernel_size - 1
        pad = (total // 2, total - total // 2)
        x = layers.ZeroPadding2D((pad, pad), name=f"{name}_pad")(x)
    padding = "same" if stride == 1 else "valid"
    return layers.Conv2D(filters, kernel_size, strides=stride, padding=padding, use_bias=False,
                         groups=groups, kernel_initializer=init(), name=name)(x)


def _bn(name, bn_momentum, bn_epsilon, zero_gamma=False):
    return BatchNormalization(
        momentum=bn_momentum, epsilon=bn_epsilon,
        gamma_initializer="zeros" if zero_gamma else "ones", name=name)


def resnet_logits_init():
    """The classifier's kernel: N(0, 0.01) (Goyal et al. 2017, as in the reference)."""
    return keras.initializers.RandomNormal(stddev=0.01)


def wrn_logits_init():
    """The classifier's kernel: PyTorch's nn.Linear default, U(+-1/sqrt(fan_in))."""
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


def resnet_features(x, blocks: list[Block], *, stem: str, activation: str,
                    bn_momentum: float, bn_epsilon: float):
    """Scaled images -> pooled features of a post-activation ResNet / ResNeXt."""

    def bn(name, zero_gamma=False):
        return _bn(name, bn_momentum, bn_epsilon, zero_gamma)

    def act(name):
        return Activation(activation, name=name)

    if stem == "imagenet":
        x = conv(x, STEM_FILTERS, 7, 2, "stem_conv", init=resnet_conv_init)
    else:
        x = conv(x, STEM_FILTERS, 3, 1, "stem_conv", init=resnet_conv_init)
    x = act("stem_act")(bn("stem_bn")(x))
    if stem == "imagenet":
        x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)

    for b in blocks:
        n = f"stage{b.stage}_block{b.index}"
        shortcut = x
        if b.projection:
            shortcut = conv(x, b.out_filters, 1, b.stride, f"{n}_proj_conv",
                            init=resnet_conv_init)
            shortcut = bn(f"{n}_proj_bn")(shortcut)
        if b.kind == "basic":
            y = conv(x, b.width, 3, b.stride, f"{n}_conv1", init=resnet_conv_init)
            y = act(f"{n}_act1")(bn(f"{n}_bn1")(y))
            y = conv(y, b.out_filters, 3, 1, f"{n}_conv2", init=resnet_conv_init)
            y = bn(f"{n}_bn2", zero_gamma=True)(y)
        else:
            y = conv(x, b.width, 1, 1, f"{n}_conv1", init=resnet_conv_init)
            y = act(f"{n}_act1")(bn(f"{n}_bn1")(y))
            y = conv(y, b.width, 3, b.stride, f"{n}_conv2", init=resnet_conv_init,
                     groups=b.groups)
            y = act(f"{n}_act2")(bn(f"{n}_bn2")(y))
            y = conv(y, b.out_filters, 1, 1, f"{n}_conv3", init=resnet_conv_init)
            y = bn(f"{n}_bn3", zero_gamma=True)(y)
        x = layers.Add(name=f"{n}_add")([shortcut, y])
        x = act(f"{n}_out")(x)
    return layers.GlobalAveragePooling2D(name="avg_pool")(x)


def wrn_features(x, blocks: list[Block], *, activation: str, bn_momentum: float,
                 bn_epsilon: float):
    """Scaled images -> pooled features of a pre-activation Wide-ResNet."""

    def bn(name):
        return _bn(name, bn_momentum, bn_epsilon)

    def act(name):
        return Activation(activation, name=name)

    x = conv(x, WRN_STEM_FILTERS, 3, 1, "stem_conv", init=wrn_conv_init)
    for b in blocks:
        n = f"stage{b.stage}_block{b.index}"
        pre = act(f"{n}_act1")(bn(f"{n}_bn1")(x))
        # Where the width changes, the shortcut is a 1x1 conv of the *pre-activated* input.
        shortcut = (conv(pre, b.out_filters, 1, b.stride, f"{n}_proj_conv", init=wrn_conv_init)
                    if b.projection else x)
        y = conv(pre, b.width, 3, b.stride, f"{n}_conv1", init=wrn_conv_init)
        y = act(f"{n}_act2")(bn(f"{n}_bn2")(y))
        y = conv(y, b.out_filters, 3, 1, f"{n}_conv2", init=wrn_conv_init)
        x = layers.Add(name=f"{n}_add")([shortcut, y])
    x = act("final_act")(bn("final_bn")(x))
    return layers.GlobalAveragePooling2D(name="avg_pool")(x)
