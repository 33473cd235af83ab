"""Released weights -> a sat-tf run directory: the SAT authors' TF1 checkpoints and Keras'
EfficientNet weight files.

    record = import_checkpoint("sat-resnet", "Res50-silu/Res50-silu", "/runs/r50-silu",
                               activation="silu")

Sources (:data:`SOURCES`):

* ``sat-resnet``: the ResNet / ResNeXt checkpoints of cihangxie/SmoothAdversarialTraining
  (``ResNet/``: tensorpack names, e.g. ``group0/block0/conv1/W``, ``conv0/bn/mean/EMA``).
* ``sat-efficientnet``: its EfficientNet checkpoints (``EfficientNet/``: the TPU EfficientNet
  names, e.g. ``efficientnet-b0/blocks_1/tpu_batch_normalization_2/gamma``), raw or their
  ``/ExponentialMovingAverage`` shadows.
* ``keras-efficientnet``: ``keras.applications.EfficientNetB0 ... B7`` weight files (``.h5``,
  as Keras publishes them, or ``.weights.h5``).

A TF1 checkpoint is read with ``tf.train.load_checkpoint`` alone (no TF1 graph, no
tensorpack); a Keras file by Keras' own loader into ``keras.applications``' model. Every
weight of the sat-tf model is assigned exactly once, from the variable :data:`RELEASE_LAYERS`
names, with its shape checked; checkpoint variables nobody asked for are an error unless they
are training state (:data:`NOT_WEIGHTS`: optimizer slots, step counters, unchosen EMA shadows).
All of it is checked before anything is assigned, and a mismatch is one line naming the first
variables that failed. Layout differences are explicit transforms, each recorded:

* the release's EfficientNet batch-norm vectors are stored ``[1, 1, 1, 1, C]`` (its
  ``utils.py`` builds them so), SmoothReLU's beta ``[1]``: reshaped to sat-tf's ``[C]`` / ``[]``;
* the release's ResNet evaluation feeds BGR images (``cv2.imread``; its README numbers were
  measured so) while sat-tf models take RGB: with ``input_channels="bgr"`` (the default for
  ``sat-resnet``) the stem kernel's input channels are reversed, so the RGB model computes
  exactly what the release's graph computes on the BGR image;
* Keras' input normalisation layer becomes sat-tf's ``"imagenet"`` (or ``"sat"``) scaling, read
  from the file's values as Keras' own model applies them (:func:`keras_normalization`).

The run directory holds ``experiment.json`` (the paper's ImageNet protocol for the model, with
the release's own numbers as ``paper``), ``ckpt-0`` and ``import.json`` (what was read and how);
``run/eval.py`` and ``run/export.py`` use it as any run, ``run/train.py --init_from`` fine-tunes
from it. It is written in a scratch folder and renamed into place, so a failed import leaves no
half-written run (and the scratch folder of a killed one is deleted by the next import there).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
from typing import Callable

import numpy as np

from sat_tf import experiments, families, names, recipes
from sat_tf.config import DataConfig, Experiment, ModelConfig
from sat_tf.errors import UserError, check_choice, mismatch

IMPORT_FILE = "import.json"
SOURCES = ("sat-resnet", "sat-efficientnet", "keras-efficientnet")
INPUT_CHANNELS = ("bgr", "rgb")

# ---------------------------------------------------------------------------------------------
# The one table: where each weight of a sat-tf model lives in a release, as facts read from the
# reference code (SAT ResNet/resnet_model.py with tensorpack's Conv2D / BatchNorm /
# FullyConnected; the TPU efficientnet_model.py with tf.layers' default names, as the SAT
# EfficientNet/ folder builds it; keras.applications' efficientnet.py).
#
# Per source, rows (sat-tf layer, kind, release scope) for the stem, for every block and for the
# head; "{n}" is the sat-tf block prefix and "{B}" / "{K}" the release's, with the numbered
# names of a TPU block ("{dw_bn}", ...) filled in by :func:`_block_context`. A row whose sat-tf
# layer has no weights in the model built (no projection, no learnt activation shape) is skipped.
# The kind says how the layer's weights are named (:data:`WEIGHT_NAMES`).

RELEASE_LAYERS = {
    "sat-resnet": {
        "stem": (("stem_conv", "conv", "conv0"), ("stem_bn", "bn", "conv0"),
                 ("stem_act", "act", "conv0")),
        "block": (("{n}_conv1", "conv", "{B}/conv1"), ("{n}_bn1", "bn", "{B}/conv1"),
                  ("{n}_act1", "act", "{B}/conv1"),
                  ("{n}_conv2", "conv", "{B}/conv2"), ("{n}_bn2", "bn", "{B}/conv2"),
                  ("{n}_act2", "act", "{B}/conv2"),
                  ("{n}_conv3", "conv", "{B}/conv3"), ("{n}_bn3", "bn", "{B}/conv3"),
                  ("{n}_proj_conv", "conv", "{B}/convshortcut"),
                  ("{n}_proj_bn", "bn", "{B}/convshortcut"),
                  ("{n}_out", "act", "{B}")),
        "head": (("logits", "dense", "linear"),),
    },
    "sat-efficientnet": {
        "stem": (("stem_conv", "conv", "{P}/stem/conv2d"),
                 ("stem_bn", "bn", "{P}/stem/tpu_batch_normalization")),
        "block": (("{n}_expand_conv", "conv", "{B}/conv2d"),
                  ("{n}_expand_bn", "bn", "{B}/tpu_batch_normalization"),
                  ("{n}_dwconv", "dwconv", "{B}/depthwise_conv2d"),
                  ("{n}_dw_bn", "bn", "{B}/tpu_batch_normalization{dw_bn}"),
                  ("{n}_se_reduce", "conv_bias", "{B}/se/conv2d"),
                  ("{n}_se_expand", "conv_bias", "{B}/se/conv2d_1"),
                  ("{n}_project_conv", "conv", "{B}/conv2d{project}"),
                  ("{n}_project_bn", "bn", "{B}/tpu_batch_normalization{project_bn}")),
        "head": (("head_conv", "conv", "{P}/head/conv2d"),
                 ("head_bn", "bn", "{P}/head/tpu_batch_normalization"),
                 ("logits", "dense", "{P}/head/dense")),
    },
    "keras-efficientnet": {
        "stem": (("stem_conv", "keras", "stem_conv"), ("stem_bn", "keras", "stem_bn")),
        "block": (("{n}_expand_conv", "keras", "{K}expand_conv"),
                  ("{n}_expand_bn", "keras", "{K}expand_bn"),
                  ("{n}_dwconv", "keras", "{K}dwconv"), ("{n}_dw_bn", "keras", "{K}bn"),
                  ("{n}_se_reduce", "keras", "{K}se_reduce"),
                  ("{n}_se_expand", "keras", "{K}se_expand"),
                  ("{n}_project_conv", "keras", "{K}project_conv"),
                  ("{n}_project_bn", "keras", "{K}project_bn")),
        "head": (("head_conv", "keras", "top_conv"), ("head_bn", "keras", "top_bn"),
                 ("logits", "keras", "predictions")),
    },
}

# sat-tf weight name (Keras') -> the release's name under the layer's scope, per kind.
_TENSORPACK_BN = {"gamma": "bn/gamma", "beta": "bn/beta", "moving_mean": "bn/mean/EMA",
                  "moving_variance": "bn/variance/EMA"}
_TPU_BN = {w: w for w in ("gamma", "beta", "moving_mean", "moving_variance")}
WEIGHT_NAMES = {
    "sat-resnet": {"conv": {"kernel": "W"}, "bn": _TENSORPACK_BN,
                   "act": {"beta": "smoothrelu_beta"}, "dense": {"kernel": "W", "bias": "b"}},
    "sat-efficientnet": {"conv": {"kernel": "kernel"}, "conv_bias": {"kernel": "kernel",
                                                                     "bias": "bias"},
                         "dwconv": {"kernel": "depthwise_kernel"}, "bn": _TPU_BN,
                         "dense": {"kernel": "kernel", "bias": "bias"}},
    "keras-efficientnet": {"keras": None},   # the same names as sat-tf's (both Keras)
}

# Checkpoint variables that are training state, not weights: never an error when left over.
NOT_WEIGHTS = (
    ("optimizer slots", re.compile(r".*/(Momentum|RMSProp(_\d+)?|Adam(_\d+)?|Adagrad)$")),
    ("step counters and schedules",
     re.compile(r"^(global_step|learning_rate|beta[12]_power)$")),
    ("tensorpack's summary averages", re.compile(r"^EMA/")),
)
EMA_SUFFIX = "/ExponentialMovingAverage"

# The release's --activation-name values (SAT ResNet/resnet_model.py) -> sat-tf's: its "gelu"
# is the tanh approximation, its "smoothrelu" sat-tf's smooth_relu (the same learnt beta).
RELEASE_ACTIVATIONS = {"relu": "relu", "silu": "silu", "swish": "silu", "softplus": "softplus",
                       "elu": "elu", "gelu": "gelu_tanh", "smoothrelu": "smooth_relu",
                       "mish": "mish"}

# The release README's numbers (ImageNet validation top-1, %, PGD at epsilon 4, step 1):
# (model, activation, image size) -> (clean, PGD-10, PGD-20, PGD-50); EfficientNet: clean only.
RELEASE_RESULTS = {
    ("resnet-50", "relu", 224): (68.7, 35.3, 33.7, 33.1),
    ("resnet-50", "silu", 224): (69.7, 43.0, 42.2, 41.9),
    ("resnet-50", "elu", 224): (69.0, 41.6, 40.9, 40.7),
    ("resnet-50", "gelu_tanh", 224): (69.9, 42.6, 41.8, 41.5),
    ("resnet-50", "smooth_relu", 224): (69.3, 41.3, 40.4, 40.1),
    ("resnet-101", "silu", 224): (72.9, 46.4, 45.5, 45.2),
    ("resnet-152", "silu", 224): (74.0, 47.3, 46.2, 45.8),
    ("resnext-50-32x4d", "silu", 224): (71.1, 43.3, 42.5, 42.2),
    ("resnext-50-32x8d", "silu", 224): (73.3, 46.3, 45.2, 44.8),
    ("resnet-50", "silu", 299): (70.7, 44.6, 43.8, 43.6),
    ("resnet-50", "silu", 380): (71.6, 44.9, 44.1, 43.8),
    ("resnext-152-32x8d", "silu", 380): (78.0, 53.0, 51.7, 51.0),
    ("efficientnet-b0", "silu", "raw"): (65.2,), ("efficientnet-b1", "silu", "raw"): (68.6,),
    ("efficientnet-b2", "silu", "raw"): (70.3,), ("efficientnet-b3", "silu", "raw"): (73.1,),
    ("efficientnet-b4", "silu", "raw"): (75.9,), ("efficientnet-b5", "silu", "raw"): (77.8,),
    ("efficientnet-b6", "silu", "raw"): (79.2,), ("efficientnet-b7", "silu", "raw"): (79.8,),
    ("efficientnet-l1", "silu", "raw"): (80.7,),
    ("efficientnet-l1", "silu", "ema"): (82.2,),    # "L1-Enhanced"
}

# Keras' input normalisation (keras.applications efficientnet.py): its published ImageNet files
# hold the ImageNet standard deviations as the Normalization layer's *variance*, and
# EfficientNetBx(weights="imagenet") divides once more by their square roots.
IMAGENET_MEAN, IMAGENET_STD = names.IMAGENET_MEAN, names.IMAGENET_STD
KERAS_BN_MOMENTUM, KERAS_BN_EPSILON = 0.99, 1e-3
KERAS_VARIANTS = ("b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7")
RELEASE_BN_MOMENTUM, RELEASE_BN_EPSILON = 0.9, 1e-5   # tensorpack's; the EfficientNet README's


class MismatchError(UserError):
    """A checkpoint that does not fit the model it should become (one line)."""


# ---------------------------------------------------------------------------------------------
# What to build

@dataclasses.dataclass(frozen=True)
class Plan:
    """The sat-tf model a checkpoint becomes, and how its variables are read."""
    source: str
    model: str                  # canonical sat-tf model name
    activation: str
    num_classes: int
    image_size: int
    normalization: str          # "sat" or "imagenet"
    bn_momentum: float
    bn_epsilon: float
    weights: str                # "raw" or "ema"
    input_channels: str         # the release's input channel order ("rgb": nothing reversed)
    scope: str = ""             # the release's outer variable scope (EfficientNet: its name)
    stem: str | None = None     # ResNet: "imagenet" at every image size
    notes: tuple[str, ...] = ()


def check_source(source: str) -> None:
    check_choice("source", source, SOURCES)


def check_arguments(source: str, *, activation: str | None = None, model: str | None = None,
                    input_channels: str | None = None, use_ema: bool | None = None,
                    image_size: int | None = None, num_classes: int | None = None) -> None:
    """One-line UserErrors for bad arguments, before any file is read (no TensorFlow)."""
    check_source(source)
    if input_channels is not None:
        check_choice("input_channels", input_channels, INPUT_CHANNELS)
        if source != "sat-resnet" and input_channels != "rgb":
            raise UserError(f"--input_channels={input_channels} applies to sat-resnet only "
                            f"(the {source} models take RGB).")
    if activation is not None:
        act = release_activation(activation)
        if source != "sat-resnet" and act != "silu":
            raise UserError(f"Invalid activation {activation!r} for {source}; its EfficientNets "
                            "are all silu (swish).")
    if model is not None:
        family, _ = families.parse(model)
        if source == "sat-resnet" and family.name not in ("resnet", "resnext"):
            raise UserError(f"Invalid model {model!r} for sat-resnet; the release has ResNet "
                            "and ResNeXt models (resnet-50, resnet-101, resnet-152, "
                            "resnext-50-32x4d, resnext-50-32x8d, resnext-152-32x8d).")
        if source != "sat-resnet" and family.name != "efficientnet":
            raise UserError(f"Invalid model {model!r} for {source}; it holds EfficientNets "
                            f"({_efficientnet_names(source)}).")
        if source == "keras-efficientnet" and families.parse(model)[1].get(
                "variant") not in KERAS_VARIANTS:
            raise UserError(f"Invalid model {model!r} for keras-efficientnet; valid models: "
                            f"{_efficientnet_names(source)}.")
    if source == "keras-efficientnet" and model is None:
        raise UserError("--model is required for keras-efficientnet (which EfficientNet the "
                        f"file holds): {_efficientnet_names(source)}.")
    if use_ema and source != "sat-efficientnet":
        raise UserError(f"--use_ema applies to sat-efficientnet only ({source} checkpoints keep "
                        "no moving averages of the weights).")
    if image_size is not None and image_size < 32:
        raise UserError(f"Invalid image_size {image_size}; it must be at least 32.")
    if num_classes is not None and num_classes < 1:
        raise UserError(f"Invalid num_classes {num_classes}; it must be a positive integer.")


def check_checkpoint_path(source: str, path: str) -> None:
    """A one-line UserError unless ``path`` can be the checkpoint of ``source`` (local paths;
    no TensorFlow): a TF1 checkpoint prefix with its ``.index`` (or a folder with a
    ``checkpoint`` file), or a Keras ``.h5`` file."""
    path = os.path.expanduser(path)
    if "://" in path:
        return
    if source == "keras-efficientnet":
        if not (path.endswith(".h5") or path.endswith(".hdf5")):
            raise UserError(f"Invalid Keras weights file {path!r}; valid: a .h5 (as Keras "
                            "publishes them) or a .weights.h5 file.")
        if not os.path.isfile(path):
            raise UserError(f"Keras weights file {path!r} "
                            f"{'is a folder' if os.path.isdir(path) else 'not found'}.")
        return
    if path.endswith(".index"):
        raise UserError(f"Give the checkpoint's prefix, without .index: "
                        f"--checkpoint={path[:-len('.index')]}.")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "checkpoint")):
            raise UserError(f"{path!r} is a folder without a 'checkpoint' file; give the "
                            "checkpoint's prefix (the path of its .index file without .index).")
        return
    if not os.path.exists(path + ".index"):
        raise UserError(f"Checkpoint {path!r} not found (expected {path}.index).")


def _efficientnet_names(source: str) -> str:
    variants = KERAS_VARIANTS if source == "keras-efficientnet" else (*KERAS_VARIANTS, "l1")
    return ", ".join(f"efficientnet-{v}" for v in variants)


def release_activation(name: str) -> str:
    """sat-tf's activation for the release's --activation-name (or a sat-tf name)."""
    key = str(name).lower().replace("-", "_")
    if key in RELEASE_ACTIVATIONS:
        return RELEASE_ACTIVATIONS[key]
    try:
        return names.activation(key)
    except ValueError:
        raise UserError(f"Invalid activation {name!r}; valid choices: "
                        f"{', '.join(RELEASE_ACTIVATIONS)} (the release's --activation-name) "
                        f"or {', '.join(names.ACTIVATIONS)}.") from None


# ---------------------------------------------------------------------------------------------
# Reading checkpoints

class Reader:
    """A checkpoint's variables by name: ``shapes`` (name -> shape) and ``get(name)``."""

    def __init__(self, shapes: dict[str, tuple], get: Callable[[str], np.ndarray],
                 description: str):
        self.shapes = shapes
        self.get = get
        self.description = description


