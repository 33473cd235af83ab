"""The model factory: a model name and an activation -> a Keras 3 functional model.

Every model takes float32 NHWC pixels in [0, 255] (input "images"), scales them itself as its
first layer, and returns float32 logits, also under the ``mixed_bfloat16`` policy. Every
nonlinearity is a :class:`sat_tf.activations.Activation`, so a backward rule (Table 1) entered
by an attack or a train step applies to all of them.

    model = build_model("resnet-50", activation="silu")
    model = build_model("wrn-34-10", activation="gelu", num_classes=10)      # 32x32, CIFAR stem
    model = build_model("efficientnet-l1", activation="silu")                # 600x600

This module adds what every model shares (input scaling, dropout, the classifier) and asks
the family's registered object (:mod:`sat_tf.families`) for the rest: defaults, features,
parameter count. The checks of the arguments are :func:`sat_tf.names.check_model`; the
architectures, as data, are in :mod:`sat_tf.resnet` and :mod:`sat_tf.efficientnet`.
"""
from __future__ import annotations

import dataclasses

import keras
from keras import layers

from sat_tf import families, names
from sat_tf.config import ModelConfig
from sat_tf.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = names.IMAGENET_MEAN, names.IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class Spec:
    """Validated arguments of :func:`build_model`, defaults filled in."""
    name: str                 # canonical model name, e.g. "resnext-50-32x4d"
    family: str               # "resnet", "resnext", "wrn" or "efficientnet" (families.FAMILIES)
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
    family, args = families.parse(name)
    return family.default_image_size(args, None)


def resolve(name: str, activation: str = "relu", num_classes: int = 1000,
            image_size: int | None = None, normalization: str = "sat", stem: str | None = None,
            bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
            dropout_rate: float | None = None, drop_connect_rate: float | None = None) -> Spec:
    """Checks every argument of :func:`build_model` (:func:`sat_tf.names.check_model`: one-line
    UserErrors) and fills in the family's defaults."""
    family, args = families.parse(name)
    if image_size is None:
        image_size = family.default_image_size(args, stem)
    names.check_model(name, activation, num_classes, image_size, normalization, stem,
                      bn_momentum, bn_epsilon, dropout_rate, drop_connect_rate)
    if num_classes is None:   # check_model leaves it to the dataset; a model needs it now
        raise UserError("Invalid num_classes None; it must be a positive integer.")
    if dropout_rate is None:
        dropout_rate = family.default_dropout_rate(args)
    if drop_connect_rate is None:
        drop_connect_rate = family.default_drop_connect_rate(args)
    return Spec(family.canonical_name(args), family.name, args, names.activation(activation),
                int(num_classes), int(image_size), normalization,
                family.resolve_stem(stem, image_size), float(bn_momentum), float(bn_epsilon),
                float(dropout_rate), float(drop_connect_rate))


def count_params(name: str, num_classes: int = 1000, activation: str = "relu",
                 **kwargs) -> int:
    """Trainable parameters of ``build_model(name, ...)``, in closed form (no TensorFlow work).

    smooth_relu adds one learnable beta per activation call site.
    """
    spec = resolve(name, activation, num_classes, **kwargs)
    return families.FAMILIES[spec.family].count_params(
        spec.args, spec.stem, spec.num_classes,
        weights_per_activation=1 if spec.activation == "smooth_relu" else 0)


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
    family = families.FAMILIES[spec.family]
    images = keras.Input((spec.image_size, spec.image_size, 3), dtype="float32", name="images")
    x = _scaling_layer(spec.normalization)(images)
    features = family.features(x, spec)
    # Before the dropout layer: initializers and dropout draw their seeds in creation order.
    logits_init = family.logits_initializer()
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
