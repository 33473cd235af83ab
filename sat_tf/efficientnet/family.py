"""The EfficientNet family: its registered object (:mod:`sat_tf.families`).

It answers what differs between families: the names it takes (B0-B8, L1, L2), its default image
size, dropout and stochastic-depth rate (from the scaling table), its total stride (no stem
choice), how it builds its features (Keras is imported only then), and two closed-form readings
of the model :func:`sat_tf.models.build_model` makes: its trainable parameters and the float
elements of its layer outputs per example (:mod:`sat_tf.memory`). Nothing here imports
TensorFlow.
"""
from __future__ import annotations

import math
import re

from sat_tf.efficientnet.architecture import (
    DROP_CONNECT_RATE, HEAD_FILTERS, PARAMS, STEM_FILTERS, TOTAL_STRIDE, blocks,
    drop_connect_rates, round_filters)

BN_WEIGHTS = 2   # trainable per channel: gamma and beta


class EfficientNet:
    """EfficientNet, "efficientnet-<variant>": the B0 blocks scaled by the variant's row of the
    scaling table."""

    name = "efficientnet"
    variants = tuple(PARAMS)
    names_help = ", ".join(f"efficientnet-{v}" for v in variants)
    stems = ()
    stochastic_depth = True

    def parse(self, key: str) -> dict | None:
        m = re.fullmatch(r"efficientnet-?([bl]\d)", key)
        if m and m.group(1) in self.variants:
            return {"variant": m.group(1)}
        return None

    def canonical_name(self, args: dict) -> str:
        return f"efficientnet-{args['variant']}"

    def default_image_size(self, args: dict, stem: None) -> int:
        return PARAMS[args["variant"]].image_size

    def resolve_stem(self, stem: None, image_size: int) -> None:
        return None

    def total_stride(self, args: dict, stem: None) -> int:
        return TOTAL_STRIDE

    def default_dropout_rate(self, args: dict) -> float:
        return PARAMS[args["variant"]].dropout_rate

    def default_drop_connect_rate(self, args: dict) -> float:
        return DROP_CONNECT_RATE

    def features(self, x, spec):
        from sat_tf.efficientnet import model
        return model.efficientnet_features(
            x, spec.args["variant"], activation=spec.activation, bn_momentum=spec.bn_momentum,
            bn_epsilon=spec.bn_epsilon, drop_connect_rate=spec.drop_connect_rate)

    def logits_initializer(self):
        from sat_tf.efficientnet import model
        return model.logits_init()

    def count_params(self, args: dict, stem: None, num_classes: int, *,
                     weights_per_activation: int = 0) -> int:
        width = PARAMS[args["variant"]].width
        stem_filters = round_filters(STEM_FILTERS, width)
        head = round_filters(HEAD_FILTERS, width)
        total = 3 * 3 * 3 * stem_filters + BN_WEIGHTS * stem_filters
        sites = 1
        mbconvs = blocks(args["variant"])
        for b in mbconvs:
            e = b.expanded_filters
            if b.expand_ratio != 1:
                total += b.input_filters * e + BN_WEIGHTS * e
                sites += 1
            total += b.kernel_size * b.kernel_size * e + BN_WEIGHTS * e
            sites += 1
            if b.se_ratio:
                s = b.se_filters
                total += (e * s + s) + (s * e + e)
                sites += 1
            total += e * b.output_filters + BN_WEIGHTS * b.output_filters
        total += mbconvs[-1].output_filters * head + BN_WEIGHTS * head
        sites += 1
        total += head * num_classes + num_classes
        return total + weights_per_activation * sites

    def activation_elements(self, args: dict, image_size: int, stem: None,
                            num_classes: int) -> int:
        p = PARAMS[args["variant"]]
        mbconvs = blocks(args["variant"])
        size = image_size
        total = size * size * 3                                   # input scaling
        size = math.ceil(size / 2)
        total += 3 * size * size * round_filters(STEM_FILTERS, p.width)   # conv, bn, act
        for b, rate in zip(mbconvs, drop_connect_rates(len(mbconvs))):
            e = b.expanded_filters
            if b.expand_ratio != 1:
                total += 3 * size * size * e                      # expand conv, bn, act
            size = math.ceil(size / b.strides)
            total += 3 * size * size * e                          # depthwise conv, bn, act
            if b.se_ratio:
                s = b.se_filters
                total += e + 2 * s + 2 * e                        # squeeze, reduce, act, expand, gate
                total += size * size * e                          # excite (multiply)
            total += 2 * size * size * b.output_filters           # project conv, bn
            if b.has_skip:
                total += (2 if rate > 0 else 1) * size * size * b.output_filters   # [drop,] add
        head = round_filters(HEAD_FILTERS, p.width)
        total += 3 * size * size * head                           # head conv, bn, act
        dropout = head if p.dropout_rate > 0 else 0
        return total + head + dropout + num_classes               # pooling, dropout, logits


EFFICIENTNET = EfficientNet()
