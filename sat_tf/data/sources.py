"""Where a dataset's records come from: TFRecord shards or tensorflow-datasets, read the same
way for every dataset that has them (cifar10, imagenet, images).

A dataset module describes where its records are once (:class:`Records`) and :func:`read`
gives, for one split, this input pipeline's share of them as a :class:`Stream` of
``(name, index, payload, readable)`` elements (:mod:`sat_tf.data.corrupt`) with the ``parse``
of its payloads, from the source ``DataConfig.resolved_source()`` names:

* ``"tfrecord"``: the ``<split>-*`` shards in ``data_dir``, local or ``gs://``
  (:func:`sat_tf.data.tfrecord.list_files`), shared out over the input pipelines by file, or
  by record when there are fewer files than pipelines (:func:`shard_files`), and read
  ``num_parallel_reads`` files at a time, interleaved (:func:`sat_tf.data.tfrecord.read`).
  ``name`` is the shard's path, ``index`` the record's place in it; ``parse`` reads the
  image bytes and the 0-based label of a serialized example (:func:`sat_tf.data.tfrecord.parse`).
* ``"tfds"``: the dataset's tensorflow-datasets builder, prepared on first use, its split
  divided evenly over the input pipelines; the images stay encoded. ``name`` names the
  example, ``index`` is its place in this pipeline's share; payloads are already
  ``(image bytes, int32 0-based label)``.

:meth:`Stream.decode` then maps the dataset's own decoding and preprocessing over the stream,
naming or skipping the records that fail (``DataConfig.skip_corrupt``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import tensorflow as tf

from sat_tf.config import DataConfig
from sat_tf.data import corrupt, pipeline, tfrecord
from sat_tf.errors import UserError


@dataclasses.dataclass(frozen=True)
class Records:
    """Where one dataset's records are kept, in either source."""
    splits: Mapping[str, str]     # our split ("train", "eval") -> shard prefix and TFDS split
    tfds_name: str                # the tensorflow-datasets builder
    tfds_example_name: Callable   # a TFDS example (dict) -> the string naming it in errors
    prepare_tfds: Callable        # (builder, DataConfig) -> None: download and prepare it
    shuffle_files: bool = False   # training visits the files in a seeded random order; TFDS
                                  # also reads num_parallel_reads files at a time


@dataclasses.dataclass(frozen=True)
class Stream:
    """One pass over this input pipeline's records of a split.

    ``elements``: ``(name, index, payload, readable)``; ``parse``: a payload -> ``(encoded
    image bytes, int32 0-based label)``.
    """
    elements: tf.data.Dataset
    parse: Callable

    def reorder(self, fn: Callable) -> "Stream":
        """The stream with ``fn`` applied to its elements (a shuffle, a repeat)."""
        return dataclasses.replace(self, elements=fn(self.elements))

    def decode(self, fn: Callable, *, skip_corrupt: bool) -> tf.data.Dataset:
        """``fn(image bytes, label, position)`` of every record, tensors of static shapes;
        a record that does not parse or whose ``fn`` fails stops iteration with an error
        naming it, or with ``skip_corrupt`` is skipped and named on stderr
        (:func:`sat_tf.data.corrupt.decode_reporting_corrupt`). ``position`` is the int64
        position of the element in the stream."""
        return corrupt.decode_reporting_corrupt(
            self.elements, lambda payload, position: fn(*self.parse(payload), position),
            skip_corrupt=skip_corrupt)


def read(records: Records, data: DataConfig, split: str, input_context=None, *,
         label_base: int = 1) -> Stream:
    """This input pipeline's records of ``split`` ("train" or "eval") from ``data``'s source;
    ``label_base`` is the first label in TFRecords (TFDS labels are 0-based)."""
    if data.resolved_source() == "tfds":
        return Stream(_tfds_elements(records, data, split, input_context), _already_parsed)
    return Stream(_tfrecord_elements(records, data, split, input_context),
                  functools.partial(tfrecord.parse, label_base=label_base))


def shard_files(files: list, input_context) -> tuple[list, bool]:
    """This input pipeline's share of ``files``: ``(files, shard_records)``.

    With at least as many files as input pipelines, each pipeline takes every n-th file; with
    fewer, every pipeline reads all files and ``shard_records`` tells the caller to
    :func:`sat_tf.data.pipeline.shard` the records instead.
    """
    if input_context is None or input_context.num_input_pipelines <= 1:
        return list(files), False
    n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
    if len(files) >= n:
        return list(files[i::n]), False
    return list(files), True


def _tfrecord_elements(records: Records, data: DataConfig, split: str, input_context):
    if not data.data_dir:
        raise UserError(f"dataset {data.dataset!r} with source 'tfrecord' needs data_dir (a "
                        f"folder of {records.splits['train']}-*/{records.splits['eval']}-* "
                        "TFRecords from run/make_tfrecords.py).")
    files = tfrecord.list_files(data.data_dir, records.splits[split])
    files, shard_records = shard_files(files, input_context)
    shuffle = records.shuffle_files and split == "train"
    ds = tfrecord.read(files, cycle_length=min(data.num_parallel_reads, len(files)),
                       shuffle_seed=data.seed if shuffle else None)
    if shard_records:
        ds = pipeline.shard(ds, input_context)
    return ds


def _tfds_elements(records: Records, data: DataConfig, split: str, input_context):
    import tensorflow_datasets as tfds

    builder = tfds.builder(records.tfds_name, data_dir=data.data_dir)
    records.prepare_tfds(builder, data)
    tfds_split = records.splits[split]
    if input_context is not None and input_context.num_input_pipelines > 1:
        tfds_split = tfds.even_splits(tfds_split, n=input_context.num_input_pipelines)[
            input_context.input_pipeline_id]
    read_config = (tfds.ReadConfig(shuffle_seed=data.seed,
                                   interleave_cycle_length=data.num_parallel_reads)
                   if records.shuffle_files else None)
    ds = builder.as_dataset(
        split=tfds_split, shuffle_files=records.shuffle_files and split == "train",
        decoders={"image": tfds.decode.SkipDecoding()}, read_config=read_config)
    return ds.enumerate().map(lambda i, e: (
        records.tfds_example_name(e), i, (e["image"], tf.cast(e["label"], tf.int32)), True))


def _already_parsed(payload):
    return payload
