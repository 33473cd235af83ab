"""The ResNet, ResNeXt and Wide-ResNet families: their registered objects (:mod:`sat_tf.families`).

Each object answers what differs between families: the names it takes, its default image size,
its stems and total stride, its default rates (no dropout, no stochastic depth), how it builds
its features (Keras is imported only then), and two closed-form readings of the model
:func:`sat_tf.models.build_model` makes: its trainable parameters and the float elements of its
layer outputs per example (:mod:`sat_tf.memory`). Nothing here imports TensorFlow.
"""
from __future__ import annotations

import math
import re

from sat_tf.resnet.architecture import (
    RESNET_STAGES, STAGE_STRIDES, STEM_FILTERS, STEM_STRIDE, WRN_STAGE_STRIDES, WRN_STEM_FILTERS,
    Block, resnet_blocks, wrn_blocks)

IMAGENET_IMAGE_SIZE = 224
CIFAR_IMAGE_SIZE = 32
CIFAR_STEM_MAX_IMAGE_SIZE = 64   # stem None: the CIFAR stem up to this image size
BN_WEIGHTS = 2                   # trainable per channel: gamma and beta
RESNEXT_DEPTHS = (50, 101, 152)
RESNEXT_WIDTHS = ("32x4d", "32x8d")   # cardinality x bottleneck width


