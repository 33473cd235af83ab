"""CIFAR-10 pipeline from a converted fake official archive, and from TFDS (mock_data).

Independent truth: the random images and labels the archive was written with; a training
image must equal a 32x32 window of its (reflect- or zero-) padded source, maybe mirrored.
"""
import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from sat_tf import data as data_lib
from sat_tf.config import DataConfig
from sat_tf.data import cifar10, convert, testing, tfrecord
from sat_tf.errors import UserError

COUNTS = {"train": 40, "test": 13}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    archive = str(root / "cifar-10-python.tar.gz")
    truth = testing.write_cifar10_archive(archive, kind="python", counts=COUNTS, seed=3)
    out = str(root / "tfrecords")
    convert.convert_cifar10_archive(archive, out, train_shards=4, test_shards=2,
                                    expected_counts=COUNTS, progress=False)
    return out, truth


def _cfg(data_dir, **kw):
    return DataConfig(dataset="cifar10", source="tfrecord", data_dir=data_dir, **kw)


def _eval_pairs(ds):
    pairs = []
    for images, labels, mask in ds:
        assert images.shape[1:] == (32, 32, 3) and images.dtype == tf.float32
        for x, y, m in zip(images.numpy(), labels.numpy(), mask.numpy()):
            if m:
                assert x.min() >= 0 and x.max() <= 255 and np.array_equal(x, np.round(x))
                pairs.append((x.astype(np.uint8).tobytes(), int(y)))
    return pairs


def _truth_pairs(images, labels):
    return [(x.tobytes(), int(y)) for x, y in zip(images, labels)]


def test_eval_is_the_test_split_exactly_once(converted):
    data_dir, truth = converted
    ds = data_lib.build_dataset(_cfg(data_dir), split="eval", batch_size=5)
    masks = [m.numpy().tolist() for _, _, m in ds]
    assert masks[-1] == [1, 1, 1, 0, 0] and len(masks) == 3      # 13 = 5 + 5 + 3
    assert collections.Counter(_eval_pairs(ds)) == collections.Counter(
        _truth_pairs(*truth["test"]))


def test_eval_sharded_over_two_hosts(converted):
    data_dir, truth = converted
    parts = [collections.Counter(_eval_pairs(data_lib.build_dataset(
        _cfg(data_dir), split="eval", batch_size=4,
        input_context=tf.distribute.InputContext(2, i, 1)))) for i in range(2)]
    assert all(parts) and not parts[0] & parts[1]
    assert parts[0] + parts[1] == collections.Counter(_truth_pairs(*truth["test"]))


def _source_window(image, padded, flipped):
    """(index, dy, dx, mirrored) of the 32x32 window of a padded source (or of its mirror
    image) that ``image`` is, or None."""
    for dy in range(9):
        for dx in range(9):
            for mirrored, candidates in ((False, padded), (True, flipped)):
                window = candidates[:, dy:dy + 32, dx:dx + 32]
                hits = np.flatnonzero((window == image).all(axis=(1, 2, 3)))
                if hits.size:
                    return int(hits[0]), dy, dx, mirrored
    return None


@pytest.mark.parametrize("padding,np_mode", [("reflect", "reflect"), ("zero", "constant")])
def test_train_is_pad_crop_flip_of_the_train_split(converted, padding, np_mode):
    data_dir, truth = converted
    images, labels = truth["train"]
    padded = np.pad(images, [(0, 0), (4, 4), (4, 4), (0, 0)], mode=np_mode)
    # A mirrored window of the padded image is a window of the mirrored padded image.
    flipped = padded[:, :, ::-1]
    ds = data_lib.build_dataset(_cfg(data_dir, cifar_padding=padding, seed=5), split="train",
                                batch_size=8)
    assert ds.element_spec[0].shape == (8, 32, 32, 3)
    sources, windows, moved = [], [], 0
    for x, y in ds.take(10):                                # 80 examples = 2 epochs
        for image, label in zip(x.numpy(), y.numpy()):
            assert image.dtype == np.float32 and np.array_equal(image, np.round(image))
            found = _source_window(image.astype(np.uint8), padded, flipped)
            assert found is not None and labels[found[0]] == label
            sources.append(found[0])
            windows.append(found[1:])
            moved += not np.array_equal(image, images[found[0]])
    assert sorted(sources[:40]) == list(range(40)) == sorted(sources[40:])   # whole epochs
    assert moved > 30
    # Random flips and crops: among 80 draws, a fair coin lands outside [20, 60] with
    # probability < 1e-5, and 81 equally likely offsets give ~50 distinct ones (< 20: ~0).
    mirrored = sum(w[2] for w in windows)
    assert 20 <= mirrored <= 60, mirrored
    offsets = {w[:2] for w in windows}
    assert len(offsets) >= 20 and len({dy for dy, _ in offsets}) > 1 and len(
        {dx for _, dx in offsets}) > 1, offsets


