"""Reading records (sat_tf.data.sources), naming or skipping corrupt ones (sat_tf.data.corrupt),
and the table of datasets (sat_tf.data.DATASETS), on small shards written here.

Independent truths: the records each shard was written with, which of them were damaged and
how, and the dataset names sat_tf.config accepts.
"""
import collections
import re

import pytest
import tensorflow as tf

from sat_tf import config, data as data_lib
from sat_tf.config import DataConfig
from sat_tf.data import corrupt, imagenet, sources, tfrecord
from sat_tf.errors import UserError

SHARD_LABELS = ([1, 2, 3, 4], [5, 6, 7])   # 1-based labels on disk, per validation shard


def _jpeg(level):
    return tf.io.encode_jpeg(tf.fill([8, 8, 3], tf.constant(level, tf.uint8))).numpy()


def _example(encoded, label):
    return tfrecord.make_example(encoded, label, image_format="JPEG", height=8, width=8,
                                 synset="n0", text="n0", filename="x.JPEG")


def _write(path, records):
    with tf.io.TFRecordWriter(str(path)) as w:
        for r in records:
            w.write(r)
    return str(path)


@pytest.fixture()
def shards(tmp_path):
    """Two good validation shards of 4 and 3 records (pixel level 10 * label)."""
    return [_write(tmp_path / tfrecord.shard_name("validation", i, 2),
                   [_example(_jpeg(10 * y), y) for y in labels])
            for i, labels in enumerate(SHARD_LABELS)]


@pytest.fixture()
def damaged(tmp_path):
    """One shard: record 0 good, 1 an undecodable JPEG, 2 good, 3 cut short (unreadable)."""
    path = _write(tmp_path / "validation-00000-of-00001", [
        _example(_jpeg(10), 1), _example(b"\xff\xd8\xff\xe0 not a jpeg", 2),
        _example(_jpeg(30), 3), _example(_jpeg(40), 4)])
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[:-5])
    return path


def _cfg(data_dir, **kw):
    return DataConfig(dataset="images", data_dir=str(data_dir), **kw)


def _decode(image_bytes, label, position):
    image = tf.ensure_shape(tf.io.decode_jpeg(image_bytes, channels=3), [8, 8, 3])
    return image[0, 0, 0], label


def _names(stream):
    return [(n.decode(), int(i)) for n, i, _, _ in stream.elements.as_numpy_iterator()]


# --- the table of datasets -------------------------------------------------------------------

def test_the_table_holds_every_dataset_config_accepts():
    assert sorted(data_lib.DATASETS) == sorted(config.DATASETS)


@pytest.mark.parametrize("name", config.DATASETS)
def test_a_datasets_own_preprocessing_is_its_default_and_the_only_one_config_accepts(name):
    own = data_lib.DATASETS[name].preprocessing
    assert data_lib.info(DataConfig(dataset=name, data_dir="/nowhere")).preprocessing == (
        own or "imagenet")
    others = [p for p in config.PREPROCESSINGS if own and p != own]
    for other in others:
        with pytest.raises(ValueError, match=f"Invalid preprocessing {other!r}"):
            DataConfig(dataset=name, preprocessing=other, data_dir="/x").validate()


# --- reading records -------------------------------------------------------------------------

def test_tfrecord_stream_names_each_record_by_shard_and_index(shards):
    stream = sources.read(imagenet.RECORDS, _cfg(shards[0].rsplit("/", 1)[0]), "eval")
    expected = [(f, i) for f, labels in zip(shards, SHARD_LABELS) for i in range(len(labels))]
    assert sorted(_names(stream)) == sorted(expected)
    got = list(stream.decode(_decode, skip_corrupt=False).as_numpy_iterator())
    assert sorted((int(p), int(y)) for p, y in got) == [
        (10 * y, y - 1) for labels in SHARD_LABELS for y in labels]


def test_tfrecord_labels_start_at_the_label_base(shards):
    stream = sources.read(imagenet.RECORDS, _cfg(shards[0].rsplit("/", 1)[0]), "eval",
                          label_base=0)
    got = list(stream.decode(_decode, skip_corrupt=False).as_numpy_iterator())
    assert sorted(int(y) for _, y in got) == sorted(y for ys in SHARD_LABELS for y in ys)


