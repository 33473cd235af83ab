"""The valid names of every choosable part, importable without TensorFlow.

Command-line programs validate their input against these before TensorFlow is imported, so
bad input fails in well under a second with a one-line error that lists the valid choices.
"""
from __future__ import annotations

import re

# ---- activations (sat_tf.activations implements them) ---------------------------------------
ACTIVATIONS = (
    "relu",
    "softplus",
    "parametric_softplus",
    "silu",
    "gelu",
    "gelu_tanh",
    "elu",
    "celu",
    "mish",
    "smooth_relu",
)
ACTIVATION_ALIASES = {"swish": "silu"}
# Rules a backward pass may be switched to: every activation whose derivative is a function of
# x alone (smooth_relu's depends on its learnable beta).
BACKWARD_RULES = tuple(a for a in ACTIVATIONS if a != "smooth_relu")


def activation(name: str) -> str:
    """The canonical activation name, or a one-line ValueError listing the valid ones."""
    key = str(name).lower().replace("-", "_")
    key = ACTIVATION_ALIASES.get(key, key)
    if key not in ACTIVATIONS:
        valid = ", ".join(ACTIVATIONS + tuple(ACTIVATION_ALIASES))
        raise ValueError(f"Unknown activation {name!r}; valid activations: {valid}.")
    return key


def backward_rule(name: str | None) -> str | None:
    """A canonical backward-rule name; None, '', 'none' and 'natural' mean the true derivative."""
    if name is None or str(name).lower() in ("", "none", "natural"):
        return None
    key = str(name).lower().replace("-", "_")
    key = ACTIVATION_ALIASES.get(key, key)
    if key not in BACKWARD_RULES:
        valid = ", ".join(("natural",) + BACKWARD_RULES)
        raise ValueError(f"Unknown backward rule {name!r}; valid backward rules: {valid}.")
    return key


# ---- models (sat_tf.resnet / sat_tf.efficientnet implement them) -----------------------------
RESNET_DEPTHS = (18, 34, 50, 101, 152, 200)
RESNEXT_DEPTHS = (50, 101, 152)
RESNEXT_WIDTHS = ("32x4d", "32x8d")
EFFICIENTNET_VARIANTS = ("b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "l1", "l2")

MODEL_NAMES_HELP = (
    ", ".join(f"resnet-{d}" for d in RESNET_DEPTHS) + ", "
    + ", ".join(f"resnext-{d}-{w}" for d in RESNEXT_DEPTHS for w in RESNEXT_WIDTHS) + ", "
    + "wrn-<depth>-<width> with depth = 6n+4 (e.g. wrn-28-10, wrn-34-10), "
    + ", ".join(f"efficientnet-{v}" for v in EFFICIENTNET_VARIANTS)
)


def model(name: str) -> tuple[str, dict]:
    """Parses a model name into (family, arguments), or raises a one-line ValueError.

    family is "resnet" (args depth), "resnext" (depth, cardinality, bottleneck_width),
    "wrn" (depth, width) or "efficientnet" (variant).
    """
    key = str(name).lower().strip()
    m = re.fullmatch(r"resnet-?(\d+)", key)
    if m and int(m.group(1)) in RESNET_DEPTHS:
        return "resnet", {"depth": int(m.group(1))}
    m = re.fullmatch(r"resnext-?(\d+)-(\d+)x(\d+)d", key)
    if m and int(m.group(1)) in RESNEXT_DEPTHS and f"{m.group(2)}x{m.group(3)}d" in RESNEXT_WIDTHS:
        return "resnext", {"depth": int(m.group(1)), "cardinality": int(m.group(2)),
                           "bottleneck_width": int(m.group(3))}
    m = re.fullmatch(r"wrn-?(\d+)-(\d+)", key)
    if m and int(m.group(1)) >= 10 and (int(m.group(1)) - 4) % 6 == 0 and int(m.group(2)) >= 1:
        return "wrn", {"depth": int(m.group(1)), "width": int(m.group(2))}
    m = re.fullmatch(r"efficientnet-?([bl]\d)", key)
    if m and m.group(1) in EFFICIENTNET_VARIANTS:
        return "efficientnet", {"variant": m.group(1)}
    raise ValueError(f"Unknown model {name!r}; valid models: {MODEL_NAMES_HELP}.")


def canonical_name(family: str, args: dict) -> str:
    """The canonical name of a parsed model name: "resnet-50", "resnext-50-32x4d",
    "wrn-34-10", "efficientnet-b0"."""
    if family == "resnet":
        return f"resnet-{args['depth']}"
    if family == "resnext":
        return f"resnext-{args['depth']}-{args['cardinality']}x{args['bottleneck_width']}d"
    if family == "wrn":
        return f"wrn-{args['depth']}-{args['width']}"
    return f"efficientnet-{args['variant']}"
