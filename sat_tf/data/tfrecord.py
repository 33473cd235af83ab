"""The TFRecord format every converted dataset uses, and fault-reporting readers for it.

The format is the official ImageNet one of the TPU ResNet/EfficientNet code (DESIGN.md §5):
one ``tf.train.Example`` per image with ``image/encoded`` (JPEG, or PNG for CIFAR-10),
``image/format``, ``image/class/label`` (**1-based**: class index + 1), ``image/class/synset``,
``image/class/text``, ``image/height``, ``image/width``, ``image/colorspace``,
``image/channels``, ``image/filename`` and empty ``image/object/bbox/*`` lists. Shards are named
``<split>-%05d-of-%05d``; ``label_map.txt`` beside them lists ``<label> <synset>`` per line.

Reading (:func:`read`) yields ``(file, index, record, readable)`` per record, where ``file`` and
``index`` say where the record came from, so a corrupt record can be reported by name
(:func:`sat_tf.data.corrupt.decode_reporting_corrupt`). ``readable`` is False for one marker
element when the file holds unreadable bytes (a bad checksum or a truncated record) at
``index``; the rest of that file cannot be read.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
from typing import Sequence

import tensorflow as tf

from sat_tf.errors import UserError

_SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d{5})-of-(?P<count>\d{5})$")
_READ_BUFFER_BYTES = 8 << 20     # what the TPU reference uses for GCS reads
_RECORD_OVERHEAD_BYTES = 16      # length (8) + length CRC (4) + data CRC (4)


def shard_name(split: str, index: int, num_shards: int) -> str:
    """``train-00012-of-01024``."""
    return f"{split}-{index:05d}-of-{num_shards:05d}"


def incomplete_name(name: str) -> str:
    """Where a shard is written before it is renamed into place (not matched by ``split-*``)."""
    return f".{name}.incomplete"


def make_example(encoded: bytes, label: int, *, image_format: str, height: int, width: int,
                 synset: str, text: str, filename: str) -> bytes:
    """One serialized ``tf.train.Example`` in the official format; ``label`` is 1-based."""
    if label < 1:
        raise ValueError(f"Invalid label {label!r}; labels on disk are 1-based.")

    def b(v: str | bytes):
        v = v.encode() if isinstance(v, str) else v
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v: int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    empty_floats = tf.train.Feature(float_list=tf.train.FloatList(value=[]))
    feature = {
        "image/encoded": b(encoded), "image/format": b(image_format),
        "image/class/label": i(label), "image/class/synset": b(synset), "image/class/text": b(text),
        "image/height": i(height), "image/width": i(width), "image/colorspace": b("RGB"),
        "image/channels": i(3), "image/filename": b(filename),
        "image/object/bbox/xmin": empty_floats, "image/object/bbox/ymin": empty_floats,
        "image/object/bbox/xmax": empty_floats, "image/object/bbox/ymax": empty_floats,
        "image/object/bbox/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


_PARSE_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}


def parse(record, label_base: int = 1):
    """``(encoded image bytes, int32 0-based label)`` of one serialized record; labels on disk
    start at ``label_base`` (1 in the official format)."""
    features = tf.io.parse_single_example(record, _PARSE_FEATURES)
    label = tf.cast(features["image/class/label"], tf.int32) - label_base
    check = tf.debugging.assert_non_negative(
        label, message=f"labels on disk must start at {label_base} (see --label_base)")
    with tf.control_dependencies([check]):
        return features["image/encoded"], tf.identity(label)


def list_files(data_dir: str, split: str) -> list[str]:
    """The sorted ``<split>-*`` shards in ``data_dir`` (local or ``gs://``).

    Raises a one-line :class:`~sat_tf.errors.UserError` when there are none, or when
    officially named shards (``split-NNNNN-of-MMMMM``) are missing some of the M shards (an
    unfinished conversion).
    Inside :func:`remembered_listings` the answer is computed once.
    """
    if _memo is None:
        return _list_files(data_dir, split)
    key = ("list", data_dir, split)
    if key not in _memo:
        _memo[key] = _list_files(data_dir, split)
    return list(_memo[key])


_memo: dict | None = None


@contextlib.contextmanager
def remembered_listings():
    """Inside the context, :func:`list_files` and :func:`file_sizes` ask the file system once
    per folder and file.

    ``distribute_datasets_from_function`` builds one input pipeline per host on the client
    (dozens on a TPU pod), each listing and statting the shards again: on a bucket, thousands
    of round trips. Outside the context nothing is remembered, so files rewritten later (a
    conversion that went on, a repaired shard) are seen as they are.
    """
    global _memo
    outer = _memo
    _memo = {} if outer is None else outer
    try:
        yield
    finally:
        _memo = outer


def _list_files(data_dir: str, split: str) -> list[str]:
    pattern = os.path.join(data_dir, f"{split}-*")
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise UserError(f"No TFRecord files match {pattern!r}; expected shards named like "
                        f"{shard_name(split, 0, 1024)} (run/make_tfrecords.py writes them).")
    found = [_SHARD_RE.match(os.path.basename(f)) for f in files]
    if all(found):
        counts = {int(m["count"]) for m in found}
        if len(counts) > 1:
            raise UserError(f"{data_dir!r} mixes {split} shard sets of sizes {sorted(counts)}.")
        (count,) = counts
        if len(files) != count:
            raise UserError(f"{data_dir!r} has {len(files)} of the {count} {split} shards; "
                            "the conversion is incomplete.")
    return files


def file_sizes(files: Sequence[str]) -> list[int]:
    """Byte sizes of ``files`` (stat calls in parallel: they are round trips on GCS; once per
    file inside :func:`remembered_listings`)."""
    sizes = {} if _memo is None else _memo
    missing = [f for f in dict.fromkeys(files) if ("size", f) not in sizes]
    if missing:
        with concurrent.futures.ThreadPoolExecutor(min(32, len(missing))) as pool:
            found = pool.map(lambda f: tf.io.gfile.stat(f).length, missing)
            sizes.update({("size", f): n for f, n in zip(missing, found)})
    return [sizes[("size", f)] for f in files]


def read(files: Sequence[str], *, cycle_length: int, shuffle_seed: int | None = None):
    """Records of ``files``, interleaved: ``(file, index, record, readable)``.

    ``shuffle_seed``: visit the files in a seeded random order, a new one each iteration.
    """
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(list(files), tf.string), tf.constant(file_sizes(files), tf.int64)))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.interleave(_read_file, cycle_length=cycle_length, block_length=1,
                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _read_file(filename, size):
    # TFRecordDataset stops a file at its first unreadable record and, under ignore_errors,
    # goes on silently. Counting the bytes of the records read tells whether it reached the
    # end: if not, a marker element (readable=False) reports where it stopped.
    # A file gone since it was listed would make the reader under ignore_errors retry
    # forever: read it only if it exists, so a missing file reads as unreadable at record 0.
    exists = tf.size(tf.io.matching_files(filename)) > 0
    records = tf.data.Dataset.from_tensors(exists).filter(lambda e: e).flat_map(
        lambda _: tf.data.TFRecordDataset(filename, buffer_size=_READ_BUFFER_BYTES)
        .ignore_errors())
    end = tf.data.Dataset.from_tensors((tf.constant(b""), False))
    marked = records.map(lambda r: (r, True)).concatenate(end)

    def step(state, element):
        offset, index = state
        record, is_record = element
        length = tf.cast(tf.strings.length(record), tf.int64) + _RECORD_OVERHEAD_BYTES
        # The end marker of a file read to its end gets index -1 and is dropped.
        index_out = tf.where(tf.logical_or(is_record, offset < size), index, -1)
        return (offset + length, index + 1), (filename, index_out, record, is_record)

    located = marked.scan((tf.constant(0, tf.int64), tf.constant(0, tf.int64)), step)

    def keep(filename, index, record, readable):
        return index >= 0

    return located.filter(keep)
