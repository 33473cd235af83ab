"""Corrupt records: decoding a record stream, and naming or skipping the records that fail.

A *record stream* holds ``(name, index, payload, readable)`` elements (:mod:`sat_tf.data.sources`):
``name`` and ``index`` say where the record came from (a shard's path and the record's place
in it), ``readable`` is False for a marker that stands for unreadable bytes. A record fails
when its decode function raises (a record that does not parse, an undecodable image, a label
below the label base) or when it is such a marker. :func:`decode_reporting_corrupt` runs the
decode function over the stream in one parallel map, in order, and then either stops with an
error naming the first failed record, or skips the failed records, printing one line per
record to stderr with the running count.

TensorFlow cannot say which element of a parallel map failed, so the stream is prepared for
it in steps, each a function here:

1. :func:`with_closing_element`: a finite stream gets a closing element (index -1, which skips
   the decode function), so failures at its very end are seen too.
2. :func:`with_history`: each element gets its position in the stream and the names of
   itself and of the elements before it (as many as the history holds).
3. :func:`attempt_all`: the decode function in one parallel map; ``ignore_errors`` drops
   the elements where it fails.
4. :func:`count_lost`: a gap in the positions before a kept element counts the failures, and
   the kept element's history names them; :func:`fail_on_lost` or :func:`skip_lost` acts on
   them. The closing element is then dropped.
"""
from __future__ import annotations

import sys
from typing import Callable

import tensorflow as tf

HISTORY = 32    # consecutive failures decode_reporting_corrupt names (it counts them all)


def decode_reporting_corrupt(ds: tf.data.Dataset, fn, *, skip_corrupt: bool,
                             history: int = HISTORY) -> tf.data.Dataset:
    """Maps ``fn`` over the ``(name, index, payload, readable)`` elements of ``ds``, reporting
    failures by name.

    ``fn(payload, position)`` returns tensors with static shapes (e.g. a decoded image and its
    label); ``position`` is the int64 position of the element in ``ds`` (0, 1, 2, ...).
    When it fails (a corrupt record, an undecodable image), or ``readable`` is False, then
    with ``skip_corrupt=False`` iteration fails with an InvalidArgumentError ``Corrupt record
    or undecodable image: record <index> of <name>``; with ``skip_corrupt=True`` the element
    is dropped and one line ``sat_tf.data: skipped corrupt record <index> of <name> (<n>
    skipped so far)`` is printed to stderr, with the running count. Of consecutive failures,
    the last ``history - 1`` are named and the others counted. ``fn`` runs in one parallel map
    and the order is kept.
    """
    spec = output_spec(fn, ds.element_spec[2])
    finite = tf.get_static_value(ds.cardinality()) != tf.data.INFINITE_CARDINALITY
    if finite:
        ds = with_closing_element(ds)
    ds = attempt_all(with_history(ds, history), fn, spec, closed=finite)
    ds = count_lost(ds, skip_lost if skip_corrupt else fail_on_lost)
    return ds.filter(_is_real).map(_value_of)


def output_spec(fn, payload_spec):
    """The ``tf.TensorSpec`` structure of ``fn(payload, position)``; a ValueError unless every
    shape is static (the closing element gets zeros of these shapes)."""
    spec = tf.nest.map_structure(
        tf.TensorSpec.from_tensor,
        tf.function(fn, autograph=False).get_concrete_function(
            payload_spec, tf.TensorSpec([], tf.int64)).structured_outputs)
    for s in tf.nest.flatten(spec):
        if not s.shape.is_fully_defined():
            raise ValueError(f"decode_reporting_corrupt needs static output shapes, got {s}.")
    return spec


def zeros(spec):
    """Zero tensors shaped as the ``tf.TensorSpec`` structure ``spec`` (unknown sizes: 0)."""
    return tf.nest.map_structure(
        lambda s: tf.zeros([d or 0 for d in s.shape], s.dtype), spec)


def with_closing_element(ds: tf.data.Dataset) -> tf.data.Dataset:
    """``ds`` and one closing element: name "", index -1, a zero payload, readable."""
    return ds.concatenate(tf.data.Dataset.from_tensors((
        tf.constant(""), tf.constant(-1, tf.int64), zeros(ds.element_spec[2]),
        tf.constant(True))))


def with_history(ds: tf.data.Dataset, history: int) -> tf.data.Dataset:
    """``(position, names, indices, payload, readable, real)`` of each element of a record
    stream: its position in ``ds``; the names and indices of the ``history`` elements up to
    and including it, oldest first ("" and -1 before the stream's first); and ``real``,
    False for the closing element (index -1)."""
    def remember(state, element):
        position, names, indices = state
        name, index, payload, readable = element
        names = tf.concat([names[1:], [name]], 0)
        indices = tf.concat([indices[1:], [index]], 0)
        return ((position + 1, names, indices),
                (position, names, indices, payload, readable, index >= 0))

    return ds.scan((tf.constant(0, tf.int64), tf.fill([history], ""),
                    tf.fill([history], tf.constant(-1, tf.int64))), remember)