def tf1_reader(path: str) -> Reader:
    """A TF1 (or TF2 name-based) checkpoint, by ``tf.train.load_checkpoint``; ``path`` is its
    prefix (``model`` for ``model.index``) or a folder with a ``checkpoint`` file."""
    import tensorflow as tf
    try:
        reader = tf.train.load_checkpoint(path)
    except (tf.errors.OpError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"Cannot read checkpoint {path!r} ({first[:200]}); give the prefix of "
                        "its .index file (e.g. Res50-silu/Res50-silu).") from None
    shapes = {name: tuple(shape) for name, shape in reader.get_variable_to_shape_map().items()}
    description = f"checkpoint {path!r}"

    def get(name):
        try:
            return reader.get_tensor(name)
        except (tf.errors.OpError, IndexError, ValueError) as e:   # a missing or cut .data
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise MismatchError(f"Cannot read {name} from {description} ({first}); is its "
                                ".data file complete?") from None
    return Reader(shapes, get, description)


def _scan(pattern: str, shapes: dict) -> list[re.Match]:
    rx = re.compile(pattern)
    return [m for m in (rx.fullmatch(n) for n in shapes) if m]


def plan_sat_resnet(reader: Reader, *, activation: str | None, model: str | None,
                    image_size: int | None, input_channels: str | None) -> Plan:
    """The model of a tensorpack ResNet / ResNeXt checkpoint: depth from its blocks, groups and
    width from ``group0/block0/conv2/W``, classes from ``linear/W``, SmoothReLU from its betas."""
    from sat_tf.resnet.architecture import RESNET_STAGES
    shapes = reader.shapes
    if "conv0/W" not in shapes or "linear/W" not in shapes:
        raise MismatchError(f"{reader.description} is not a SAT ResNet checkpoint (no conv0/W "
                           "and linear/W, the release's tensorpack names).")
    counts = {}
    for m in _scan(r"group(\d+)/block(\d+)/conv1/W", shapes):
        g, b = int(m.group(1)), int(m.group(2))
        counts[g] = max(counts.get(g, 0), b + 1)
    counts = tuple(counts.get(g, 0) for g in range(4))
    depth = next((d for d, (kind, c) in RESNET_STAGES.items()
                  if kind == "bottleneck" and c == counts), None)
    if depth is None:
        raise MismatchError(f"{reader.description} has {counts} blocks per group, which is no "
                           "bottleneck ResNet (50: (3, 4, 6, 3), 101: (3, 4, 23, 3), "
                           "152: (3, 8, 36, 3)).")
    conv2 = shapes.get("group0/block0/conv2/W", ())
    if len(conv2) != 4:
        raise MismatchError(f"{reader.description} has no 4-D group0/block0/conv2/W "
                            f"({list(conv2) or 'missing'}), which every release ResNet has.")
    kh, kw, per_group, width = conv2
    groups = width // per_group
    inferred = (f"resnet-{depth}" if groups == 1 else
                f"resnext-{depth}-{groups}x{width // groups}d")
    learnt = any(n.endswith("smoothrelu_beta") for n in shapes)
    if activation is None:
        if not learnt:
            raise UserError("--activation is required for sat-resnet: the release's "
                            "--activation-name of the checkpoint (relu, silu, elu, gelu, "
                            "softplus, mish; smoothrelu is recognised by its betas).")
        activation = "smooth_relu"
    activation = release_activation(activation)
    if learnt != (activation == "smooth_relu"):
        raise MismatchError(f"{reader.description} {'has' if learnt else 'has no'} SmoothReLU "
                           f"betas (smoothrelu_beta), so it is not a {activation} model.")
    return Plan("sat-resnet", _same_model(inferred, model, reader), activation,
                int(shapes["linear/W"][-1]), int(image_size or 224), "sat",
                RELEASE_BN_MOMENTUM, RELEASE_BN_EPSILON, "raw", input_channels or "bgr",
                stem="imagenet")