@pytest.mark.parametrize("pipelines", [2, 3])   # by file (2 shards), then by record
def test_each_input_pipeline_reads_its_own_share(shards, pipelines):
    data_dir = shards[0].rsplit("/", 1)[0]
    parts = [collections.Counter(_names(sources.read(
        imagenet.RECORDS, _cfg(data_dir), "eval", tf.distribute.InputContext(pipelines, i))))
        for i in range(pipelines)]
    assert all(parts)
    assert sum(parts, collections.Counter()) == collections.Counter(
        (f, i) for f, labels in zip(shards, SHARD_LABELS) for i in range(len(labels)))
    if pipelines == 2:
        assert [{f for f, _ in p} for p in parts] == [{shards[0]}, {shards[1]}]


def test_shard_files_by_file_or_by_record():
    ctx = lambda n, i: tf.distribute.InputContext(num_input_pipelines=n, input_pipeline_id=i)
    assert sources.shard_files(list("abcde"), ctx(2, 1)) == (["b", "d"], False)
    assert sources.shard_files(list("abc"), ctx(4, 3)) == (["a", "b", "c"], True)
    assert sources.shard_files(list("abc"), None) == (["a", "b", "c"], False)


def test_missing_folder_or_shards_are_user_errors(tmp_path):
    cifar = DataConfig(dataset="cifar10", source="tfrecord")
    from sat_tf.data import cifar10
    with pytest.raises(UserError, match=re.escape(
            "dataset 'cifar10' with source 'tfrecord' needs data_dir (a folder of "
            "train-*/test-* TFRecords from run/make_tfrecords.py).")):
        sources.read(cifar10.RECORDS, cifar, "eval")
    with pytest.raises(UserError, match="No TFRecord files match .*validation-\\*"):
        sources.read(imagenet.RECORDS, _cfg(tmp_path), "eval")


# --- corrupt records, piece by piece, on a damaged shard --------------------------------------

def test_the_reader_marks_where_a_shard_becomes_unreadable(damaged):
    read = [(int(i), bool(ok)) for _, i, _, ok in
            tfrecord.read([damaged], cycle_length=1).as_numpy_iterator()]
    assert read == [(0, True), (1, True), (2, True), (3, False)]


def test_history_remembers_the_names_before_each_element(damaged):
    stream = corrupt.with_closing_element(tfrecord.read([damaged], cycle_length=1))
    got = list(corrupt.with_history(stream, 3).as_numpy_iterator())
    assert [int(e[0]) for e in got] == [0, 1, 2, 3, 4]                       # positions
    assert [e[2].tolist() for e in got] == [[-1, -1, 0], [-1, 0, 1], [0, 1, 2], [1, 2, 3],
                                            [2, 3, -1]]
    assert [n.decode() for n in got[2][1]] == [damaged] * 3
    assert [n.decode() for n in got[0][1]] == ["", "", damaged]
    assert [bool(e[5]) for e in got] == [True] * 4 + [False]                 # real


def test_attempts_drop_what_fails_and_counting_finds_the_gaps(damaged):
    stream = corrupt.with_closing_element(tfrecord.read([damaged], cycle_length=1))
    fn = lambda payload, position: _decode(*tfrecord.parse(payload), position)
    spec = corrupt.output_spec(fn, stream.element_spec[2])
    kept = corrupt.attempt_all(corrupt.with_history(stream, 4), fn, spec, closed=True)
    assert [int(e[1]) for e in kept.as_numpy_iterator()] == [0, 2, 4]         # positions
    counted = corrupt.count_lost(
        kept, lambda value, real, lost, failed, names, indices: ((lost, failed), real))
    assert [tuple(map(int, v)) for v, _ in counted.as_numpy_iterator()] == [
        (0, 0), (1, 0), (1, 1)]                                                # (lost, failed)


