"""The model families, one registered object each: ResNet, ResNeXt, Wide-ResNet, EfficientNet.

A family object (:class:`Family`) holds everything that differs between families, so the rest of
sat-tf asks it instead of branching on the family's name: :mod:`sat_tf.names` checks a model's
arguments with it, :mod:`sat_tf.models` builds and counts with it, :mod:`sat_tf.memory`
estimates with it. The objects live next to their architectures (:mod:`sat_tf.resnet.family`,
:mod:`sat_tf.efficientnet.family`); this module registers them and parses model names.

Importable without TensorFlow: the command-line programs check ``--model`` before TensorFlow
starts. A family imports Keras only when it builds.
"""
from __future__ import annotations

from typing import Protocol

from sat_tf.efficientnet.family import EFFICIENTNET
from sat_tf.errors import UserError
from sat_tf.resnet.family import RESNET, RESNEXT, WRN


class Family(Protocol):
    """What sat-tf needs to know about one model family.

    ``args`` is the dict :meth:`parse` returned for a name of this family (its meaning is the
    family's own); ``stem`` is a resolved stem (:meth:`resolve_stem`) unless said otherwise.
    """

    name: str                  # the family's key: "resnet", "resnext", "wrn", "efficientnet"
    names_help: str            # the names it takes, for error messages and --help
    stems: tuple[str, ...]     # the stems one may ask for besides None (the default)
    stochastic_depth: bool     # whether a drop_connect_rate applies

    def parse(self, key: str) -> dict | None:
        """The arguments of ``key`` (a lower-case model name) if it names a model of this
        family, else None."""

    def canonical_name(self, args: dict) -> str:
        """The canonical name, e.g. "resnext-50-32x4d"."""

    def default_image_size(self, args: dict, stem: str | None) -> int:
        """The image size built when none is given; ``stem`` is the one asked for, or None."""

    def resolve_stem(self, stem: str | None, image_size: int) -> str | None:
        """The stem built for the stem asked for (None: the default) at ``image_size``; None
        for a family with no stem choice."""

    def total_stride(self, args: dict, stem: str | None) -> int:
        """How much the features downsample the input: the smallest image size."""

    def default_dropout_rate(self, args: dict) -> float:
        """The dropout rate before the classifier when none is given."""

    def default_drop_connect_rate(self, args: dict) -> float:
        """The stochastic-depth rate of the last block when none is given."""

    def features(self, x, spec):
        """Scaled images ``x`` -> pooled features, as Keras layers of ``spec`` (a
        :class:`sat_tf.models.Spec` of this family)."""

    def logits_initializer(self):
        """A new Keras initializer of the classifier's kernel."""

    def count_params(self, args: dict, stem: str | None, num_classes: int, *,
                     weights_per_activation: int = 0) -> int:
        """Trainable parameters of the built model, in closed form; ``weights_per_activation``
        is 1 for smooth_relu (one learnable beta per activation call site)."""

    def activation_elements(self, args: dict, image_size: int, stem: str | None,
                            num_classes: int) -> int:
        """Float elements of the layer outputs of one example's forward pass through the built
        model with the default rates, every layer counted once (not the input)."""


FAMILIES: dict[str, Family] = {f.name: f for f in (RESNET, RESNEXT, WRN, EFFICIENTNET)}
NAMES_HELP = ", ".join(f.names_help for f in FAMILIES.values())


def parse(name: str) -> tuple[Family, dict]:
    """The family and arguments of a model name (any case), or a one-line UserError listing
    the valid names."""
    key = str(name).lower().strip()
    for family in FAMILIES.values():
        args = family.parse(key)
        if args is not None:
            return family, args
    raise UserError(f"Unknown model {name!r}; valid models: {NAMES_HELP}.")
