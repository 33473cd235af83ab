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


HISTORY = 32    # consecutive failures decode_reporting_corrupt names (it counts them all)


def decode_reporting_corrupt(ds: tf.data.Dataset, fn, *, skip_corrupt: bool) -> tf.data.Dataset:
    """Maps ``fn`` over ``(file, index, payload, readable)`` elements, reporting failures by name.

    ``fn(payload, position)`` returns tensors with static shapes (e.g. a decoded image and its
    label); ``position`` is the int64 position of the element in ``ds`` (0, 1, 2, ...).
    When it fails (a corrupt record, an undecodable image), or ``readable`` is False, then
    with ``skip_corrupt=False`` iteration fails with an InvalidArgumentError that names
    ``file`` and ``index``; with ``skip_corrupt=True`` the element is dropped and one line
    ``sat_tf.data: skipped corrupt record <index> of <file> (<n> skipped so far)`` is printed to
    stderr, with the running count. ``fn`` runs in one parallel map and the order is kept.
    """
    payload_spec = ds.element_spec[2]
    spec = tf.nest.map_structure(
        tf.TensorSpec.from_tensor,
        tf.function(fn, autograph=False).get_concrete_function(
            payload_spec, tf.TensorSpec([], tf.int64)).structured_outputs)
    for s in tf.nest.flatten(spec):
        if not s.shape.is_fully_defined():
            raise ValueError(f"decode_reporting_corrupt needs static output shapes, got {s}.")

    def zeros(structure, leading=()):
        return tf.nest.map_structure(
            lambda s: tf.zeros(list(leading) + [d or 0 for d in s.shape], s.dtype), structure)

    # Each element carries its stream position and the (file, index) of itself and the
    # HISTORY - 1 elements before it; fn runs in one parallel map and ignore_errors drops the
    # elements where it fails. A gap in the positions after it counts the failures, and the
    # history of the next kept element names them. A finite stream gets a closing element
    # (which skips fn) so failures at its very end are seen too.
    finite = tf.get_static_value(ds.cardinality()) != tf.data.INFINITE_CARDINALITY
    if finite:      # index -1 marks the closing element
        ds = ds.concatenate(tf.data.Dataset.from_tensors((
            tf.constant(""), tf.constant(-1, tf.int64), zeros(payload_spec), tf.constant(True))))

    def remember(state, element):
        position, files, indices = state
        file, index, payload, readable = element
        files = tf.concat([files[1:], [file]], 0)
        indices = tf.concat([indices[1:], [index]], 0)
        return ((position + 1, files, indices),
                (position, files, indices, payload, readable, index >= 0))

    ds = ds.scan((tf.constant(0, tf.int64), tf.fill([HISTORY], ""),
                  tf.fill([HISTORY], tf.constant(-1, tf.int64))), remember)

    def attempt(position, files, indices, payload, readable, real):
        def work():
            check = tf.debugging.Assert(readable, ["unreadable record"])
            with tf.control_dependencies([check]):
                return fn(payload, position)

        value = tf.cond(real, work, lambda: zeros(spec)) if finite else work()
        return value, position, files, indices, real

    ds = ds.map(attempt, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()

    def where(file, index):
        return tf.strings.join(["record ", tf.strings.as_string(index), " of ", file])

    def lost_records(lost, files, indices):
        """``where`` of the ``lost`` elements before the last of ``files`` (as many as known)."""
        known = tf.minimum(lost, HISTORY - 1)
        begin = tf.cast(HISTORY - 1 - known, tf.int32)
        return where(files[begin:HISTORY - 1], indices[begin:HISTORY - 1]), lost - known

    if not skip_corrupt:
        def check(value, real, lost, failed, files, indices):
            def first_lost():
                named, unnamed = lost_records(lost, files, indices)
                return tf.cond(unnamed > 0, lambda: tf.strings.join([
                    named[0], " (and ", tf.strings.as_string(unnamed),
                    " corrupt records before it)"]), lambda: named[0])

            message = tf.cond(lost > 0, first_lost, lambda: tf.constant(""))
            assertion = tf.debugging.Assert(tf.equal(lost, 0), [tf.strings.join(
                ["Corrupt record or undecodable image: ", message])])
            with tf.control_dependencies([assertion]):
                return tf.nest.map_structure(tf.identity, value), real

    else:
        def check(value, real, lost, failed, files, indices):
            def log():
                named, unnamed = lost_records(lost, files, indices)
                counts = failed + unnamed + tf.range(1, tf.size(named, tf.int64) + 1)
                lines = tf.strings.join(["sat_tf.data: skipped corrupt ", named, " (",
                                         tf.strings.as_string(counts), " skipped so far)"])
                unnamed_line = tf.strings.join([
                    "sat_tf.data: skipped ", tf.strings.as_string(unnamed),
                    " corrupt records not named (", tf.strings.as_string(failed + unnamed),
                    " skipped so far)"])
                lines = tf.cond(unnamed > 0, lambda: tf.concat([[unnamed_line], lines], 0),
                                lambda: lines)
                printed = tf.print(tf.strings.reduce_join(lines, separator="\n"),
                                   output_stream=sys.stderr)
                with tf.control_dependencies([printed]):
                    return tf.identity(real)

            return value, tf.cond(lost > 0, log, lambda: real)

    # State: the next expected position, failures so far.
    def count(state, element):
        expected, failed = state
        value, position, files, indices, real = element
        lost = position - expected
        return (position + 1, failed + lost), check(value, real, lost, failed, files, indices)

    def is_real(value, real):
        return real

    def value_of(value, real):
        return value

    ds = ds.scan((tf.constant(0, tf.int64), tf.constant(0, tf.int64)), count)
    return ds.filter(is_real).map(value_of)