def plan_sat_efficientnet(reader: Reader, *, activation: str | None, model: str | None,
                          image_size: int | None, use_ema: bool | None) -> Plan:
    """The model of a TPU-named EfficientNet checkpoint: the variant from its scope
    (``efficientnet-b0``, ``efficientnet-bL1``), raw or EMA weights."""
    found = _scan(r"(efficientnet-b(\d|l\d))/stem/conv2d/kernel(/exponentialmovingaverage)?",
                  {n.lower(): s for n, s in reader.shapes.items()})
    if not found:
        raise MismatchError(f"{reader.description} is not a SAT EfficientNet checkpoint (no "
                           "efficientnet-bN/stem/conv2d/kernel).")
    variant = found[0].group(2)                      # "0" (efficientnet-b0), "l1" (-bL1)
    variant = variant if variant.startswith("l") else f"b{variant}"
    prefix = next(n.split("/")[0] for n in reader.shapes
                  if n.lower().startswith(found[0].group(1)))
    has_raw = f"{prefix}/stem/conv2d/kernel" in reader.shapes
    has_ema = f"{prefix}/stem/conv2d/kernel{EMA_SUFFIX}" in reader.shapes
    notes = []
    if use_ema and not has_ema:
        raise MismatchError(f"{reader.description} holds no moving averages "
                           f"({prefix}/stem/conv2d/kernel{EMA_SUFFIX}); import it without "
                           "--use_ema.")
    if use_ema is False and not has_raw:
        raise MismatchError(f"{reader.description} holds only the moving averages "
                           f"(*{EMA_SUFFIX}); import it with --use_ema.")
    weights = "ema" if (use_ema or (use_ema is None and not has_raw)) else "raw"
    if use_ema is None and has_raw and has_ema:
        notes.append("the checkpoint holds raw weights and their moving averages; the raw ones "
                     "were imported (as the release evaluates all but L1-Enhanced); --use_ema "
                     "imports the averages")
    kernel = f"{prefix}/head/dense/kernel" + (EMA_SUFFIX if weights == "ema" else "")
    if kernel not in reader.shapes:
        raise MismatchError(f"{reader.description} has no classifier ({kernel}).")
    activation = release_activation(activation or "silu")
    return Plan("sat-efficientnet", _same_model(f"efficientnet-{variant}", model, reader),
                activation, int(reader.shapes[kernel][-1]), image_size or _table_size(variant),
                "sat", RELEASE_BN_MOMENTUM, RELEASE_BN_EPSILON, weights, "rgb", scope=prefix,
                notes=tuple(notes))


