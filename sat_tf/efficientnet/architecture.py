"""EfficientNet as data: the B0 block strings, the scaling table, and small pure helpers.

Follows the TPU reference builder (tensorflow/tpu models/official/efficientnet): a block string
such as ``r2_k3_s22_e6_i16_o24_se0.25`` reads "2 repeats, 3x3 depthwise kernel, stride 2,
expansion 6, 16 input and 24 output filters, squeeze-and-excitation ratio 0.25". Width scaling
rounds filter counts with :func:`round_filters`; depth scaling rounds repeats up with
:func:`round_repeats`. Nothing here imports TensorFlow; :mod:`sat_tf.efficientnet.family` reads
these (names, defaults, exact counts) and :mod:`sat_tf.efficientnet.model` turns them into layers.
"""
from __future__ import annotations

import dataclasses
import math
import re

# The EfficientNet-B0 blocks; every variant scales these.
BLOCKS = (
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
)


@dataclasses.dataclass(frozen=True)
class Params:
    """One row of the scaling table."""
    width: float          # width coefficient (multiplies filter counts)
    depth: float          # depth coefficient (multiplies repeats)
    image_size: int       # the resolution the variant was designed for
    dropout_rate: float   # dropout before the classifier


PARAMS = {
    "b0": Params(1.0, 1.0, 224, 0.2),
    "b1": Params(1.0, 1.1, 240, 0.2),
    "b2": Params(1.1, 1.2, 260, 0.3),
    "b3": Params(1.2, 1.4, 300, 0.3),
    "b4": Params(1.4, 1.8, 380, 0.4),
    "b5": Params(1.6, 2.2, 456, 0.4),
    "b6": Params(1.8, 2.6, 528, 0.5),
    "b7": Params(2.0, 3.1, 600, 0.5),
    "b8": Params(2.2, 3.6, 672, 0.5),
    "l1": Params(3.9, 3.7, 600, 0.5),
    "l2": Params(4.3, 5.3, 800, 0.5),
}

DEPTH_DIVISOR = 8
STEM_FILTERS = 32
HEAD_FILTERS = 1280
DROP_CONNECT_RATE = 0.2   # stochastic depth of the last block; block i gets 0.2 * i / blocks
TOTAL_STRIDE = 32


@dataclasses.dataclass(frozen=True)
class BlockArgs:
    """One MBConv block (or, before expansion by :func:`blocks`, one row of repeats)."""
    kernel_size: int
    num_repeat: int
    input_filters: int
    output_filters: int
    expand_ratio: int
    strides: int
    se_ratio: float | None
    id_skip: bool = True

    @property
    def expanded_filters(self) -> int:
        return self.input_filters * self.expand_ratio

    @property
    def se_filters(self) -> int:
        """SE width: from the block's *input* filters, as the reference does."""
        return max(1, int(self.input_filters * self.se_ratio)) if self.se_ratio else 0

    @property
    def has_skip(self) -> bool:
        return self.id_skip and self.strides == 1 and self.input_filters == self.output_filters


def decode_block(string: str) -> BlockArgs:
    """Parses a block string such as ``r2_k3_s22_e6_i16_o24_se0.25``."""
    fields = {}
    for part in string.split("_"):
        if part == "noskip":
            fields["noskip"] = True
            continue
        m = re.fullmatch(r"([a-z]+)([\d.]+)", part)
        if not m:
            raise ValueError(f"Invalid EfficientNet block string {string!r} (part {part!r}).")
        fields[m.group(1)] = m.group(2)
    try:
        s = fields["s"]
        if len(s) != 2 or s[0] != s[1]:
            raise ValueError(f"Invalid EfficientNet block string {string!r}: strides {s!r} "
                             "must be two equal digits.")
        return BlockArgs(
            kernel_size=int(fields["k"]),
            num_repeat=int(fields["r"]),
            input_filters=int(fields["i"]),
            output_filters=int(fields["o"]),
            expand_ratio=int(fields["e"]),
            strides=int(s[0]),
            se_ratio=float(fields["se"]) if "se" in fields else None,
            id_skip="noskip" not in fields,
        )
    except KeyError as e:
        raise ValueError(f"Invalid EfficientNet block string {string!r}: missing {e}.") from None


def encode_block(b: BlockArgs) -> str:
    """The inverse of :func:`decode_block`."""
    parts = [f"r{b.num_repeat}", f"k{b.kernel_size}", f"s{b.strides}{b.strides}",
             f"e{b.expand_ratio}", f"i{b.input_filters}", f"o{b.output_filters}"]
    if b.se_ratio:
        parts.append(f"se{b.se_ratio:g}")
    if not b.id_skip:
        parts.append("noskip")
    return "_".join(parts)


def round_filters(filters: int, width: float, divisor: int = DEPTH_DIVISOR) -> int:
    """filters * width rounded to a multiple of ``divisor``, never below 90 % of it."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    """repeats * depth, rounded up."""
    return int(math.ceil(depth * repeats))


def stages(variant: str) -> list[list[BlockArgs]]:
    """The MBConv blocks of ``variant``, one list per row of :data:`BLOCKS` (num_repeat = 1).

    Filters are width-scaled and repeats depth-scaled. The first block of each row takes the
    row's stride and input filters; its repeats take stride 1 and the row's output filters.
    """
    p = PARAMS[variant]
    out = []
    for string in BLOCKS:
        row = decode_block(string)
        first = dataclasses.replace(
            row, num_repeat=1,
            input_filters=round_filters(row.input_filters, p.width),
            output_filters=round_filters(row.output_filters, p.width))
        rest = dataclasses.replace(first, input_filters=first.output_filters, strides=1)
        out.append([first] + [rest] * (round_repeats(row.num_repeat, p.depth) - 1))
    return out


def blocks(variant: str) -> list[BlockArgs]:
    """Every MBConv block of ``variant``, in order (the rows of :func:`stages`, flattened)."""
    return [b for stage in stages(variant) for b in stage]


def drop_connect_rates(num_blocks: int, rate: float = DROP_CONNECT_RATE) -> list[float]:
    """Stochastic-depth drop rate of each block: rate * index / blocks (the first is 0)."""
    return [rate * i / num_blocks for i in range(num_blocks)]
