"""Input pipelines: ``Experiment.data`` -> per-replica ``tf.data`` (DESIGN.md §2, §3).

Contract of every dataset built here:

* ``split="train"``: repeats forever, shuffled (seeded), batched with ``drop_remainder``;
  elements ``(images, labels)``.
* ``split="eval"``: one pass that covers every example of the split (or of this host's shard)
  exactly once; batches are padded to the full batch size so shapes stay static (TPU), and
  elements are ``(images, labels, mask)`` with ``mask`` float32 1.0 for real examples and 0.0
  for padding.
* ``images`` float32 NHWC with values in [0, 255]; ``labels`` int32, 0-based.
* ``batch_size`` is the batch this pipeline produces (per replica under
  ``distribute_datasets_from_function``); ``input_context`` shards the data per host.

The datasets are a table, :data:`DATASETS`: each names the module that builds its pipelines
and what is known of it before any data is read. This package imports TensorFlow lazily, so
``info()`` is cheap.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Callable

from sat_tf.config import DataConfig
from sat_tf.errors import UserError

MANIFEST_FILE = "conversion.json"     # what run/make_tfrecords.py records beside the shards
LABEL_MAP_FILE = "label_map.txt"      # "<label> <class name>" per line, beside the shards
SMALL_IMAGE = 64                      # default preprocessing: "resize" at or below this size
_EVAL_SPLITS = ("validation", "test")  # the converters' names of the evaluation split
_FACTS = ("num_classes", "num_train_examples", "num_eval_examples", "label_base",
          "preprocessing")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int | None         # None: unknown (a folder without metadata): --num_classes
    image_size: int | None          # the size models get by default; None: the model decides
    num_train_examples: int | None  # None: unknown: --num_train_images
    num_eval_examples: int | None   # None: unknown (progress shows no total)
    label_base: int = 1             # the first label on disk
    preprocessing: str = "imagenet"
    images_short_side: int | None = None   # median short side of the images, when known
    metadata: str | None = None     # the file the facts were read from


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One ``--dataset``: what builds its pipelines, and what is known of it unread."""
    build: Callable                 # (DataConfig, *, split, batch_size, image_size, input_context)
    facts: Callable                 # DataConfig -> its known DatasetInfo fields
    preprocessing: str | None = None   # its own preprocessing; None: by the images' size
    converted: bool = False         # a folder of shards, whose conversion.json tells its facts


def _builder(module: str, *facts: str) -> Callable:
    """``sat_tf.data.<module>.build`` (imported when called: TensorFlow), given these fields of
    the dataset's :func:`info` as keyword arguments."""
    def build(data: DataConfig, **kwargs):
        if facts:
            known = info(data)
            kwargs.update({f: getattr(known, f) for f in facts})
        return importlib.import_module(f"sat_tf.data.{module}").build(data, **kwargs)

    return build


def _digits_facts(data: DataConfig) -> dict:
    from sat_tf.data import digits     # NumPy, not TensorFlow
    return dict(num_classes=digits.NUM_CLASSES, image_size=digits.IMAGE_SIZE,
                num_train_examples=digits.NUM_TRAIN, num_eval_examples=digits.NUM_EVAL)


_IMAGENET = dict(num_classes=1000, image_size=None, num_train_examples=1_281_167,
                 num_eval_examples=50_000)

DATASETS = {
    "synthetic": Dataset(
        build=_builder("synthetic"), preprocessing="resize",
        facts=lambda data: dict(num_classes=data.synthetic_num_classes,
                                image_size=data.synthetic_image_size,
                                num_train_examples=data.synthetic_train_examples,
                                num_eval_examples=data.synthetic_eval_examples)),
    "digits": Dataset(build=_builder("digits"), facts=_digits_facts, preprocessing="resize"),
    "cifar10": Dataset(
        build=_builder("cifar10"), preprocessing="cifar",
        facts=lambda data: dict(num_classes=10, image_size=32, num_train_examples=50_000,
                                num_eval_examples=10_000)),
    # ImageNet's known facts stand for a folder without a conversion.json (the official
    # TFRecords); a folder of the user's own images has none.
    "imagenet": Dataset(build=_builder("imagenet", "label_base", "preprocessing"),
                        facts=lambda data: dict(_IMAGENET), converted=True),
    "images": Dataset(build=_builder("imagenet", "label_base", "preprocessing"),
                      facts=lambda data: dict(image_size=None), converted=True),
}


def read_metadata(data_dir: str | None) -> dict | None:
    """The ``conversion.json`` of a TFRecord folder (local or gs://), or None without one."""
    if not data_dir:
        return None
    path = os.path.join(data_dir, MANIFEST_FILE)
    try:
        if "://" in path:
            import tensorflow as tf
            if not tf.io.gfile.exists(path):
                return None
            with tf.io.gfile.GFile(path) as f:
                text = f.read()
        else:
            if not os.path.exists(path):
                return None
            with open(path) as f:
                text = f.read()
        manifest = json.loads(text)
    except (OSError, ValueError) as e:
        raise UserError(f"Cannot read {path} ({e}); delete it and re-run "
                        "run/make_tfrecords.py, or fix it.") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise UserError(f"{path} is not a conversion record of run/make_tfrecords.py (no "
                        "'splits').")
    manifest["_path"] = path
    return manifest