def _table_size(variant: str) -> int:
    from sat_tf.efficientnet.architecture import PARAMS
    return PARAMS[variant].image_size


def _same_model(inferred: str, given: str | None, reader: Reader) -> str:
    if given is not None:
        family, args = families.parse(given)
        if family.canonical_name(args) != inferred:
            raise MismatchError(f"{reader.description} holds a {inferred}, not a "
                               f"{family.canonical_name(args)} (--model).")
    return inferred


# ---------------------------------------------------------------------------------------------
# The mapping

@dataclasses.dataclass
class Assignment:
    target: object          # the sat-tf model's variable
    target_path: str        # e.g. "stage1_block1_conv1/kernel"
    source_name: str        # the checkpoint's variable
    flip_input_channels: bool = False


def _block_context(source: str, spec) -> list[tuple[str, dict]]:
    """(sat-tf block prefix, the release's names for it) for every block of ``spec``."""
    out = []
    if source == "sat-resnet":
        for b in families.FAMILIES[spec.family].blocks(spec.args):
            out.append((f"stage{b.stage}_block{b.index}",
                        {"B": f"group{b.stage - 1}/block{b.index - 1}"}))
        return out
    from sat_tf.efficientnet.architecture import stages
    k = 0
    for s, row in enumerate(stages(spec.args["variant"])):
        for i, block in enumerate(row):
            expand = block.expand_ratio != 1
            # tf.layers numbers a block's convolutions and batch norms in creation order.
            out.append((f"block{s + 1}_{i + 1}", {
                "B": f"{{P}}/blocks_{k}", "K": f"block{s + 1}{chr(97 + i)}_",
                "dw_bn": "_1" if expand else "", "project": "_1" if expand else "",
                "project_bn": "_2" if expand else "_1"}))
            k += 1
    return out


