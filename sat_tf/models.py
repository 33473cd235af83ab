"""The model factory: a model name and an activation -> a Keras 3 functional model.

Every model takes float32 NHWC pixels in [0, 255] (input "images"), scales them itself as its
first layer, and returns float32 logits, also under the ``mixed_bfloat16`` policy. Every
nonlinearity is a :class:`sat_tf.activations.Activation`, so a backward rule (Table 1) entered
by an attack or a train step applies to all of them.

    model = build_model("resnet-50", activation="silu")
    model = build_model("wrn-34-10", activation="gelu", num_classes=10)      # 32x32, CIFAR stem
    model = build_model("efficientnet-l1", activation="silu")                # 600x600

Families and what the names mean are in :mod:`sat_tf.names`; the architectures, as data, in
:mod:`sat_tf.resnet` and :mod:`sat_tf.efficientnet`.
"""
from __future__ import annotations

import dataclasses
import numbers

import keras
from keras import layers

from sat_tf import efficientnet, names, resnet
from sat_tf.config import NORMALIZATIONS, STEMS, ModelConfig
from sat_tf.efficientnet import model as efficientnet_model
from sat_tf.resnet import model as resnet_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_IMAGE_SIZE = 224
CIFAR_IMAGE_SIZE = 32
CIFAR_STEM_MAX_IMAGE_SIZE = 64   # stem=None: the CIFAR stem up to this image size


@dataclasses.dataclass(frozen=True)
class Spec:
    """Validated arguments of :func:`build_model`, defaults filled in."""
    name: str                 # canonical model name, e.g. "resnext-50-32x4d"
    family: str               # "resnet", "resnext", "wrn" or "efficientnet"
    args: dict
    activation: str
    num_classes: int
    image_size: int
    normalization: str
    stem: str | None          # ResNet / ResNeXt: "imagenet" or "cifar"; otherwise None
    bn_momentum: float
    bn_epsilon: float
    dropout_rate: float
    drop_connect_rate: float  # EfficientNet only (0 for the others)


def default_image_size(name: str) -> int:
    """The image size ``name`` is built for by default: 224 (ResNet, ResNeXt; ImageNet stem),
    32 (Wide-ResNet), the scaling table's (EfficientNet)."""
    family, args = names.model(name)
    if family == "efficientnet":
        return efficientnet.PARAMS[args["variant"]].image_size
    if family == "wrn":
        return CIFAR_IMAGE_SIZE
    return RESNET_IMAGE_SIZE


def _rate(what: str, value) -> None:
    if not (isinstance(value, numbers.Real) and 0.0 <= value < 1.0):
        raise ValueError(f"Invalid {what} {value!r}; it must be in [0, 1).")


def resolve(name: str, activation: str = "relu", num_classes: int = 1000,
            image_size: int | None = None, normalization: str = "sat", stem: str | None = None,
            bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
            dropout_rate: float | None = None, drop_connect_rate: float | None = None) -> Spec:
    """Checks every argument of :func:`build_model` (one-line ValueErrors) and fills defaults."""
    family, args = names.model(name)
    canonical = names.canonical_name(family, args)
    activation = names.activation(activation)
    if (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
            or num_classes <= 0):
        raise ValueError(f"Invalid num_classes {num_classes!r}; it must be a positive integer.")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"Invalid normalization {normalization!r}; valid choices: "
                         f"{', '.join(NORMALIZATIONS)}.")
    if stem is not None and stem not in STEMS:
        raise ValueError(f"Invalid stem {stem!r}; valid choices: {', '.join(STEMS)} "
                         "(or None: CIFAR stem up to 64x64 images, else ImageNet stem).")
    if family == "efficientnet" and stem is not None:
        raise ValueError(f"Invalid stem {stem!r} for {canonical}; only ResNet / ResNeXt models "
                         "take a stem (use None).")
    if family == "wrn" and stem not in (None, "cifar"):
        raise ValueError(f"Invalid stem {stem!r} for {canonical}; Wide-ResNets have only the "
                         "CIFAR stem (use None or 'cifar').")
    if image_size is None:
        image_size = CIFAR_IMAGE_SIZE if stem == "cifar" else default_image_size(canonical)
    if (isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral)
            or image_size <= 0):
        raise ValueError(f"Invalid image_size {image_size!r}; it must be a positive integer.")
    if family in ("resnet", "resnext"):
        if stem is None:
            stem = "cifar" if image_size <= CIFAR_STEM_MAX_IMAGE_SIZE else "imagenet"
        stride = resnet.total_stride(family, stem)
    elif family == "wrn":
        stem = None
        stride = resnet.total_stride(family)
    else:
        stride = efficientnet.TOTAL_STRIDE
    if image_size < stride:
        raise ValueError(f"Invalid image_size {image_size!r} for {canonical}"
                         f"{f' ({stem} stem)' if stem else ''}: its total stride is {stride}, "
                         f"so images must be at least {stride}x{stride}.")
    if not (isinstance(bn_momentum, numbers.Real) and 0.0 <= bn_momentum < 1.0):
        raise ValueError(f"Invalid bn_momentum {bn_momentum!r}; it must be in [0, 1).")
    if not (isinstance(bn_epsilon, numbers.Real) and bn_epsilon > 0):
        raise ValueError(f"Invalid bn_epsilon {bn_epsilon!r}; it must be > 0.")
    if dropout_rate is None:
        dropout_rate = (efficientnet.PARAMS[args["variant"]].dropout_rate
                        if family == "efficientnet" else 0.0)
    _rate("dropout_rate", dropout_rate)
    if drop_connect_rate is None:
        drop_connect_rate = efficientnet.DROP_CONNECT_RATE if family == "efficientnet" else 0.0
    _rate("drop_connect_rate", drop_connect_rate)
    if family != "efficientnet" and drop_connect_rate:
        raise ValueError(f"Invalid drop_connect_rate {drop_connect_rate!r} for {canonical}; "
                         "stochastic depth is implemented for EfficientNet models only.")
    return Spec(canonical, family, args, activation, int(num_classes), int(image_size),
                normalization, stem, float(bn_momentum), float(bn_epsilon),
                float(dropout_rate), float(drop_connect_rate))