def _from_metadata(manifest: dict) -> dict:
    """The facts a conversion.json holds (only those it holds)."""
    facts = {}
    splits = manifest["splits"]
    if "train" in splits:
        facts["num_train_examples"] = int(splits["train"]["num_examples"])
    for name in _EVAL_SPLITS:
        if name in splits:
            facts["num_eval_examples"] = int(splits[name]["num_examples"])
            break
    if manifest.get("num_classes"):
        facts["num_classes"] = int(manifest["num_classes"])
    if manifest.get("label_base") is not None:
        facts["label_base"] = int(manifest["label_base"])
    side = (manifest.get("image_size") or {}).get("median_short_side")
    if side:
        facts["images_short_side"] = int(side)
    return facts


def _label_map_classes(data_dir: str) -> int | None:
    """The number of classes :data:`LABEL_MAP_FILE` beside the shards lists (local folders)."""
    path = os.path.join(data_dir, LABEL_MAP_FILE)
    if "://" in path or not os.path.exists(path):
        return None
    with open(path) as f:
        return sum(1 for line in f if line.strip()) or None


def default_preprocessing(dataset: str, images_short_side: int | None) -> str:
    """The preprocessing a run gets unless it chooses: the dataset's own (CIFAR-10's; the
    whole image for digits and synthetic); the whole image for small images (at most 64
    pixels on the short side, by the folder's conversion.json: a centre crop of
    size/(size+32) would keep a quarter of a 32x32 image); else ImageNet's crops (also when
    the images' size is unknown, as for the official ImageNet TFRecords)."""
    own = DATASETS[dataset].preprocessing
    if own:
        return own
    if images_short_side and images_short_side <= SMALL_IMAGE:
        return "resize"
    return "imagenet"


def info(data: DataConfig) -> DatasetInfo:
    """Class count, natural image size, split sizes, label base and preprocessing of a
    dataset: ``data``'s own fields where set, else the folder's ``conversion.json``, else the
    dataset's known values. TensorFlow only for metadata on gs://."""
    dataset = DATASETS[data.dataset]
    facts = dataset.facts(data)
    if dataset.converted:
        facts.update(_folder_facts(data))
    for what in ("num_classes", "num_train_examples", "num_eval_examples", "label_base"):
        if getattr(data, what) is not None:
            facts[what] = getattr(data, what)
    facts.setdefault("num_classes", None)
    facts.setdefault("num_train_examples", None)
    facts.setdefault("num_eval_examples", None)
    facts.setdefault("label_base", 1)
    facts["preprocessing"] = data.preprocessing or default_preprocessing(
        data.dataset, facts.get("images_short_side"))
    return DatasetInfo(**facts)


def _folder_facts(data: DataConfig) -> dict:
    """The facts a folder of shards records: its ``conversion.json`` (the class count also
    from its label map), and its small images' own size as the image size."""
    # A resolved experiment (sat_tf.rundir.resolve_experiment) carries every fact: the
    # pipelines of a pod's hosts then do not read the record again, one round trip each.
    known = all(getattr(data, f) is not None for f in _FACTS)
    if data.resolved_source() != "tfrecord" or known:
        return {}
    manifest = read_metadata(data.data_dir)
    if manifest is None:
        return {}
    facts = _from_metadata(manifest)
    facts["metadata"] = manifest["_path"]
    if "num_classes" not in facts:
        classes = _label_map_classes(data.data_dir)
        if classes:
            facts["num_classes"] = classes
    side = facts.get("images_short_side")
    if side and side <= SMALL_IMAGE:
        facts["image_size"] = side      # small images: train at their own size
    return facts


def remembered_listings():
    """A context in which TFRecord folders are listed and their files statted once (the
    pipelines of every host of a pod are built on one client); see
    :func:`sat_tf.data.tfrecord.remembered_listings`."""
    from sat_tf.data import tfrecord
    return tfrecord.remembered_listings()


def build_dataset(data: DataConfig, *, split: str, batch_size: int, image_size: int | None = None,
                  input_context=None):
    """The ``tf.data.Dataset`` of one split, following the contract in this module's doc."""
    if split not in ("train", "eval"):
        raise ValueError(f"Invalid split {split!r}; valid choices: train, eval.")
    if batch_size is None or batch_size <= 0:
        raise ValueError(f"Invalid batch size {batch_size!r}; it must be > 0.")
    return DATASETS[data.dataset].build(data, split=split, batch_size=batch_size,
                                        image_size=image_size, input_context=input_context)