def test_train_deterministic_with_seed(converted):
    data_dir, _ = converted
    first = lambda seed: [x.numpy() for x, _ in data_lib.build_dataset(
        _cfg(data_dir, seed=seed), split="train", batch_size=8).take(3)]
    a, b, c = first(1), first(1), first(2)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))


def test_image_size_other_than_32_is_resized(converted):
    x, _, _ = next(iter(data_lib.build_dataset(_cfg(converted[0]), split="eval", batch_size=4,
                                               image_size=48)))
    assert x.shape == (4, 48, 48, 3)
    assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 255.0


def test_corrupt_png_error_names_the_file(converted, tmp_path):
    path = str(tmp_path / "test-00000-of-00001")
    with tf.io.TFRecordWriter(path) as w:
        w.write(tfrecord.make_example(b"\x89PNG broken", 4, image_format="PNG", height=32,
                                      width=32, synset="cat", text="cat", filename="x"))
    ds = data_lib.build_dataset(_cfg(str(tmp_path)), split="eval", batch_size=4)
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"record 0 of {path}"):
        list(ds)


def test_tfds_is_the_default_source(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10, "_probe", lambda host: None)   # the mock downloads nothing
    cfg = DataConfig(dataset="cifar10", data_dir=str(tmp_path), shuffle_buffer=16)
    assert cfg.resolved_source() == "tfds"
    cfg.validate()
    with tfds.testing.mock_data(num_examples=7):
        batches = list(data_lib.build_dataset(cfg, split="eval", batch_size=4))
        x, y = next(iter(data_lib.build_dataset(cfg, split="train", batch_size=4)))
    assert [m.numpy().tolist() for _, _, m in batches] == [[1, 1, 1, 1], [1, 1, 1, 0]]
    for images, labels, _ in batches:
        assert images.shape == (4, 32, 32, 3) and images.dtype == tf.float32
        assert labels.dtype == tf.int32 and 0 <= int(tf.reduce_min(labels))
        assert int(tf.reduce_max(labels)) < 10
    assert x.shape == (4, 32, 32, 3) and y.dtype == tf.int32


def test_tfrecord_source_needs_data_dir():
    with pytest.raises(UserError, match="needs data_dir"):
        data_lib.build_dataset(DataConfig(dataset="cifar10", source="tfrecord"), split="eval",
                               batch_size=4)
    with pytest.raises(ValueError, match="apply to imagenet and images only"):
        DataConfig(dataset="cifar10", augment="randaugment").validate()


def test_tfds_download_path_is_installed_and_fails_in_one_line(tmp_path, monkeypatch):
    """The real TFDS download path works up to the network (its checksum files load), and a
    failed download is one ConnectionError that says how to work offline."""
    import tensorflow_datasets as tfds

    assert tfds.builder("cifar10", data_dir=str(tmp_path)).url_infos  # needs importlib_resources

    def offline(self, *args, **kwargs):
        raise OSError("Failed to resolve 'www.cs.toronto.edu'")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    monkeypatch.setattr(cifar10, "_probe", lambda host: None)
    cfg = DataConfig(dataset="cifar10", source="tfds", data_dir=str(tmp_path))
    with pytest.raises(ConnectionError) as err:
        cifar10.build(cfg, split="eval", batch_size=4)
    msg = str(err.value)
    assert "\n" not in msg and "www.cs.toronto.edu" in msg and "run/make_tfrecords.py" in msg


def test_offline_download_fails_at_the_probe_without_tfds_retries(tmp_path, monkeypatch):
    """Offline, tensorflow-datasets would retry for minutes: an unreachable download host is
    found by one probe and download_and_prepare is never called."""
    import tensorflow_datasets as tfds

    def never(self, *args, **kwargs):
        raise AssertionError("download_and_prepare ran despite the failed probe")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", never)
    monkeypatch.setattr(cifar10, "DOWNLOAD_HOST", "no-such-host.invalid")
    cfg = DataConfig(dataset="cifar10", source="tfds", data_dir=str(tmp_path))
    with pytest.raises(ConnectionError) as err:
        cifar10.build(cfg, split="eval", batch_size=4)
    msg = str(err.value)
    assert "\n" not in msg and "no-such-host.invalid is not reachable" in msg
    assert "run/make_tfrecords.py" in msg and "--dataset=digits" in msg
