"""ResNet, ResNeXt and Wide-ResNet as data: stage tables and a flat list of blocks. Nothing here
imports TensorFlow; :mod:`sat_tf.resnet.family` reads these (names, defaults, exact counts) and
:mod:`sat_tf.resnet.model` turns them into layers.

ResNet / ResNeXt (v1.5, post-activation, as in the TPU reference and the tensorpack code
the SAT authors started from): the stride sits on the 3x3 convolution; a block projects its
shortcut (1x1 conv + BN) only when its output shape differs from its input's, which for
bottleneck networks is the first block of every stage (so the counts equal torchvision's).

Wide-ResNet (Zagoruyko & Komodakis 2016; the WideResNet used for CIFAR adversarial training by
TRADES and most work since): pre-activation basic blocks (BN-act-conv3x3-BN-act-conv3x3),
widths 16k, 32k, 64k, a 1x1 convolution shortcut where the width changes, applied to the
pre-activated input; a final BN-act before pooling.
"""
from __future__ import annotations

import dataclasses

RESNET_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
STAGE_FILTERS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
BOTTLENECK_EXPANSION = 4

STEM_FILTERS = 64
# Downsampling of the stem: imagenet, a 7x7/2 conv and a 3x3/2 max-pool; cifar, a 3x3/1 conv.
STEM_STRIDE = {"imagenet": 4, "cifar": 1}

WRN_STAGE_FILTERS = (16, 32, 64)
WRN_STAGE_STRIDES = (1, 2, 2)
WRN_STEM_FILTERS = 16     # a 3x3/1 conv


@dataclasses.dataclass(frozen=True)
class Block:
    """One residual block.

    kind: "basic" (two 3x3), "bottleneck" (1x1, grouped 3x3, 1x1) or "preact" (WRN basic).
    stage, index: 1-based position (stage 1 is the first stage after the stem).
    width: filters of the inner convolutions; out_filters: the block's output filters.
    """
    kind: str
    stage: int
    index: int
    in_filters: int
    width: int
    out_filters: int
    stride: int
    groups: int = 1

    @property
    def projection(self) -> bool:
        return self.stride != 1 or self.in_filters != self.out_filters


def resnet_blocks(depth: int, cardinality: int = 1, bottleneck_width: int = 64) -> list[Block]:
    """Every block of ResNet-``depth`` (ResNeXt when cardinality > 1), in order.

    For a bottleneck, the inner width of a stage with ``f`` base filters is
    ``f * bottleneck_width / 64 * cardinality`` (ResNeXt-50-32x4d: 128 in stage 1).
    """
    kind, counts = RESNET_STAGES[depth]
    if kind == "basic" and (cardinality, bottleneck_width) != (1, 64):
        raise ValueError(f"ResNet-{depth} has basic blocks; it cannot be a ResNeXt.")
    out, in_filters = [], STEM_FILTERS
    for stage, (count, filters, stride) in enumerate(zip(counts, STAGE_FILTERS, STAGE_STRIDES)):
        if kind == "basic":
            width, out_filters = filters, filters
        else:
            width = filters * bottleneck_width // 64 * cardinality
            out_filters = filters * BOTTLENECK_EXPANSION
        for i in range(count):
            out.append(Block(kind, stage + 1, i + 1, in_filters, width, out_filters,
                             stride if i == 0 else 1, cardinality))
            in_filters = out_filters
    return out


def wrn_blocks(depth: int, width: int) -> list[Block]:
    """Every block of WRN-``depth``-``width`` ((depth - 4) / 6 blocks per stage)."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"Invalid Wide-ResNet depth {depth!r}; it must be 6n + 4 >= 10.")
    n = (depth - 4) // 6
    out, in_filters = [], WRN_STEM_FILTERS
    for stage, (filters, stride) in enumerate(zip(WRN_STAGE_FILTERS, WRN_STAGE_STRIDES)):
        for i in range(n):
            out.append(Block("preact", stage + 1, i + 1, in_filters, filters * width,
                             filters * width, stride if i == 0 else 1))
            in_filters = filters * width
    return out
