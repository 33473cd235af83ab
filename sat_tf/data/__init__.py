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

This package imports TensorFlow lazily, so ``info()`` is cheap.
"""
from __future__ import annotations

import dataclasses

from sat_tf.config import DataConfig


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_size: int | None          # None: the model decides (ImageNet)
    num_train_examples: int
    num_eval_examples: int


def info(data: DataConfig) -> DatasetInfo:
    """Class count, natural image size and split sizes of a dataset, without TensorFlow."""
    if data.dataset == "synthetic":
        return DatasetInfo(data.synthetic_num_classes, data.synthetic_image_size,
                           data.synthetic_train_examples, data.synthetic_eval_examples)
    if data.dataset == "cifar10":
        return DatasetInfo(10, 32, 50_000, 10_000)
    if data.dataset == "imagenet":
        return DatasetInfo(1000, None, 1_281_167, 50_000)
    raise ValueError(f"Invalid dataset {data.dataset!r}; valid choices: synthetic, cifar10, imagenet.")


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
    if data.dataset == "synthetic":
        from sat_tf.data import synthetic
        return synthetic.build(data, split=split, batch_size=batch_size, image_size=image_size,
                               input_context=input_context)
    if data.dataset == "cifar10":
        from sat_tf.data import cifar10
        return cifar10.build(data, split=split, batch_size=batch_size, image_size=image_size,
                             input_context=input_context)
    if data.dataset == "imagenet":
        from sat_tf.data import imagenet
        return imagenet.build(data, split=split, batch_size=batch_size, image_size=image_size,
                              input_context=input_context)
    raise ValueError(f"Invalid dataset {data.dataset!r}; valid choices: synthetic, cifar10, imagenet.")