def test_lost_records_are_named_oldest_first_and_the_rest_counted():
    names, indices = tf.constant(["a", "b", "c", "d"]), tf.constant([5, 6, 7, 8], tf.int64)
    lost = lambda n: tf.constant(n, tf.int64)
    assert corrupt.first_lost(lost(2), names, indices).numpy() == b"record 6 of b"
    assert corrupt.first_lost(lost(5), names, indices).numpy() == (
        b"record 5 of a (and 2 corrupt records before it)")
    assert [l.decode() for l in corrupt.skipped_lines(lost(3), lost(2), names, indices).numpy()
            ] == ["sat_tf.data: skipped corrupt record 5 of a (3 skipped so far)",
                  "sat_tf.data: skipped corrupt record 6 of b (4 skipped so far)",
                  "sat_tf.data: skipped corrupt record 7 of c (5 skipped so far)"]
    assert [l.decode() for l in corrupt.skipped_lines(lost(5), lost(2), names, indices).numpy()
            ] == ["sat_tf.data: skipped 2 corrupt records not named (4 skipped so far)",
                  "sat_tf.data: skipped corrupt record 5 of a (5 skipped so far)",
                  "sat_tf.data: skipped corrupt record 6 of b (6 skipped so far)",
                  "sat_tf.data: skipped corrupt record 7 of c (7 skipped so far)"]


def test_fail_on_lost_names_the_first_lost_record():
    names, indices = tf.constant(["a", "b", "c"]), tf.constant([0, 1, 2], tf.int64)
    value, real = corrupt.fail_on_lost(tf.constant(7.0), tf.constant(True),
                                       tf.constant(0, tf.int64), tf.constant(0, tf.int64),
                                       names, indices)
    assert float(value) == 7.0 and bool(real)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="Corrupt record or undecodable image: record 0 of a"):
        corrupt.fail_on_lost(tf.constant(7.0), tf.constant(True), tf.constant(2, tf.int64),
                             tf.constant(0, tf.int64), names, indices)


def test_decoding_a_damaged_shard_names_or_skips_its_records(damaged, capfd):
    stream = sources.read(imagenet.RECORDS, _cfg(damaged.rsplit("/", 1)[0]), "eval")
    got = list(stream.decode(_decode, skip_corrupt=True).as_numpy_iterator())
    assert [(int(p), int(y)) for p, y in got] == [(10, 0), (30, 2)]
    lines = [l for l in capfd.readouterr().err.splitlines() if "sat_tf.data: skipped" in l]
    assert lines == [f"sat_tf.data: skipped corrupt record 1 of {damaged} (1 skipped so far)",
                     f"sat_tf.data: skipped corrupt record 3 of {damaged} (2 skipped so far)"]
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=re.escape(f"[Corrupt record or undecodable image: record 1 of "
                                                 f"{damaged}]")):
        list(stream.decode(_decode, skip_corrupt=False))


def test_decode_functions_must_give_static_shapes(damaged):
    stream = tfrecord.read([damaged], cycle_length=1)
    whole = lambda payload, position: tf.io.decode_jpeg(tfrecord.parse(payload)[0])
    with pytest.raises(ValueError, match="needs static output shapes"):
        corrupt.decode_reporting_corrupt(stream, whole, skip_corrupt=False)


def test_failures_in_a_long_run_and_at_the_end_are_counted(capfd):
    # fn fails where the payload is 0: records 1, 2, 3 (a run longer than the history of 2
    # names) and 5 (the last element of the stream).
    ds = tf.data.Dataset.from_tensor_slices((
        tf.constant(["a"] * 6), tf.range(6, dtype=tf.int64),
        tf.constant([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]), tf.constant([True] * 6)))

    def fn(payload, position):
        with tf.control_dependencies([tf.debugging.assert_positive(payload)]):
            return payload * 10.0 + tf.cast(position, tf.float32)

    decode = lambda ds, skip: corrupt.decode_reporting_corrupt(ds, fn, skip_corrupt=skip,
                                                               history=2)
    got = list(decode(ds, True).as_numpy_iterator())
    assert got == [10.0, 14.0]                                   # positions 0 and 4
    lines = [l for l in capfd.readouterr().err.splitlines() if "sat_tf.data: skipped" in l]
    assert lines == ["sat_tf.data: skipped 2 corrupt records not named (2 skipped so far)",
                     "sat_tf.data: skipped corrupt record 3 of a (3 skipped so far)",
                     "sat_tf.data: skipped corrupt record 5 of a (4 skipped so far)"]
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"record 3 of a \(and 2 corrupt records before it\)"):
        list(decode(ds, False))
    tail = ds.take(1).concatenate(ds.skip(5))                    # only the last one fails
    with pytest.raises(tf.errors.InvalidArgumentError, match="record 5 of a"):
        list(decode(tail, False))