def mapping(source: str, model, spec, *, prefix: str = "", ema: bool = False,
            flip_input_channels: bool = False) -> list[Assignment]:
    """Every weight of ``model`` (built from ``spec``) with the checkpoint variable it is read
    from, by :data:`RELEASE_LAYERS`. Raises if the table leaves a model weight unassigned or
    assigns one twice (a gap in the table, not the checkpoint's fault)."""
    table, kinds = RELEASE_LAYERS[source], WEIGHT_NAMES[source]
    by_layer = {layer.name: layer for layer in model.layers}
    rows = list(table["stem"])
    for n, context in _block_context(source, spec):
        rows += [(ours.format(n=n), kind, theirs.format(**context))
                 for ours, kind, theirs in table["block"]]
    rows += table["head"]
    out, seen = [], set()
    for ours, kind, theirs in rows:
        layer = by_layer.get(ours)
        if layer is None or not layer.weights:
            continue
        scope = theirs.replace("{P}", prefix)
        for w in layer.weights:
            name = w.path.split("/")[-1]
            if kinds[kind] is None:
                source_name = f"{scope}/{name}"
            elif name in kinds[kind]:
                source_name = f"{scope}/{kinds[kind][name]}"
            else:
                raise AssertionError(f"RELEASE_LAYERS: no name for {w.path} ({kind})")
            if ema:
                source_name += EMA_SUFFIX
            out.append(Assignment(w, w.path, source_name,
                                  flip_input_channels and ours == "stem_conv"))
            seen.add(id(w))
    missing = [w.path for w in model.weights if id(w) not in seen]
    if missing or len(seen) != len(out):
        raise AssertionError(f"RELEASE_LAYERS does not cover {spec.name}: {missing[:5]}")
    return out


