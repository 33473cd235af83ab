"""ImageNet pipeline on a small converted tree of real photos (sklearn's china/flower crops).

Independent truths: the synsets the tree was written with (sorted index = 0-based label), the
record counts, a plain TFRecordDataset read of the same files, and full-decode-then-crop for
the crop-before-decode path.
"""
import collections
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from sat_tf import data as data_lib
from sat_tf.config import DataConfig
from sat_tf.data import convert, imagenet, testing, tfrecord
from sat_tf.errors import UserError

NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 5, 3     # 20 train, 12 validation images
SIZE = 32


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagenet"))
    truth = testing.write_imagenet_tree(os.path.join(root, "raw"), num_classes=NUM_CLASSES,
                                        train_per_class=TRAIN_PER_CLASS,
                                        validation_per_class=VAL_PER_CLASS, image_shape=(60, 80))
    out = os.path.join(root, "tfrecords")
    convert.convert_imagenet_tree(os.path.join(root, "raw"), out, train_shards=4,
                                  validation_shards=3, num_workers=2, progress=False)
    return out, truth


def _cfg(data_dir, **kw):
    kw.setdefault("shuffle_buffer", 64)
    kw.setdefault("preprocessing", "imagenet")    # the 60x80 photos would default to "resize"
    return DataConfig(dataset="imagenet", data_dir=data_dir, **kw)


def _labels(truth, split):
    synsets = testing.synset_names(NUM_CLASSES)
    return sorted(synsets.index(s) for s in truth[split].values())


def _eval_examples(ds):
    """Real (unpadded) examples of an eval dataset: list of (label, image bytes)."""
    out = []
    for images, labels, mask in ds:
        for x, y, m in zip(images.numpy(), labels.numpy(), mask.numpy()):
            if m:
                out.append((int(y), np.round(x, 3).tobytes()))
    return out


def _reference_eval_examples(data_dir):
    """The same examples through a plain sequential read (no sharding, interleave, batching)."""
    files = tfrecord.list_files(data_dir, "validation")
    out = []
    for record in tf.data.TFRecordDataset(files):
        image_bytes, label = tfrecord.parse(record)
        out.append((int(label), np.round(imagenet.preprocess_eval(image_bytes, SIZE).numpy(), 3)
                    .tobytes()))
    return out


def test_eval_covers_every_example_exactly_once(tree):
    data_dir, truth = tree
    ds = data_lib.build_dataset(_cfg(data_dir), split="eval", batch_size=5, image_size=SIZE)
    batches = list(ds)
    assert len(batches) == 3                                   # ceil(12 / 5)
    for images, labels, mask in batches:
        assert images.shape == (5, SIZE, SIZE, 3) and images.dtype == tf.float32
        assert labels.dtype == tf.int32 and mask.dtype == tf.float32
        assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255.0
    np.testing.assert_array_equal(batches[-1][2].numpy(), [1, 1, 0, 0, 0])
    got = _eval_examples(ds)
    assert sorted(y for y, _ in got) == _labels(truth, "validation")   # 0-based synset index
    assert collections.Counter(got) == collections.Counter(_reference_eval_examples(data_dir))


@pytest.mark.parametrize("num_hosts", [2, 4])   # 3 validation files: by file, then by record
def test_per_host_shards_are_disjoint_and_complete(tree, num_hosts):
    data_dir, _ = tree
    parts = []
    for i in range(num_hosts):
        ctx = tf.distribute.InputContext(num_input_pipelines=num_hosts, input_pipeline_id=i)
        parts.append(collections.Counter(_eval_examples(data_lib.build_dataset(
            _cfg(data_dir), split="eval", batch_size=4, image_size=SIZE, input_context=ctx))))
    assert all(parts)
    assert sum(parts, collections.Counter()) == collections.Counter(
        _reference_eval_examples(data_dir))