def _blocks(spec: Spec) -> list[resnet.Block]:
    if spec.family == "wrn":
        return resnet.wrn_blocks(spec.args["depth"], spec.args["width"])
    return resnet.resnet_blocks(spec.args["depth"], spec.args.get("cardinality", 1),
                                spec.args.get("bottleneck_width", 64))


def count_params(name: str, num_classes: int = 1000, activation: str = "relu",
                 **kwargs) -> int:
    """Trainable parameters of ``build_model(name, ...)``, in closed form (no TensorFlow work).

    smooth_relu adds one learnable beta per activation call site.
    """
    spec = resolve(name, activation, num_classes, **kwargs)
    per_site = 1 if spec.activation == "smooth_relu" else 0
    if spec.family == "efficientnet":
        return efficientnet.count_params(spec.args["variant"], spec.num_classes,
                                         weights_per_activation=per_site)
    return resnet.count_params(_blocks(spec), "wrn" if spec.family == "wrn" else spec.stem,
                               spec.num_classes, weights_per_activation=per_site)


def _scaling_layer(normalization: str) -> layers.Layer:
    """Pixels in [0, 255] -> the network's input range, in float32."""
    if normalization == "sat":
        scale, offset = 2.0 / 255.0, -1.0
    else:
        scale = [1.0 / (255.0 * s) for s in IMAGENET_STD]
        offset = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    return layers.Rescaling(scale, offset, dtype="float32", name=f"{normalization}_scaling")


def build_model(name: str, activation: str = "relu", num_classes: int = 1000,
                image_size: int | None = None, normalization: str = "sat",
                stem: str | None = None, bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
                dropout_rate: float | None = None,
                drop_connect_rate: float | None = None) -> keras.Model:
    """A functional model: float32 pixels (image_size, image_size, 3) in [0, 255] -> logits.

    Args:
      name: e.g. "resnet-50", "resnext-50-32x4d", "wrn-34-10", "efficientnet-b0"
        (:data:`sat_tf.names.MODEL_NAMES_HELP`).
      activation: any name in :data:`sat_tf.activations.ACTIVATIONS`; replaces ReLU everywhere.
      num_classes: size of the float32 logits.
      image_size: None: :func:`default_image_size` (32 for a ResNet with stem="cifar").
      normalization: "sat" (x * 2/255 - 1) or "imagenet" ((x/255 - mean) / std).
      stem: ResNet / ResNeXt: "imagenet" (7x7/2 conv, 3x3/2 max-pool) or "cifar" (3x3/1 conv);
        None: "cifar" for images up to 64x64, else "imagenet". Others: None.
      bn_momentum, bn_epsilon: every batch norm (SAT: 0.9 and 1e-5).
      dropout_rate: before the classifier. None: the EfficientNet table's, 0 for ResNets.
      drop_connect_rate: EfficientNet stochastic depth of the last block (block i of n gets
        rate * i / n). None: 0.2.
    """
    spec = resolve(name, activation, num_classes, image_size, normalization, stem,
                   bn_momentum, bn_epsilon, dropout_rate, drop_connect_rate)
    images = keras.Input((spec.image_size, spec.image_size, 3), dtype="float32", name="images")
    x = _scaling_layer(spec.normalization)(images)
    bn = dict(bn_momentum=spec.bn_momentum, bn_epsilon=spec.bn_epsilon)
    if spec.family == "efficientnet":
        features = efficientnet_model.efficientnet_features(
            x, spec.args["variant"], activation=spec.activation,
            drop_connect_rate=spec.drop_connect_rate, **bn)
        logits_init = efficientnet_model.logits_init()
    elif spec.family == "wrn":
        features = resnet_model.wrn_features(x, _blocks(spec), activation=spec.activation, **bn)
        logits_init = resnet_model.wrn_logits_init()
    else:
        features = resnet_model.resnet_features(x, _blocks(spec), stem=spec.stem,
                                                activation=spec.activation, **bn)
        logits_init = resnet_model.resnet_logits_init()
    if spec.dropout_rate:
        features = layers.Dropout(spec.dropout_rate, name="dropout")(features)
    # float32 even under a mixed-precision policy.
    logits = layers.Dense(spec.num_classes, kernel_initializer=logits_init, dtype="float32",
                          name="logits")(features)
    return keras.Model(images, logits, name=spec.name)


def build_model_from_config(model_cfg: ModelConfig, *, num_classes: int,
                            image_size: int | None) -> keras.Model:
    """:func:`build_model` from a :class:`sat_tf.config.ModelConfig`.

    ``num_classes`` and ``image_size`` (the dataset's) apply where the config leaves them None;
    other None fields take the model's defaults.
    """
    return build_model(
        model_cfg.name,
        activation=model_cfg.activation,
        num_classes=model_cfg.num_classes if model_cfg.num_classes is not None else num_classes,
        image_size=model_cfg.image_size if model_cfg.image_size is not None else image_size,
        normalization=model_cfg.normalization,
        stem=model_cfg.stem,
        bn_momentum=model_cfg.bn_momentum,
        bn_epsilon=model_cfg.bn_epsilon,
        dropout_rate=model_cfg.dropout_rate,
        drop_connect_rate=model_cfg.drop_connect_rate,
    )
