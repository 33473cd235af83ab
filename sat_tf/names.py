"""The valid names of every choosable part, importable without TensorFlow.

Command-line programs validate their input against these before TensorFlow is imported, so
bad input fails in well under a second with a one-line error that lists the valid choices.
"""
from __future__ import annotations

import numbers

from sat_tf import families
from sat_tf.errors import UserError

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
        raise UserError(f"Unknown activation {name!r}; valid activations: {valid}.")
    return key


def backward_rule(name: str | None) -> str | None:
    """A canonical backward-rule name; None, '', 'none' and 'natural' mean the true derivative."""
    if name is None or str(name).lower() in ("", "none", "natural"):
        return None
    key = str(name).lower().replace("-", "_")
    key = ACTIVATION_ALIASES.get(key, key)
    if key not in BACKWARD_RULES:
        valid = ", ".join(("natural",) + BACKWARD_RULES)
        raise UserError(f"Unknown backward rule {name!r}; valid backward rules: {valid}.")
    return key


# ---- models (sat_tf.families registers the families; sat_tf.models builds them) -------------
MODEL_NAMES_HELP = families.NAMES_HELP
NORMALIZATIONS = ("sat", "imagenet")   # the input scaling: x*2/255-1, or ImageNet mean / std
IMAGENET_MEAN = (0.485, 0.456, 0.406)   # "imagenet": of pixels / 255, per RGB channel
IMAGENET_STD = (0.229, 0.224, 0.225)

_activation = activation   # check_model's argument of the same name hides it


def model(name: str) -> tuple[str, dict]:
    """Parses a model name into (family, arguments), or raises a one-line UserError.

    family is "resnet" (args depth), "resnext" (depth, cardinality, bottleneck_width),
    "wrn" (depth, width) or "efficientnet" (variant); ``sat_tf.families.FAMILIES[family]`` is
    its registered object.
    """
    family, args = families.parse(name)
    return family.name, args


def canonical_name(family: str, args: dict) -> str:
    """The canonical name of a parsed model name: "resnet-50", "resnext-50-32x4d",
    "wrn-34-10", "efficientnet-b0"."""
    return families.FAMILIES[family].canonical_name(args)


def check_model(name: str, activation: str = "relu", num_classes: int | None = None,
                image_size: int | None = None, normalization: str = "sat",
                stem: str | None = None, bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
                dropout_rate: float | None = None, drop_connect_rate: float | None = None) -> None:
    """Checks the arguments of :func:`sat_tf.models.build_model`, the one check of a model's
    arguments (a ``ModelConfig`` and ``build_model`` both call it).

    Raises a one-line UserError (a ValueError) naming the bad value and the valid choices.
    None is not checked: num_classes and image_size are then filled in later (a ModelConfig
    takes the dataset's), stem, dropout_rate and drop_connect_rate take the family's defaults.
    An image size must be at least the model's total stride with the stem it gets.
    """
    family, args = families.parse(name)
    canonical = family.canonical_name(args)
    _activation(activation)
    if num_classes is not None:
        _positive_integer("num_classes", num_classes)
    if normalization not in NORMALIZATIONS:
        raise UserError(f"Invalid normalization {normalization!r}; valid choices: "
                        f"{', '.join(NORMALIZATIONS)}.")
    if stem is not None and stem not in family.stems:
        raise UserError(f"Invalid stem {stem!r} for {canonical}; valid choices: "
                        f"{', '.join(family.stems + ('None',))}.")
    if image_size is not None:
        _positive_integer("image_size", image_size)
        built_stem = family.resolve_stem(stem, image_size)
        stride = family.total_stride(args, built_stem)
        if image_size < stride:
            raise UserError(f"Invalid image_size {image_size!r} for {canonical}"
                            f"{f' ({built_stem} stem)' if built_stem else ''}: its total stride "
                            f"is {stride}, so images must be at least {stride}x{stride}.")
    if not (isinstance(bn_momentum, numbers.Real) and 0.0 <= bn_momentum < 1.0):
        raise UserError(f"Invalid bn_momentum {bn_momentum!r}; it must be in [0, 1).")
    if (isinstance(bn_epsilon, bool) or not isinstance(bn_epsilon, numbers.Real)
            or not 0.0 < bn_epsilon < float("inf")):
        raise UserError(f"Invalid bn_epsilon {bn_epsilon!r}; it must be a finite number > 0.")
    for what, rate in (("dropout_rate", dropout_rate), ("drop_connect_rate", drop_connect_rate)):
        if rate is not None and not (isinstance(rate, numbers.Real) and 0.0 <= rate < 1.0):
            raise UserError(f"Invalid {what} {rate!r}; it must be in [0, 1).")
    if drop_connect_rate and not family.stochastic_depth:
        raise UserError(f"Invalid drop_connect_rate {drop_connect_rate!r} for {canonical}; it "
                        "has no stochastic depth (valid: 0 or None).")


def _positive_integer(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise UserError(f"Invalid {what} {value!r}; it must be a positive integer.")
