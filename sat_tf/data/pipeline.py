"""Pieces every input pipeline shares: per-host sharding and exact-coverage eval batching."""
from __future__ import annotations

import sys
from typing import Callable

import tensorflow as tf


def shard(ds: tf.data.Dataset, input_context) -> tf.data.Dataset:
    """This host's 1/num_input_pipelines of ``ds`` (no-op without an input context)."""
    if input_context is None or input_context.num_input_pipelines <= 1:
        return ds
    return ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)


def batch_train(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def batch_eval(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """Batches (image, label) pairs into full ``(images, labels, mask)`` batches.

    Every example appears exactly once; the last batch is padded with zero images, label 0 and
    mask 0.0, so every batch has the static shape ``[batch_size, ...]``.
    """
    ds = ds.map(lambda x, y: (x, y, tf.constant(1.0, tf.float32)))
    ds = ds.batch(batch_size, drop_remainder=False)

    def pad(images, labels, mask):
        n = batch_size - tf.shape(labels)[0]
        images = tf.pad(images, [[0, n]] + [[0, 0]] * (len(images.shape) - 1))
        labels = tf.pad(labels, [[0, n]])
        mask = tf.pad(mask, [[0, n]])
        images = tf.ensure_shape(images, [batch_size] + images.shape[1:].as_list())
        return images, tf.ensure_shape(labels, [batch_size]), tf.ensure_shape(mask, [batch_size])

    return ds.map(pad, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def shard_files(files: list, input_context) -> tuple[list, bool]:
    """This host's share of ``files``: ``(files, shard_records)``.

    With at least as many files as input pipelines, each host takes every n-th file; with
    fewer, every host reads all files and ``shard_records`` tells the caller to
    :func:`shard` the records instead.
    """
    if input_context is None or input_context.num_input_pipelines <= 1:
        return list(files), False
    n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
    if len(files) >= n:
        return list(files[i::n]), False
    return list(files), True


def example_key(seed: int, input_context) -> Callable:
    """``index -> [2] int64`` stateless-random key, unique per example and host."""
    n = input_context.num_input_pipelines if input_context is not None else 1
    i = input_context.input_pipeline_id if input_context is not None else 0
    return lambda index: tf.stack([tf.constant(seed, tf.int64), index * n + i])


def decode_reporting_corrupt(ds: tf.data.Dataset, fn, *, skip_corrupt: bool) -> tf.data.Dataset:
    """Maps ``fn`` over ``(file, index, payload, readable)`` elements, reporting failures by name.

    ``fn(payload)`` returns tensors with static shapes (e.g. a decoded image and its label).
    When it fails (a corrupt record, an undecodable image), or ``readable`` is False, then
    with ``skip_corrupt=False`` iteration fails with an InvalidArgumentError that names
    ``file`` and ``index``; with ``skip_corrupt=True`` the element is dropped and one line
    ``sat_tf.data: skipped corrupt record <index> of <file> (<n> skipped so far)`` is printed to
    stderr, with the running count. Work runs in parallel and the order is kept.
    """
    def attempt(file, index, payload, readable):
        # A one-element dataset contains fn's error (ignore_errors); a placeholder follows it
        # and is only produced (take(1)) when fn failed.
        good = tf.data.Dataset.from_tensors((payload,)).filter(lambda p: readable)
        good = good.map(lambda p: (fn(p), True)).ignore_errors()
        spec = good.element_spec[0]
        for s in tf.nest.flatten(spec):
            if not s.shape.is_fully_defined():
                raise ValueError(f"decode_reporting_corrupt needs static output shapes, got {s}.")

        def placeholder(_):
            return tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), spec), False

        out = good.concatenate(tf.data.Dataset.range(1).map(placeholder)).take(1)
        return out.map(lambda value, ok: (value, ok, file, index))

    ds = ds.interleave(attempt, cycle_length=tf.data.AUTOTUNE, block_length=1,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def where(file, index):
        return tf.strings.join(["record ", tf.strings.as_string(index), " of ", file])

    if not skip_corrupt:
        def check(value, ok, file, index):
            assertion = tf.debugging.Assert(ok, [tf.strings.join(
                ["Corrupt record or undecodable image: ", where(file, index)])])
            with tf.control_dependencies([assertion]):
                return tf.nest.map_structure(tf.identity, value)

        return ds.map(check)

    def count(skipped, element):
        value, ok, file, index = element
        skipped += tf.cast(tf.logical_not(ok), tf.int64)

        def log():
            line = tf.strings.join(["sat_tf.data: skipped corrupt ", where(file, index), " (",
                                    tf.strings.as_string(skipped), " skipped so far)"])
            printed = tf.print(line, output_stream=sys.stderr)
            with tf.control_dependencies([printed]):
                return tf.identity(ok)

        ok = tf.cond(ok, lambda: ok, log)
        return skipped, (value, ok)

    def is_ok(value, ok):
        return ok

    def value_of(value, ok):
        return value

    return ds.scan(tf.constant(0, tf.int64), count).filter(is_ok).map(value_of)
