"""Keras 3 builder for EfficientNet (MBConv blocks with squeeze-and-excitation), TPU style.

The architecture comes from :mod:`sat_tf.efficientnet.architecture`; this function only turns
its blocks into layers. Every nonlinearity except the SE gate's sigmoid is a
:class:`sat_tf.activations.Activation`, inside SE too.
"""
from __future__ import annotations

import keras
from keras import layers

from sat_tf.activations import Activation
from sat_tf.batch_norm import BatchNormalization
from sat_tf.efficientnet.architecture import (
    HEAD_FILTERS, PARAMS, STEM_FILTERS, BlockArgs, drop_connect_rates, round_filters, stages)


def conv_init():
    """N(0, sqrt(2 / fan_out)), fan_out = k * k * out (k * k for depthwise), as the reference."""
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def logits_init():
    """U(+-1/sqrt(classes)), as the reference's dense_kernel_initializer."""
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_out", "uniform")


def efficientnet_features(x, variant: str, *, activation: str, bn_momentum: float,
                          bn_epsilon: float, drop_connect_rate: float):
    """Scaled images -> pooled features of EfficientNet-``variant``."""
    width = PARAMS[variant].width

    def bn(name):
        return BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon, name=name)

    def act(name):
        return Activation(activation, name=name)

    x = layers.Conv2D(round_filters(STEM_FILTERS, width), 3, strides=2, padding="same",
                      use_bias=False, kernel_initializer=conv_init(), name="stem_conv")(x)
    x = act("stem_act")(bn("stem_bn")(x))

    rows = stages(variant)
    rates = iter(drop_connect_rates(sum(len(r) for r in rows), drop_connect_rate))
    for s, row in enumerate(rows):
        for i, block in enumerate(row):
            x = mbconv(x, block, f"block{s + 1}_{i + 1}", drop_rate=next(rates), bn=bn, act=act)

    x = layers.Conv2D(round_filters(HEAD_FILTERS, width), 1, padding="same", use_bias=False,
                      kernel_initializer=conv_init(), name="head_conv")(x)
    x = act("head_act")(bn("head_bn")(x))
    return layers.GlobalAveragePooling2D(name="avg_pool")(x)


def mbconv(inputs, b: BlockArgs, name: str, *, drop_rate: float, bn, act):
    """Expand (1x1) -> depthwise -> squeeze-and-excite -> project (1x1) [-> drop -> + input]."""
    x = inputs
    filters = b.expanded_filters
    if b.expand_ratio != 1:
        x = layers.Conv2D(filters, 1, padding="same", use_bias=False,
                          kernel_initializer=conv_init(), name=f"{name}_expand_conv")(x)
        x = act(f"{name}_expand_act")(bn(f"{name}_expand_bn")(x))
    x = layers.DepthwiseConv2D(b.kernel_size, strides=b.strides, padding="same", use_bias=False,
                               depthwise_initializer=conv_init(), name=f"{name}_dwconv")(x)
    x = act(f"{name}_dw_act")(bn(f"{name}_dw_bn")(x))
    if b.se_ratio:
        s = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_se_squeeze")(x)
        s = layers.Conv2D(b.se_filters, 1, kernel_initializer=conv_init(),
                          name=f"{name}_se_reduce")(s)
        s = act(f"{name}_se_act")(s)
        s = layers.Conv2D(filters, 1, kernel_initializer=conv_init(), name=f"{name}_se_expand")(s)
        s = layers.Activation("sigmoid", name=f"{name}_se_gate")(s)
        x = layers.Multiply(name=f"{name}_se_excite")([x, s])
    x = layers.Conv2D(b.output_filters, 1, padding="same", use_bias=False,
                      kernel_initializer=conv_init(), name=f"{name}_project_conv")(x)
    x = bn(f"{name}_project_bn")(x)
    if b.has_skip:
        if drop_rate > 0:
            # Stochastic depth: drop the whole residual branch per example (off in inference).
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(x)
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x