def test_train_batches_epochs_and_determinism(tree):
    data_dir, truth = tree
    build = lambda seed: data_lib.build_dataset(_cfg(data_dir, seed=seed), split="train",
                                                batch_size=4, image_size=SIZE)
    ds = build(1)
    assert ds.element_spec[0].shape == (4, SIZE, SIZE, 3)     # drop_remainder: static batch
    batches = [(x.numpy(), y.numpy()) for x, y in ds.take(10)]  # 40 examples = 2 epochs
    for x, y in batches:
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert x.min() >= 0.0 and x.max() <= 255.0 and x.max() > 100.0
    labels = np.concatenate([y for _, y in batches])
    # Shuffled within an epoch, but every epoch holds every record exactly once.
    assert sorted(labels[:20]) == _labels(truth, "train") == sorted(labels[20:])
    assert list(labels[:20]) != list(labels[20:])
    again = [(x.numpy(), y.numpy()) for x, y in build(1).take(10)]
    for (x1, y1), (x2, y2) in zip(batches, again):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    other = next(iter(build(2)))[0].numpy()
    assert not np.array_equal(other, batches[0][0])


def _one_jpeg(data_dir):
    record = next(iter(tf.data.TFRecordDataset(tfrecord.list_files(data_dir, "validation"))))
    return tfrecord.parse(record)[0]


def _assert_same_picture(got, expected):
    # Decoding a crop upsamples chroma slightly differently at its edges than decoding the
    # whole image does; any other window would differ by tens of levels almost everywhere.
    diff = np.abs(np.asarray(got) - np.asarray(expected))
    assert diff.mean() < 0.25 and diff[3:-3, 3:-3].max() < 4.0, (diff.mean(), diff.max())


def test_eval_crop_is_the_centre_of_the_decoded_image(tree):
    assert imagenet.center_crop_window([60, 80], 32).numpy().tolist() == [15, 25, 30, 30]
    assert imagenet.center_crop_window([375, 500], 224).numpy().tolist() == [24, 86, 328, 328]
    jpeg = _one_jpeg(tree[0])
    full = tf.io.decode_jpeg(jpeg, channels=3)
    assert full.shape[:2] == (60, 80)
    expected = tf.clip_by_value(tf.image.resize(full[15:45, 25:55], [SIZE, SIZE], "bicubic"),
                                0.0, 255.0)
    _assert_same_picture(imagenet.preprocess_eval(jpeg, SIZE), expected)


def test_train_crop_matches_full_decode_then_crop(tree):
    jpeg = _one_jpeg(tree[0])
    full = tf.io.decode_jpeg(jpeg, channels=3)
    seen = set()
    for seed in range(8):
        key = tf.constant([seed, 7], tf.int64)
        crop_key, flip_key, _ = tf.unstack(tf.random.experimental.stateless_split(key, 3))
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            [60, 80, 3], tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=crop_key,
            min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
            max_attempts=10)
        y, x, h, w = int(begin[0]), int(begin[1]), int(size[0]), int(size[1])
        if (h, w) == (60, 80):
            continue                     # every attempt failed: the centre-crop case below
        assert 0.1 * 60 * 80 <= h * w and 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
        expected = tf.clip_by_value(tf.image.resize(full[y:y + h, x:x + w], [SIZE, SIZE],
                                                    "bicubic"), 0.0, 255.0)
        expected = tf.image.stateless_random_flip_left_right(expected, flip_key)
        _assert_same_picture(imagenet.preprocess_train(jpeg, key, SIZE), expected)
        seen.add((y, x, h, w))
    assert len(seen) > 4


def test_train_crop_falls_back_to_the_centre_crop(tree):
    # A 10x200 strip cannot hold a 3/4..4/3 box of >= 8 % of its area: every attempt fails.
    strip = tf.io.encode_jpeg(tf.fill([10, 200, 3], tf.constant(200, tf.uint8)))
    got = imagenet.preprocess_train(strip, tf.constant([0, 0], tf.int64), 8)
    np.testing.assert_allclose(got, imagenet.preprocess_eval(strip, 8), atol=1e-3)