def _fits(source_shape: tuple, target_shape: tuple) -> bool:
    """The same shape, or the same one with leading axes of size 1 added or dropped: the
    release's [1, 1, 1, 1, C] batch-norm vectors and [1] SmoothReLU betas."""
    def core(shape):
        shape = list(shape)
        while shape and shape[0] == 1:
            shape.pop(0)
        return shape
    return tuple(source_shape) == tuple(target_shape) or core(source_shape) == core(target_shape)


def not_a_weight(name: str, used: set[str], *, ema_chosen: bool) -> str | None:
    """Which kind of training state ``name`` is, else None: :data:`NOT_WEIGHTS`, or the
    unchosen twin (moving average or raw weight) of a variable that was read (``used``)."""
    if not ema_chosen and name.endswith(EMA_SUFFIX) and name[:-len(EMA_SUFFIX)] in used:
        return "unchosen moving averages"
    if ema_chosen and name + EMA_SUFFIX in used:
        return "raw weights (their averages imported)"
    for what, pattern in NOT_WEIGHTS:
        if pattern.match(name):
            return what
    return None


def check(assignments: list[Assignment], reader: Reader, *, what: str,
          ema_chosen: bool = False) -> dict:
    """Raises one line if a variable is missing, of another shape, or left over (and not
    training state); else returns counts of what was read and ignored."""
    missing, wrong, layout = [], [], 0
    for a in assignments:
        shape = reader.shapes.get(a.source_name)
        target = tuple(a.target.shape)
        if shape is None:
            missing.append(a.source_name)
        elif not _fits(shape, target):
            wrong.append(f"{a.source_name} {list(shape)}, expected {list(target)}")
        elif tuple(shape) != target:
            layout += 1
    used = {a.source_name for a in assignments}
    ignored, leftover = {}, []
    for name in sorted(reader.shapes):
        if name in used:
            continue
        kind = not_a_weight(name, used, ema_chosen=ema_chosen)
        if kind is None:
            leftover.append(name)
        else:
            ignored[kind] = ignored.get(kind, 0) + 1
    problems = mismatch(("variables missing", missing, 3), ("of another shape", wrong, 2),
                        ("left over", leftover, 3))
    if problems:
        raise MismatchError(f"{reader.description} does not fit {what}: {problems}.")
    return {"variables_read": len(assignments), "reshaped": layout, "ignored": ignored}


def assign(assignments: list[Assignment], reader: Reader) -> None:
    """Puts every checked value in its model weight (after :func:`check`)."""
    for a in assignments:
        value = np.asarray(reader.get(a.source_name))
        value = value.reshape(tuple(a.target.shape))
        if a.flip_input_channels:
            value = value[:, :, ::-1, :]
        a.target.assign(value.astype(a.target.dtype))


# ---------------------------------------------------------------------------------------------
# Keras' EfficientNet files