def attempt_all(ds: tf.data.Dataset, fn, spec, *, closed: bool) -> tf.data.Dataset:
    """``(value, position, names, indices, real)`` of the elements of :func:`with_history`
    where ``value = fn(payload, position)`` succeeds: an element whose ``fn`` fails, or that
    is not readable, is dropped. With ``closed``, the closing element skips ``fn`` and
    gets zeros of ``spec``. One parallel map; the order is kept."""
    def attempt(position, names, indices, payload, readable, real):
        def work():
            check = tf.debugging.Assert(readable, ["unreadable record"])
            with tf.control_dependencies([check]):
                return fn(payload, position)

        value = tf.cond(real, work, lambda: zeros(spec)) if closed else work()
        return value, position, names, indices, real

    return ds.map(attempt, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True).ignore_errors()


def count_lost(ds: tf.data.Dataset, act: Callable) -> tf.data.Dataset:
    """``act(value, real, lost, failed, names, indices)`` of each element of
    :func:`attempt_all`: ``lost`` elements were dropped just before it (the gap in the
    positions), ``failed`` before those. ``act`` returns ``(value, real)``."""
    def count(state, element):
        expected, failed = state
        value, position, names, indices, real = element
        lost = position - expected
        return (position + 1, failed + lost), act(value, real, lost, failed, names, indices)

    return ds.scan((tf.constant(0, tf.int64), tf.constant(0, tf.int64)), count)


def record_names(names, indices):
    """``record <index> of <name>``, elementwise."""
    return tf.strings.join(["record ", tf.strings.as_string(indices), " of ", names])


def lost_records(lost, names, indices):
    """``(named, unnamed)`` for the ``lost`` elements before the last of a history: the
    :func:`record_names` of those it holds, oldest first, and how many more were lost."""
    history = names.shape[0]
    known = tf.minimum(lost, history - 1)
    begin = tf.cast(history - 1 - known, tf.int32)
    return record_names(names[begin:history - 1], indices[begin:history - 1]), lost - known


def first_lost(lost, names, indices):
    """The name of the first of ``lost`` (> 0) elements lost before the last of a history,
    with ``(and <n> corrupt records before it)`` when the history is too short to hold it."""
    named, unnamed = lost_records(lost, names, indices)
    return tf.cond(unnamed > 0, lambda: tf.strings.join([
        named[0], " (and ", tf.strings.as_string(unnamed), " corrupt records before it)"]),
        lambda: named[0])


def fail_on_lost(value, real, lost, failed, names, indices):
    """``(value, real)``, after an assertion that fails iteration with ``Corrupt record or
    undecodable image: <the first lost record>`` when ``lost`` > 0."""
    message = tf.cond(lost > 0, lambda: first_lost(lost, names, indices),
                      lambda: tf.constant(""))
    assertion = tf.debugging.Assert(tf.equal(lost, 0), [tf.strings.join(
        ["Corrupt record or undecodable image: ", message])])
    with tf.control_dependencies([assertion]):
        return tf.nest.map_structure(tf.identity, value), real


def skipped_lines(lost, failed, names, indices):
    """The lines that report ``lost`` (> 0) skipped elements after ``failed`` earlier ones:
    ``sat_tf.data: skipped corrupt <record name> (<n> skipped so far)`` per named one, after
    one line that counts those the history does not name."""
    named, unnamed = lost_records(lost, names, indices)
    counts = failed + unnamed + tf.range(1, tf.size(named, tf.int64) + 1)
    lines = tf.strings.join(["sat_tf.data: skipped corrupt ", named, " (",
                             tf.strings.as_string(counts), " skipped so far)"])
    unnamed_line = tf.strings.join([
        "sat_tf.data: skipped ", tf.strings.as_string(unnamed),
        " corrupt records not named (", tf.strings.as_string(failed + unnamed),
        " skipped so far)"])
    return tf.cond(unnamed > 0, lambda: tf.concat([[unnamed_line], lines], 0), lambda: lines)


def skip_lost(value, real, lost, failed, names, indices):
    """``(value, real)``, after printing the :func:`skipped_lines` to stderr when ``lost`` > 0."""
    def log():
        printed = tf.print(tf.strings.reduce_join(
            skipped_lines(lost, failed, names, indices), separator="\n"),
            output_stream=sys.stderr)
        with tf.control_dependencies([printed]):
            return tf.identity(real)

    return value, tf.cond(lost > 0, log, lambda: real)


def _is_real(value, real):
    return real


def _value_of(value, real):
    return value