def test_randaugment_pipeline(tree):
    ds = data_lib.build_dataset(_cfg(tree[0], augment="randaugment"), split="train",
                                batch_size=4, image_size=SIZE)
    x, y = next(iter(ds))
    assert x.shape == (4, SIZE, SIZE, 3) and 0.0 <= float(tf.reduce_min(x))
    assert float(tf.reduce_max(x)) <= 255.0
    # Augmented pixels come from uint8 operations: whole numbers.
    np.testing.assert_array_equal(x.numpy(), np.round(x.numpy()))


@pytest.mark.parametrize("cache_eval", [False, True])
def test_cache_eval_reads_the_shards_once(tree, tmp_path, cache_eval):
    """With cache_eval the second pass comes from memory: it is the first pass exactly, even
    with the shards overwritten by zeros. Without it the second pass reads the files again
    and reports them corrupt."""
    for name in os.listdir(tree[0]):
        if name.startswith("validation-"):
            shutil.copy(os.path.join(tree[0], name), tmp_path / name)
    ds = data_lib.build_dataset(_cfg(str(tmp_path), cache_eval=cache_eval), split="eval",
                                batch_size=8, image_size=SIZE)
    first = _eval_examples(ds)
    assert first == _eval_examples(ds) and len(first) == NUM_CLASSES * VAL_PER_CLASS
    for shard in tmp_path.glob("validation-*"):
        shard.write_bytes(bytes(shard.stat().st_size))
    if cache_eval:
        assert _eval_examples(ds) == first
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="Corrupt record"):
            _eval_examples(ds)


def _example(jpeg, label):
    return tfrecord.make_example(jpeg, label, image_format="JPEG", height=8, width=8,
                                 synset="n0", text="n0", filename="x.JPEG")


@pytest.fixture()
def damaged(tree, tmp_path):
    """The 3 validation shards (4 records each) behind a new first shard, with four kinds of
    damage: an undecodable JPEG and an unparsable record (shard 0), a bad checksum in record 1
    (shard 1), a truncated last record (shard 2)."""
    src, _ = tree
    good = tf.io.encode_jpeg(tf.fill([8, 8, 3], tf.constant(90, tf.uint8))).numpy()
    with tf.io.TFRecordWriter(str(tmp_path / "validation-00000-of-00004")) as w:
        w.write(_example(good, 1))
        w.write(_example(b"\xff\xd8\xff\xe0 not a jpeg", 2))
        w.write(b"not a tf.train.Example")
        w.write(_example(good, 3))
    originals = sorted(n for n in os.listdir(src) if n.startswith("validation-"))
    for i, name in enumerate(originals):
        shutil.copy(os.path.join(src, name), tmp_path / f"validation-0000{i + 1}-of-00004")
    files = sorted(str(p) for p in tmp_path.glob("validation-*"))
    blob = bytearray(open(files[1], "rb").read())
    first = int.from_bytes(blob[:8], "little")
    blob[16 + first + 12 + 40] ^= 0xFF
    open(files[1], "wb").write(bytes(blob))
    blob = open(files[2], "rb").read()
    open(files[2], "wb").write(blob[:len(blob) - 100])
    return str(tmp_path), files


def test_corrupt_record_error_names_the_file(damaged):
    data_dir, files = damaged
    ds = data_lib.build_dataset(_cfg(data_dir), split="eval", batch_size=4, image_size=SIZE)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=f"Corrupt record or undecodable image: record 1 of {files[0]}"):
        list(ds)


def test_unreadable_file_tail_error_names_the_file(damaged, tmp_path_factory):
    _, files = damaged
    only = str(tmp_path_factory.mktemp("checksum") / "validation-00000-of-00001")
    shutil.copy(files[1], only)                   # the bad checksum in record 1
    ds = data_lib.build_dataset(_cfg(os.path.dirname(only)), split="eval", batch_size=4,
                                image_size=SIZE)
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"record 1 of {only}"):
        list(ds)