def keras_normalization(mean, variance, *, published: bool | None = None) -> tuple[str, dict]:
    """sat-tf's input scaling equal to Keras' ``Rescaling(1/255)`` + ``Normalization(mean,
    variance)`` [+ ``Rescaling(1/sqrt(IMAGENET_STD))`` when built with weights="imagenet"].

    Keras' published ImageNet files hold the ImageNet standard deviations as the variance and
    are evaluated by ``EfficientNetBx(weights="imagenet")``, which divides once more by their
    square roots; a file with those values is read so (``published`` None: by its values).
    Other files are read as ``weights=<file>`` builds them (no extra division). The resulting
    per-channel mean and standard deviation must be sat-tf's "imagenet" (ImageNet mean and
    std) or "sat" (0.5, 0.5) scaling; anything else is one line naming the values.
    """
    mean, variance = np.asarray(mean, np.float64), np.asarray(variance, np.float64)
    if published is None:
        published = bool(np.allclose(variance, IMAGENET_STD, rtol=0, atol=1e-6))
    std = np.sqrt(variance) * (np.sqrt(IMAGENET_STD) if published else 1.0)
    for normalization, (m, s) in {"imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                                  "sat": ((0.5,) * 3, (0.5,) * 3)}.items():
        if np.allclose(mean, m, rtol=0, atol=1e-6) and np.allclose(std, s, rtol=1e-6, atol=0):
            return normalization, {"mean": mean.tolist(), "variance": variance.tolist(),
                                   "keras_imagenet_rescaling": published}
    raise MismatchError(
        f"The file's input normalisation (mean {np.round(mean, 4).tolist()}, std "
        f"{np.round(std, 4).tolist()} of pixels/255) is neither ImageNet's "
        f"(mean {list(IMAGENET_MEAN)}, std {list(IMAGENET_STD)}) nor sat's (0.5, 0.5), the two "
        "sat-tf models scale inputs with.")


def keras_reader(path: str, variant: str, num_classes: int) -> tuple[Reader, dict, str]:
    """Loads a Keras EfficientNet weight file into ``keras.applications``' model (Keras' own
    loader: legacy ``.h5`` by layer order, ``.weights.h5`` by object path); returns its
    weights by path, the normalisation it applies, and sat-tf's equivalent scaling."""
    import keras
    builder = getattr(keras.applications, f"EfficientNet{variant.upper()}")
    reference = builder(weights=None, classes=num_classes, classifier_activation=None)
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference.load_weights(path)
    except (ValueError, KeyError, OSError) as e:
        first = str(e).strip().split("\n")[0][:240]
        raise MismatchError(f"Keras weights file {path!r} does not fit keras.applications."
                           f"EfficientNet{variant.upper()} with {num_classes} classes "
                           f"(Keras: {first}); check --model and --num_classes.") from None
    norm = next(layer for layer in reference.layers
                if isinstance(layer, keras.layers.Normalization))
    # Its variables, as the file holds them (the layer's mean / variance tensors are derived
    # from them, and Keras' legacy .h5 loader does not refresh those).
    stored = {w.path.split("/")[-1]: np.asarray(w).reshape(-1) for w in norm.weights}
    normalization, detail = keras_normalization(stored["mean"], stored["variance"])
    weights = {w.path: w for layer in reference.layers if layer is not norm
               for w in layer.weights}
    reader = Reader({p: tuple(w.shape) for p, w in weights.items()},
                    lambda p: np.asarray(weights[p]), f"Keras weights file {path!r}")
    return reader, detail, normalization


# ---------------------------------------------------------------------------------------------
# The run directory

def experiment_for(plan: Plan, model_dir: str) -> Experiment:
    """The run's experiment: the paper's ImageNet protocol and the recipe of the model (to
    fine-tune with), the imported model, and the release's own numbers as ``paper``."""
    model = ModelConfig(name=plan.model, activation=plan.activation,
                        num_classes=plan.num_classes, image_size=plan.image_size,
                        normalization=plan.normalization, stem=plan.stem,
                        bn_momentum=plan.bn_momentum,
                        bn_epsilon=plan.bn_epsilon)
    base = experiments.imagenet_protocol(model, recipes.for_model(plan.model))
    key = (plan.model, plan.activation,
           plan.weights if plan.source == "sat-efficientnet" else plan.image_size)
    numbers = RELEASE_RESULTS.get(key) if plan.source != "keras-efficientnet" else None
    if numbers:
        paper = {"source": "SAT release README", "clean": numbers[0],
                 "robust": numbers[1] if len(numbers) > 1 else None,
                 "robust_attack": "PGD-10, epsilon 4, step 1" if len(numbers) > 1 else None}
        if len(numbers) > 1:
            paper["robust_pgd20"], paper["robust_pgd50"] = numbers[2], numbers[3]
    else:
        paper = {"source": None, "clean": None, "robust": None, "robust_attack": None}
    what = {"sat-resnet": "the SAT release's", "sat-efficientnet": "the SAT release's",
            "keras-efficientnet": "Keras' (keras.applications)"}[plan.source]
    base.train.ema_decay = None     # the chosen weights are the model's
    base.data = DataConfig(dataset="imagenet", source="tfrecord", num_classes=plan.num_classes
                           if plan.num_classes != 1000 else None)
    return base.replace(**{
        "name": f"imported-{plan.model}-{plan.activation.replace('_', '-')}",
        "description": f"{plan.model} ({plan.activation}, {plan.weights} weights) imported from "
                       f"{what} checkpoint by run/import_checkpoint.py.",
        "model_dir": model_dir, "paper": paper})


def check_model_dir(model_dir: str) -> None:
    """A new or empty folder only: an import never replaces anything (no TensorFlow)."""
    if "://" in model_dir:
        return
    if os.path.exists(model_dir) and (not os.path.isdir(model_dir) or os.listdir(model_dir)):
        raise UserError(f"model_dir {model_dir!r} exists and is not empty; an import writes a "
                        "new run directory (choose a new folder).")
    parent = os.path.dirname(os.path.abspath(model_dir))
    while not os.path.exists(parent):      # missing folders are made on writing
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UserError(f"model_dir {model_dir!r} cannot be created ({parent!r} is not a "
                        "writable folder).")


def import_checkpoint(source: str, checkpoint: str, model_dir: str, *,
                      model: str | None = None, activation: str | None = None,
                      image_size: int | None = None, num_classes: int | None = None,
                      use_ema: bool | None = None, input_channels: str | None = None,
                      log: Callable[[str], None] = print) -> dict:
    """Imports ``checkpoint`` (of ``source``) into a new run directory ``model_dir``; returns
    the import record (also written to ``model_dir/import.json``). See the module docstring."""
    check_arguments(source, activation=activation, model=model, input_channels=input_channels,
                    use_ema=use_ema, image_size=image_size, num_classes=num_classes)
    checkpoint, model_dir = os.path.expanduser(checkpoint), os.path.expanduser(model_dir)
    check_checkpoint_path(source, checkpoint)
    check_model_dir(model_dir)
    import tensorflow as tf
    from sat_tf import models
    if "://" in model_dir and tf.io.gfile.exists(model_dir) and tf.io.gfile.listdir(model_dir):
        raise UserError(f"model_dir {model_dir!r} exists and is not empty; an import writes a "
                        "new run directory (choose a new folder).")

    extra = {}
    if source == "keras-efficientnet":
        variant = families.parse(model)[1]["variant"]
        reader, extra, normalization = keras_reader(checkpoint, variant, num_classes or 1000)
        plan = Plan(source, f"efficientnet-{variant}", release_activation(activation or "silu"),
                    num_classes or 1000, image_size or _table_size(variant), normalization,
                    KERAS_BN_MOMENTUM, KERAS_BN_EPSILON, "raw", "rgb")
    else:
        reader = tf1_reader(checkpoint)
        if source == "sat-resnet":
            plan = plan_sat_resnet(reader, activation=activation, model=model,
                                   image_size=image_size, input_channels=input_channels)
        else:
            plan = plan_sat_efficientnet(reader, activation=activation, model=model,
                                         image_size=image_size, use_ema=use_ema)
        if num_classes is not None and num_classes != plan.num_classes:
            raise MismatchError(f"{reader.description} has {plan.num_classes} classes, not "
                               f"{num_classes} (--num_classes).")
    for note in plan.notes:
        log(f"Note: {note}.")

    spec = models.resolve(plan.model, plan.activation, plan.num_classes, plan.image_size,
                          plan.normalization, plan.stem, plan.bn_momentum, plan.bn_epsilon)
    net = models.build_model(plan.model, plan.activation, plan.num_classes, plan.image_size,
                             plan.normalization, plan.stem, plan.bn_momentum, plan.bn_epsilon)
    assignments = mapping(source, net, spec, prefix=plan.scope, ema=plan.weights == "ema",
                          flip_input_channels=plan.input_channels == "bgr")
    counts = check(assignments, reader, what=f"{plan.model} ({plan.activation}, {source})",
                   ema_chosen=plan.weights == "ema")
    assign(assignments, reader)

    exp = experiment_for(plan, model_dir)
    record = {
        "source": source, "checkpoint": checkpoint, "model": plan.model,
        "activation": plan.activation, "weights": plan.weights, "image_size": plan.image_size,
        "num_classes": plan.num_classes, "normalization": plan.normalization,
        "bn_momentum": plan.bn_momentum, "bn_epsilon": plan.bn_epsilon,
        "input_channels": plan.input_channels, **counts,
        "layout": _layout_notes(plan, counts), "notes": list(plan.notes),
        "imported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        record["keras_normalization"] = extra
    _write_run(model_dir, net, exp, record)
    log(f"Imported {counts['variables_read']} variables of {reader.description} as "
        f"{plan.model} ({plan.activation}, {plan.weights} weights, {plan.image_size}x"
        f"{plan.image_size}, {plan.normalization} input scaling) into {model_dir}.")
    return record


def _layout_notes(plan: Plan, counts: dict) -> list[str]:
    notes = []
    if counts["reshaped"]:
        notes.append(f"{counts['reshaped']} variables reshaped (axes of size 1: the release's "
                     "[1, 1, 1, 1, C] batch-norm vectors, [1] SmoothReLU betas)")
    if plan.input_channels == "bgr":
        notes.append("stem kernel's input channels reversed: the release's ResNets are "
                     "evaluated on BGR images, sat-tf models take RGB")
    if plan.source == "keras-efficientnet":
        notes.append("Keras' Normalization layer read as sat-tf's "
                     f"{plan.normalization!r} input scaling")
    return notes


def _remove_abandoned(model_dir: str) -> None:
    """Deletes the scratch folders of earlier imports into ``model_dir`` whose process is gone
    (killed while writing: the run directory itself was never created)."""
    import glob
    for path in glob.glob(f"{glob.escape(model_dir.rstrip('/'))}.importing-*"):
        pid = path.rsplit("-", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:       # alive, owned by someone else
            pass


def _write_run(model_dir: str, net, exp: Experiment, record: dict) -> None:
    """ckpt-0, import.json and experiment.json, written in a scratch folder renamed into place
    (locally; a bucket folder is written in place, experiment.json last: without it no program
    takes the folder for a run)."""
    import tensorflow as tf
    from sat_tf import rundir
    remote = "://" in model_dir
    work = model_dir if remote else f"{model_dir.rstrip('/')}.importing-{os.getpid()}"
    if not remote:
        _remove_abandoned(model_dir)
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(os.path.dirname(os.path.abspath(model_dir)), exist_ok=True)
    tf.io.gfile.makedirs(work)
    try:
        step = tf.Variable(0, dtype=tf.int64, trainable=False)
        manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=net, step=step), work,
                                             max_to_keep=None,
                                             checkpoint_name=rundir.CHECKPOINT_PREFIX)
        manager.save(checkpoint_number=0)
        with tf.io.gfile.GFile(os.path.join(work, IMPORT_FILE), "w") as f:
            f.write(json.dumps(record, indent=2) + "\n")
        rundir.write_experiment(work, exp)
        if not remote:
            if os.path.isdir(model_dir):
                os.rmdir(model_dir)     # empty (check_model_dir)
            os.rename(work, model_dir)
    except BaseException:
        if not remote:
            shutil.rmtree(work, ignore_errors=True)
        raise
