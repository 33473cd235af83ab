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
    stderr, with the running count. ``fn`` runs in one parallel map and the order is kept.
    """
    payload_spec = ds.element_spec[2]
    spec = tf.nest.map_structure(
        tf.TensorSpec.from_tensor,
        tf.function(fn, autograph=False).get_concrete_function(payload_spec).structured_outputs)
    for s in tf.nest.flatten(spec):
        if not s.shape.is_fully_defined():
            raise ValueError(f"decode_reporting_corrupt needs static output shapes, got {s}.")

    def zeros(structure, leading=()):
        return tf.nest.map_structure(
            lambda s: tf.zeros(list(leading) + [d or 0 for d in s.shape], s.dtype), structure)

    # Every element becomes two: a marker that carries (file, index) and cannot fail, then the
    # work, which runs fn and is dropped by ignore_errors when it fails. A marker that is not
    # followed by its work names a failed element; one last marker closes the stream.
    def as_pair(file, index, payload, readable):
        pair = lambda t: tf.stack([tf.zeros_like(t), t])
        return (tf.constant([False, True]), tf.stack([file, file]), tf.stack([index, index]),
                tf.nest.map_structure(pair, payload), tf.stack([readable, readable]))

    closing = tf.data.Dataset.from_tensors((
        tf.constant([False]), tf.constant([""]), tf.constant([-1], tf.int64),
        zeros(payload_spec, [1]), tf.constant([False])))
    pairs = ds.map(as_pair).concatenate(closing).unbatch()

    def attempt(is_work, file, index, payload, readable):
        def work():
            check = tf.debugging.Assert(readable, ["unreadable record"])
            with tf.control_dependencies([check]):
                return fn(payload)

        return tf.cond(is_work, work, lambda: zeros(spec)), is_work, file, index

    attempted = pairs.map(attempt, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True).ignore_errors()

    def where(file, index):
        return tf.strings.join(["record ", tf.strings.as_string(index), " of ", file])

    # State: the last marker's (file, index), whether its work is still missing, failures so far.
    def step(state, element):
        file, index, pending, failed = state
        value, is_work, new_file, new_index = element
        lost = tf.logical_and(pending, tf.logical_not(is_work))   # a marker after a marker
        failed += tf.cast(lost, tf.int64)
        emit = tf.logical_or(is_work, lost)
        report = (file, index)
        new_state = (tf.where(is_work, file, new_file), tf.where(is_work, index, new_index),
                     tf.logical_not(is_work), failed)
        return new_state, (value, is_work, emit, report[0], report[1], failed)

    init = (tf.constant(""), tf.constant(-1, tf.int64), tf.constant(False),
            tf.constant(0, tf.int64))
    scanned = attempted.scan(init, step).filter(lambda v, ok, emit, f, i, n: emit)

    if not skip_corrupt:
        def check(value, ok, emit, file, index, failed):
            assertion = tf.debugging.Assert(ok, [tf.strings.join(
                ["Corrupt record or undecodable image: ", where(file, index)])])
            with tf.control_dependencies([assertion]):
                return tf.nest.map_structure(tf.identity, value)

        return scanned.map(check)

    def log(value, ok, emit, file, index, failed):
        line = tf.strings.join(["sat_tf.data: skipped corrupt ", where(file, index), " (",
                                tf.strings.as_string(failed), " skipped so far)"])
        printed = tf.print(line, output_stream=sys.stderr)
        with tf.control_dependencies([printed]):
            return tf.identity(ok)

    def keep(value, ok, emit, file, index, failed):
        return tf.cond(ok, lambda: ok, lambda: log(value, ok, emit, file, index, failed))

    return scanned.filter(keep).map(lambda value, ok, emit, file, index, failed: value)