def test_skip_corrupt_skips_counts_and_logs(damaged, capfd):
    data_dir, files = damaged
    ds = data_lib.build_dataset(_cfg(data_dir, skip_corrupt=True), split="eval", batch_size=4,
                                image_size=SIZE)
    got = _eval_examples(ds)
    # Kept: 2 of shard 0, record 0 of shard 1 (the rest is unreadable), 3 of shard 2, all 4
    # of shard 3.
    assert len(got) == 2 + 1 + 3 + 4
    assert sorted(y for y, _ in got)[:2] == [0, 0]              # the two label-1 records
    lines = [l for l in capfd.readouterr().err.splitlines() if "sat_tf.data: skipped" in l]
    found = [re.fullmatch(r"sat_tf\.data: skipped corrupt (record \d+ of \S+) "
                          r"\((\d+) skipped so far\)", l).groups() for l in lines]
    assert [int(n) for _, n in found] == [1, 2, 3, 4]
    assert sorted(w for w, _ in found) == sorted([
        f"record 1 of {files[0]}", f"record 2 of {files[0]}", f"record 1 of {files[1]}",
        f"record 3 of {files[2]}"])


def test_labels_on_disk_must_be_one_based(tmp_path):
    good = tf.io.encode_jpeg(tf.fill([8, 8, 3], tf.constant(90, tf.uint8))).numpy()
    serialized = _example(good, 1)
    example = tf.train.Example.FromString(serialized)
    example.features.feature["image/class/label"].int64_list.value[0] = 0
    path = str(tmp_path / "validation-00000-of-00001")
    with tf.io.TFRecordWriter(path) as w:
        w.write(serialized)                       # label 1 on disk -> 0 out
        w.write(example.SerializeToString())      # label 0 on disk: not the official format
    ds = data_lib.build_dataset(_cfg(str(tmp_path), skip_corrupt=True), split="eval",
                                batch_size=2, image_size=8)
    images, labels, mask = next(iter(ds))
    assert labels.numpy().tolist() == [0, 0] and mask.numpy().tolist() == [1.0, 0.0]


def test_missing_or_incomplete_data_dir(tree, tmp_path):
    with pytest.raises(UserError, match="No TFRecord files match"):
        data_lib.build_dataset(_cfg(str(tmp_path)), split="train", batch_size=2)
    shutil.copy(os.path.join(tree[0], "train-00000-of-00004"), tmp_path)
    with pytest.raises(UserError, match="has 1 of the 4 train shards"):
        data_lib.build_dataset(_cfg(str(tmp_path)), split="train", batch_size=2)
    with pytest.raises(ValueError, match="needs data_dir"):
        DataConfig(dataset="imagenet").validate()


def test_tfds_imagenet2012_source(tmp_path):
    cfg = DataConfig(dataset="imagenet", source="tfds", data_dir=str(tmp_path),
                     manual_dir=str(tmp_path), shuffle_buffer=16)
    with tfds.testing.mock_data(num_examples=6):
        batches = list(data_lib.build_dataset(cfg, split="eval", batch_size=4, image_size=SIZE))
        x, y = next(iter(data_lib.build_dataset(cfg, split="train", batch_size=4,
                                                image_size=SIZE)))
    assert [int(m.numpy().sum()) for _, _, m in batches] == [4, 2]
    for images, labels, _ in batches:
        assert images.shape == (4, SIZE, SIZE, 3) and labels.dtype == tf.int32
        assert 0 <= int(tf.reduce_min(labels)) and int(tf.reduce_max(labels)) < 1000
    assert x.shape == (4, SIZE, SIZE, 3) and 0.0 <= float(tf.reduce_min(x)) <= 255.0


def test_a_shard_deleted_after_listing_is_named_not_retried_forever(tree, tmp_path):
    """TFRecordDataset(...).ignore_errors() on a missing file retries without end; the reader
    checks the file exists and reports it as unreadable at record 0."""
    for name in os.listdir(tree[0]):
        if name.startswith("validation-"):
            shutil.copy(os.path.join(tree[0], name), tmp_path / name)
    ds = data_lib.build_dataset(_cfg(str(tmp_path)), split="eval", batch_size=8,
                                image_size=SIZE)
    gone = sorted(tmp_path.glob("validation-*"))[1]
    gone.unlink()
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"record 0 of .*{gone.name}"):
        _eval_examples(ds)
