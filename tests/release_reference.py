"""Stand-in weights for the SAT release's checkpoints, the same wherever they are made.

The real checkpoints cannot be downloaded in CI. The tests instead make checkpoints with the
release's exact variables (``tests/data/sat_release/*.txt``, listed from the authors' own graph
code) and these values, and compare sat-tf's logits with the logits the authors' TF1 graph
computed from the same values (``tests/data/sat_release/*.npz``, made once by
``tests/data/sat_release/make_reference.py``). The values come from an integer hash of the
variable's name and the element's index, so they are bit-identical on any machine and any
NumPy; each kind of variable gets a range that keeps activations of order one through a
ResNet-50 in inference mode. Pure NumPy (the reference script runs it under TF 1 graphs).
"""
from __future__ import annotations

import re
import zlib

import numpy as np

EMA_SUFFIX = "/ExponentialMovingAverage"
_MASK = np.uint64(0xFFFFFFFF)


def read_variables(path) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) per line ``name [d0, d1, ...]`` of a variable list; ``#`` lines skipped."""
    out = []
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split(" ", 1)
        out.append((name, tuple(int(d) for d in re.findall(r"\d+", shape))))
    return out


def uniform(name: str, size: int) -> np.ndarray:
    """``size`` numbers in [0, 1) from the name's CRC-32 and a 32-bit integer mix."""
    h = (np.arange(size, dtype=np.uint64) * np.uint64(0x9E3779B1)
         + np.uint64(zlib.crc32(name.encode()))) & _MASK
    for _ in range(2):
        h ^= h >> np.uint64(16)
        h = (h * np.uint64(0x45D9F3B)) & _MASK
    h ^= h >> np.uint64(16)
    return h.astype(np.float64) / 2.0 ** 32


def kind(name: str) -> str:
    base = name[:-len(EMA_SUFFIX)] if name.endswith(EMA_SUFFIX) else name
    leaf = base.split("/")[-1]
    if leaf == "smoothrelu_beta":
        return "smoothrelu_beta"
    if base.endswith("conv3/bn/gamma"):
        return "residual_gamma"
    if leaf == "gamma":
        return "gamma"
    if leaf == "beta":
        return "beta"
    if base.endswith("mean/EMA") or leaf == "moving_mean":
        return "mean"
    if base.endswith("variance/EMA") or leaf == "moving_variance":
        return "variance"
    if base.endswith(("linear/W", "head/dense/kernel")):
        return "logits_kernel"
    if leaf in ("b", "bias"):
        return "bias"
    if leaf == "depthwise_kernel":
        return "depthwise_kernel"
    if leaf in ("W", "kernel"):
        return "kernel"
    raise ValueError(f"unclassified variable {name}")


def value(name: str, shape) -> np.ndarray:
    """The stand-in float32 value of variable ``name``."""
    shape = tuple(int(d) for d in shape)
    u = uniform(name, int(np.prod(shape)) if shape else 1).reshape(shape)
    k = kind(name)
    if k == "kernel":                 # HWIO (and grouped): fan-in = all but the last axis
        fan_in = int(np.prod(shape[:-1]))
        v = (2 * u - 1) * np.sqrt(6.0 / fan_in)
    elif k == "depthwise_kernel":     # [k, k, C, 1]: fan-in k * k
        v = (2 * u - 1) * np.sqrt(6.0 / (shape[0] * shape[1]))
    elif k == "logits_kernel":
        v = (2 * u - 1) * np.sqrt(3.0 / shape[0]) * 4.0
    elif k == "smoothrelu_beta":      # the learnt shape: alpha = beta**2 in [4, 36]
        v = 2.0 + 4.0 * u
    elif k == "gamma":
        v = 0.5 + u
    elif k == "residual_gamma":       # the branches added to a residual stream
        v = 0.1 + 0.3 * u
    elif k == "variance":
        v = 0.5 + u
    else:                             # beta, mean, bias
        v = (2 * u - 1) * 0.02
    return v.astype(np.float32)