class ResNet:
    """ResNet v1.5, "resnet-<depth>": post-activation, with the ImageNet or the CIFAR stem."""

    name = "resnet"
    depths = tuple(RESNET_STAGES)
    names_help = ", ".join(f"resnet-{d}" for d in depths)
    stems = ("imagenet", "cifar")
    stochastic_depth = False

    def parse(self, key: str) -> dict | None:
        m = re.fullmatch(r"resnet-?(\d+)", key)
        if m and int(m.group(1)) in self.depths:
            return {"depth": int(m.group(1))}
        return None

    def canonical_name(self, args: dict) -> str:
        return f"resnet-{args['depth']}"

    def blocks(self, args: dict) -> list[Block]:
        return resnet_blocks(args["depth"])

    def default_image_size(self, args: dict, stem: str | None) -> int:
        return CIFAR_IMAGE_SIZE if stem == "cifar" else IMAGENET_IMAGE_SIZE

    def resolve_stem(self, stem: str | None, image_size: int) -> str:
        if stem is not None:
            return stem
        return "cifar" if image_size <= CIFAR_STEM_MAX_IMAGE_SIZE else "imagenet"

    def total_stride(self, args: dict, stem: str) -> int:
        return STEM_STRIDE[stem] * math.prod(STAGE_STRIDES)

    def default_dropout_rate(self, args: dict) -> float:
        return 0.0

    def default_drop_connect_rate(self, args: dict) -> float:
        return 0.0

    def features(self, x, spec):
        from sat_tf.resnet import model
        return model.resnet_features(x, self.blocks(spec.args), stem=spec.stem,
                                     activation=spec.activation, bn_momentum=spec.bn_momentum,
                                     bn_epsilon=spec.bn_epsilon)

    def logits_initializer(self):
        from sat_tf.resnet import model
        return model.resnet_logits_init()

    def count_params(self, args: dict, stem: str, num_classes: int, *,
                     weights_per_activation: int = 0) -> int:
        k = 7 if stem == "imagenet" else 3
        total = k * k * 3 * STEM_FILTERS + BN_WEIGHTS * STEM_FILTERS
        sites = 1
        blocks = self.blocks(args)
        for b in blocks:
            if b.kind == "basic":
                total += 9 * b.in_filters * b.width + BN_WEIGHTS * b.width
                total += 9 * b.width * b.out_filters + BN_WEIGHTS * b.out_filters
                sites += 2
            else:
                total += b.in_filters * b.width + BN_WEIGHTS * b.width
                total += 9 * (b.width // b.groups) * b.width + BN_WEIGHTS * b.width
                total += b.width * b.out_filters + BN_WEIGHTS * b.out_filters
                sites += 3
            if b.projection:
                total += b.in_filters * b.out_filters + BN_WEIGHTS * b.out_filters
        total += blocks[-1].out_filters * num_classes + num_classes
        return total + weights_per_activation * sites

    def activation_elements(self, args: dict, image_size: int, stem: str,
                            num_classes: int) -> int:
        size, c = image_size, STEM_FILTERS
        total = size * size * 3                                   # input scaling
        if stem == "imagenet":
            total += (size + 6) ** 2 * 3                          # explicit padding of the 7x7/2
            size = math.ceil(size / 2)
            total += 3 * size * size * c                          # conv, bn, act
            size = math.ceil(size / 2)
            total += size * size * c                              # max-pool
        else:
            total += 3 * size * size * c                          # conv, bn, act
        blocks = self.blocks(args)
        for b in blocks:
            out = math.ceil(size / b.stride)
            if b.projection:
                total += 2 * out * out * b.out_filters            # 1x1 conv (no padding), bn
            if b.kind == "basic":
                if b.stride > 1:
                    total += (size + 2) ** 2 * b.in_filters       # padding of the strided 3x3
                total += 3 * out * out * b.width                  # conv1, bn1, act1
                total += 2 * out * out * b.out_filters            # conv2, bn2
            else:
                total += 3 * size * size * b.width                # 1x1 conv1, bn1, act1
                if b.stride > 1:
                    total += (size + 2) ** 2 * b.width            # padding of the strided 3x3
                total += 3 * out * out * b.width                  # conv2, bn2, act2
                total += 2 * out * out * b.out_filters            # 1x1 conv3, bn3
            total += 2 * out * out * b.out_filters                # add, act
            size = out
        return total + blocks[-1].out_filters + num_classes       # pooling, logits


class ResNeXt(ResNet):
    """ResNeXt, "resnext-<depth>-<cardinality>x<bottleneck width>d": a ResNet whose bottleneck
    3x3 convolutions are grouped."""

    name = "resnext"
    depths = RESNEXT_DEPTHS
    widths = RESNEXT_WIDTHS
    names_help = ", ".join(f"resnext-{d}-{w}" for d in RESNEXT_DEPTHS for w in RESNEXT_WIDTHS)

    def parse(self, key: str) -> dict | None:
        m = re.fullmatch(r"resnext-?(\d+)-(\d+)x(\d+)d", key)
        if m and int(m.group(1)) in self.depths and f"{m.group(2)}x{m.group(3)}d" in self.widths:
            return {"depth": int(m.group(1)), "cardinality": int(m.group(2)),
                    "bottleneck_width": int(m.group(3))}
        return None

    def canonical_name(self, args: dict) -> str:
        return f"resnext-{args['depth']}-{args['cardinality']}x{args['bottleneck_width']}d"

    def blocks(self, args: dict) -> list[Block]:
        return resnet_blocks(args["depth"], args["cardinality"], args["bottleneck_width"])


class WideResNet:
    """Wide-ResNet, "wrn-<depth>-<width>" with depth = 6n + 4: pre-activation, the CIFAR stem
    only (so its resolved stem is None)."""

    name = "wrn"
    names_help = "wrn-<depth>-<width> with depth = 6n+4 (e.g. wrn-28-10, wrn-34-10)"
    stems = ("cifar",)
    stochastic_depth = False

    def parse(self, key: str) -> dict | None:
        m = re.fullmatch(r"wrn-?(\d+)-(\d+)", key)
        if m and int(m.group(1)) >= 10 and (int(m.group(1)) - 4) % 6 == 0 and int(m.group(2)) >= 1:
            return {"depth": int(m.group(1)), "width": int(m.group(2))}
        return None

    def canonical_name(self, args: dict) -> str:
        return f"wrn-{args['depth']}-{args['width']}"

    def blocks(self, args: dict) -> list[Block]:
        return wrn_blocks(args["depth"], args["width"])

    def default_image_size(self, args: dict, stem: str | None) -> int:
        return CIFAR_IMAGE_SIZE

    def resolve_stem(self, stem: str | None, image_size: int) -> None:
        return None

    def total_stride(self, args: dict, stem: None) -> int:
        return math.prod(WRN_STAGE_STRIDES)

    def default_dropout_rate(self, args: dict) -> float:
        return 0.0

    def default_drop_connect_rate(self, args: dict) -> float:
        return 0.0

    def features(self, x, spec):
        from sat_tf.resnet import model
        return model.wrn_features(x, self.blocks(spec.args), activation=spec.activation,
                                  bn_momentum=spec.bn_momentum, bn_epsilon=spec.bn_epsilon)

    def logits_initializer(self):
        from sat_tf.resnet import model
        return model.wrn_logits_init()

    def count_params(self, args: dict, stem: None, num_classes: int, *,
                     weights_per_activation: int = 0) -> int:
        total = 3 * 3 * 3 * WRN_STEM_FILTERS                      # the stem conv has no BN
        sites = 0
        blocks = self.blocks(args)
        for b in blocks:
            total += BN_WEIGHTS * b.in_filters + 9 * b.in_filters * b.width
            total += BN_WEIGHTS * b.width + 9 * b.width * b.out_filters
            sites += 2
            if b.projection:
                total += b.in_filters * b.out_filters
        last = blocks[-1].out_filters
        total += BN_WEIGHTS * last + last * num_classes + num_classes   # final BN, logits
        return total + weights_per_activation * (sites + 1)

    def activation_elements(self, args: dict, image_size: int, stem: None,
                            num_classes: int) -> int:
        size = image_size
        total = size * size * 3 + size * size * WRN_STEM_FILTERS   # scaling, conv
        blocks = self.blocks(args)
        for b in blocks:
            out = math.ceil(size / b.stride)
            total += 2 * size * size * b.in_filters               # bn1, act1
            if b.projection:
                total += out * out * b.out_filters                # 1x1 conv shortcut
            if b.stride > 1:
                total += (size + 2) ** 2 * b.in_filters           # padding of the strided 3x3
            total += 3 * out * out * b.width                      # conv1, bn2, act2
            total += 2 * out * out * b.out_filters                # conv2, add
            size = out
        last = blocks[-1].out_filters
        return total + 2 * size * size * last + last + num_classes   # bn, act, pooling, logits


RESNET = ResNet()
RESNEXT = ResNeXt()
WRN = WideResNet()
