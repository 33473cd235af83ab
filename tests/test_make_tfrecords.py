"""Converters: folder trees and official CIFAR-10 archives -> official-format TFRecords.

Records are read back with a plain TFRecordDataset and checked against what the inputs were
written with: synsets (label = sorted index + 1), pixels, counts, shard names.
"""
import codecs
import gzip
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from sat_tf.data import convert, testing, tfrecord

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "run", "make_tfrecords.py")
FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/format": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    "image/class/synset": tf.io.FixedLenFeature([], tf.string),
    "image/filename": tf.io.FixedLenFeature([], tf.string),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/channels": tf.io.FixedLenFeature([], tf.int64),
    "image/colorspace": tf.io.FixedLenFeature([], tf.string),
}


def _records(path):
    """Parsed records of the given files, in file order."""
    out = []
    for record in tf.data.TFRecordDataset(path):
        f = tf.io.parse_single_example(record, FEATURES)
        out.append({k: (v.numpy().decode() if v.dtype == tf.string and k != "image/encoded"
                        else v.numpy()) for k, v in f.items()})
    return out


def _shards(out_dir, split):
    return sorted(n for n in os.listdir(out_dir) if n.startswith(split + "-"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tree"))
    truth = testing.write_imagenet_tree(root, num_classes=3, train_per_class=3,
                                        validation_per_class=2, flat_validation=True)
    return root, truth


def _check_imagenet_output(out_dir, truth, train_shards, validation_shards):
    synsets = testing.synset_names(3)
    assert _shards(out_dir, "train") == [f"train-{i:05d}-of-{train_shards:05d}"
                                         for i in range(train_shards)]
    assert _shards(out_dir, "validation") == [
        f"validation-{i:05d}-of-{validation_shards:05d}" for i in range(validation_shards)]
    with open(os.path.join(out_dir, "label_map.txt")) as f:
        assert f.read() == "".join(f"{i + 1} {s}\n" for i, s in enumerate(synsets))
    for split in ("train", "validation"):
        records = _records([os.path.join(out_dir, n) for n in _shards(out_dir, split)])
        assert sorted(r["image/filename"] for r in records) == sorted(truth[split])
        for r in records:
            synset = truth[split][r["image/filename"]]
            assert r["image/class/synset"] == synset
            assert r["image/class/label"] == synsets.index(synset) + 1      # 1-based on disk
            assert r["image/format"] == "JPEG" and r["image/colorspace"] == "RGB"
            assert r["image/encoded"][:2] == b"\xff\xd8"                   # a JPEG, always
            image = Image.open(io.BytesIO(r["image/encoded"]))
            assert image.mode == "RGB"
            assert (r["image/height"], r["image/width"]) == (60, 80) == image.size[::-1]
            assert tf.io.decode_jpeg(r["image/encoded"]).shape == (60, 80, 3)


def test_imagenet_tree_with_flat_validation_and_odd_formats(tree, tmp_path):
    root, truth = tree
    # The tree holds a PNG named .JPEG, a CMYK JPEG and a grayscale JPEG.
    kinds = {Image.open(os.path.join(root, "train", s, f"{s}_0.JPEG")).mode
             for s in testing.synset_names(3)}
    assert kinds == {"RGB", "CMYK", "L"}
    out = str(tmp_path / "out")
    result = convert.convert_imagenet_tree(
        root, out, train_shards=3, validation_shards=2,
        validation_labels=os.path.join(root, "validation_labels.txt"), num_workers=2,
        progress=False)
    assert result.counts == {"train": 9, "validation": 6} and result.shards_written == 5
    _check_imagenet_output(out, truth, 3, 2)
    # The re-encoded CMYK image still shows the photo, not its negative.
    cmyk = os.path.join(root, "train", testing.synset_names(3)[1],
                        f"{testing.synset_names(3)[1]}_0.JPEG")
    original = np.asarray(Image.open(cmyk).convert("RGB"), np.float32)
    record = [r for r in _records([os.path.join(out, n) for n in _shards(out, "train")])
              if r["image/filename"] == os.path.basename(cmyk)][0]
    converted = tf.io.decode_jpeg(record["image/encoded"]).numpy().astype(np.float32)
    assert np.abs(converted - original).mean() < 3.0


def test_imagenet_tree_with_synset_validation_folders(tmp_path):
    root = str(tmp_path / "tree")
    truth = testing.write_imagenet_tree(root, num_classes=3, train_per_class=2,
                                        validation_per_class=2, odd_formats=False, seed=1)
    out = str(tmp_path / "out")
    convert.convert_imagenet_tree(root, out, train_shards=2, validation_shards=2,
                                  num_workers=1, progress=False)
    _check_imagenet_output(out, truth, 2, 2)


def test_resume_rewrites_only_missing_shards(tree, tmp_path):
    root, _ = tree
    out = str(tmp_path / "out")
    kw = dict(train_shards=3, validation_shards=2, progress=False,
              validation_labels=os.path.join(root, "validation_labels.txt"))
    convert.convert_imagenet_tree(root, out, **kw)
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    os.remove(os.path.join(out, "train-00001-of-00003"))
    # A shard interrupted mid-write is left under its hidden temporary name.
    with open(os.path.join(out, tfrecord.incomplete_name("validation-00000-of-00002")), "w") as f:
        f.write("partial")
    assert tfrecord.list_files(out, "validation") == [
        os.path.join(out, f"validation-0000{i}-of-00002") for i in range(2)]
    result = convert.convert_imagenet_tree(root, out, **kw)
    assert result.shards_written == 1
    for name in ("train-00000-of-00003", "train-00002-of-00003", "validation-00000-of-00002"):
        assert os.stat(os.path.join(out, name)).st_mtime_ns == before[name]
    assert len(_records(os.path.join(out, "train-00001-of-00003"))) == 3
    again = convert.convert_imagenet_tree(root, out, **kw)                     # complete
    assert again.shards_written == 0
    assert again.summary(out) == (
        f"{out}: already complete (9 train, 6 validation); nothing written.")


def test_other_conversion_into_the_same_folder_is_refused(tree, tmp_path):
    root, _ = tree
    out = str(tmp_path / "out")
    labels = os.path.join(root, "validation_labels.txt")
    convert.convert_imagenet_tree(root, out, train_shards=3, validation_shards=2,
                                  validation_labels=labels, progress=False)
    with pytest.raises(ValueError, match="holds a different conversion"):
        convert.convert_imagenet_tree(root, out, train_shards=2, validation_shards=2,
                                      validation_labels=labels, progress=False)
    with pytest.raises(ValueError, match=r"shard count 10 .* train with 9 images"):
        convert.convert_imagenet_tree(root, str(tmp_path / "other"), train_shards=10,
                                      validation_labels=labels, progress=False)


def test_bad_trees_fail_with_the_path(tmp_path):
    os.makedirs(tmp_path / "validation")
    Image.new("RGB", (8, 8)).save(tmp_path / "validation" / "a.JPEG")
    with pytest.raises(ValueError, match="label file"):
        convert.scan_imagenet_tree(str(tmp_path))
    os.makedirs(tmp_path / "train" / "n1")
    (tmp_path / "train" / "n1" / "bad.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ValueError, match="Cannot decode image .*bad.JPEG"):
        convert.convert_imagenet_tree(str(tmp_path), str(tmp_path / "out"),
                                      train_shards=1, validation_shards=1,
                                      validation_labels=_labels_file(tmp_path, ["n1"]),
                                      progress=False)


def _labels_file(tmp_path, synsets):
    path = tmp_path / "labels.txt"
    path.write_text("".join(f"{s}\n" for s in synsets))
    return str(path)


@pytest.mark.parametrize("kind", ["python", "binary"])
def test_cifar10_archive_round_trip(tmp_path, kind):
    archive = str(tmp_path / f"cifar-10-{kind}.tar.gz")
    counts = {"train": 25, "test": 7}
    truth = testing.write_cifar10_archive(archive, kind=kind, counts=counts, seed=7)
    out = str(tmp_path / "out")
    result = convert.convert_cifar10_archive(archive, out, train_shards=3, test_shards=2,
                                             expected_counts=counts, progress=False)
    assert result.counts == counts
    for split, shards in (("train", 3), ("test", 2)):
        assert _shards(out, split) == [f"{split}-{i:05d}-of-{shards:05d}" for i in range(shards)]
        records = _records([os.path.join(out, n) for n in _shards(out, split)])  # archive order
        images, labels = truth[split]
        assert len(records) == counts[split]
        for r, image, label in zip(records, images, labels):
            assert r["image/class/label"] == label + 1 and r["image/format"] == "PNG"
            assert r["image/class/synset"] == convert.CIFAR10_CLASSES[label]
            np.testing.assert_array_equal(tf.io.decode_png(r["image/encoded"]).numpy(), image)


def test_cifar10_counts_default_to_the_real_ones(tmp_path):
    archive = str(tmp_path / "cifar-10-binary.tar.gz")
    testing.write_cifar10_archive(archive, kind="binary", counts={"train": 10, "test": 5})
    with pytest.raises(ValueError, match="has 10 train images; expected 50,000"):
        convert.convert_cifar10_archive(archive, str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out")


def _rewrite_archive(archive, replace):
    """Rewrites the .tar.gz ``archive`` with the members in ``replace`` (name -> bytes)."""
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    members.update(replace)
    with tarfile.open(archive, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


class _RunsCode:
    """Pickles as a call of ``os.system(command)``."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _evil_archive(tmp_path):
    """A python CIFAR-10 archive whose test_batch would create ``marker`` if unpickled freely."""
    archive = str(tmp_path / "cifar-10-python.tar.gz")
    marker = tmp_path / "pwned"
    testing.write_cifar10_archive(archive, kind="python", counts={"train": 5, "test": 5})
    _rewrite_archive(archive, {"cifar-10-batches-py/test_batch": pickle.dumps(
        {b"data": _RunsCode(f"touch {marker}"), b"labels": [0]}, protocol=2)})
    return archive, marker


def test_cifar10_pickles_cannot_run_code(tmp_path):
    archive, marker = _evil_archive(tmp_path)
    with pytest.raises(ValueError, match=r"cifar-10-python.tar.gz.*member "
                       r"cifar-10-batches-py/test_batch holds a forbidden object posix.system"):
        convert.convert_cifar10_archive(archive, str(tmp_path / "out"),
                                        expected_counts={"train": 5, "test": 5}, progress=False)
    assert not marker.exists() and not (tmp_path / "out").exists()


class _Encodes:
    """Pickles as ``_codecs.encode(text, "latin1")``: each copy builds a new ``text``."""

    def __init__(self, text):
        self.text = text

    def __reduce__(self):
        return (codecs.encode, (self.text, "latin1"))


class _BigArray:
    """Pickles as ``numpy.ndarray((1 << 40,))``: a terabyte, uninitialised."""

    def __reduce__(self):
        return (np.ndarray, ((1 << 40,),))


@pytest.mark.parametrize("batch,message", [
    ([1, 2, 3], "not a dict"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, "cat"]}, "labels"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1],
      b"filenames": [b"x" * 1000] * 2}, "file names"),
    # 1,000 calls each building a new 100 kB string from one 100 kB string in the pickle.
    ({b"data": [_Encodes(text) for text in ["x" * 100_000] * 1000], b"labels": []},
     "builds more data than it holds"),
    ({b"data": _BigArray(), b"labels": []}, "numpy.ndarray"),
])
def test_cifar10_hostile_batches_are_refused_in_bounded_memory(tmp_path, batch, message):
    archive = str(tmp_path / "cifar-10-python.tar.gz")
    testing.write_cifar10_archive(archive, kind="python", counts={"train": 5, "test": 2})
    _rewrite_archive(archive, {"cifar-10-batches-py/test_batch": pickle.dumps(batch, protocol=2)})
    with pytest.raises(ValueError, match=f"member cifar-10-batches-py/test_batch.*{message}"):
        convert.read_cifar10_archive(archive)


@pytest.mark.parametrize("kind", ["python", "binary"])
def test_truncated_cifar10_archive_is_one_clear_error(tmp_path, kind):
    archive = str(tmp_path / f"cifar-10-{kind}.tar.gz")
    testing.write_cifar10_archive(archive, kind=kind, counts={"train": 50, "test": 10})
    with open(archive, "rb") as f:
        blob = f.read()
    for cut in (len(blob) * 6 // 10, len(blob) - 3):          # mid-member; in the gzip trailer
        with open(archive, "wb") as f:
            f.write(blob[:cut])
        with pytest.raises(ValueError, match=f"{archive!r} is truncated or corrupt .*"
                                             "re-download it"):
            convert.read_cifar10_archive(archive)
    plain = str(tmp_path / f"cifar-10-{kind}.tar")             # also uncompressed
    with gzip.open(io.BytesIO(blob)) as f, open(plain, "wb") as out:
        data = f.read()
        out.write(data[:len(data) * 6 // 10])
    with pytest.raises(ValueError, match="is truncated or corrupt"):
        convert.read_cifar10_archive(plain)


def _write_zero_member_archive(path, member, size):
    """A .tar.gz whose ``member`` is ``size`` (a multiple of 1 MiB) zero bytes, compressed about
    1000:1: the zeros are copies of one gzip member of 1 MiB (a gzip file may be a series of
    members), so even a huge member takes milliseconds to write."""
    info = tarfile.TarInfo(member)
    info.size = size
    zeros = gzip.compress(bytes(1 << 20))
    with open(path, "wb") as f:
        f.write(gzip.compress(info.tobuf(tarfile.GNU_FORMAT)))
        f.writelines(zeros for _ in range(size >> 20))
        f.write(gzip.compress(bytes(2 * tarfile.BLOCKSIZE)))    # end-of-archive marker


def test_cifar10_member_larger_than_official_is_refused_before_reading(tmp_path):
    archive = str(tmp_path / "cifar-10-python.tar.gz")
    _write_zero_member_archive(archive, "cifar-10-batches-py/data_batch_1", 100 << 20)
    assert os.path.getsize(archive) < 200_000
    with pytest.raises(ValueError, match=r"member cifar-10-batches-py/data_batch_1 claims "
                                         r"104,857,600 bytes; .* at most 64 MiB"):
        convert.read_cifar10_archive(archive)


def _tree_with_class(tmp_path, synset):
    root = tmp_path / "tree"
    for name in ("n01000000", synset):
        os.makedirs(root / "train" / name)
        Image.new("RGB", (8, 8)).save(root / "train" / name / "a.JPEG")
    return str(root)


@pytest.mark.parametrize("synset", ["n01\nn02", "n01 x", "n01\tx", "n01\x1b[2J", "n01\x00"])
def test_class_folder_names_that_would_break_the_label_map_are_refused(tmp_path, synset):
    if "\x00" in synset:                                      # no file system allows it
        with pytest.raises(ValueError, match=r"Invalid synset 'n01\\x00' in .*labels.txt"):
            convert.scan_imagenet_tree(str(_flat_validation_tree(tmp_path, synset)),
                                       str(tmp_path / "labels.txt"))
        return
    root = _tree_with_class(tmp_path, synset)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"Invalid class folder .*" + re.escape(repr(synset)[1:-1])
                       + r".*printable.*no spaces.*label_map.txt"):
        convert.convert_imagenet_tree(root, str(out), train_shards=1, progress=False)
    assert not out.exists()


def _flat_validation_tree(tmp_path, synset):
    root = tmp_path / "flat"
    os.makedirs(root / "validation")
    Image.new("RGB", (8, 8)).save(root / "validation" / "a.JPEG")
    (tmp_path / "labels.txt").write_text(f"a.JPEG {synset}\n")
    return root


def test_a_different_imagenet_tree_into_a_complete_output_is_refused(tmp_path):
    kw = dict(train_shards=2, validation_shards=1, num_workers=1, progress=False)
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    for root, seed in ((first, 0), (second, 5)):              # same file names, other photos
        testing.write_imagenet_tree(root, num_classes=2, train_per_class=2,
                                    validation_per_class=1, odd_formats=False, seed=seed)
    out = str(tmp_path / "out")
    assert convert.convert_imagenet_tree(first, out, **kw).shards_written == 3
    refused = (f"{re.escape(repr(out))} holds the conversion of {re.escape(repr(first))} "
               rf"\(6 files, .*\); {re.escape(repr(second))} \(6 files, .*\) is a different "
               "input: use a new output folder")
    with pytest.raises(ValueError, match=refused):
        convert.convert_imagenet_tree(second, out, **kw)
    # The same tree again: complete. One of its images rewritten: a different input.
    assert convert.convert_imagenet_tree(first, out, **kw).shards_written == 0
    image = os.path.join(first, "train", testing.synset_names(2)[0],
                         f"{testing.synset_names(2)[0]}_0.JPEG")
    Image.new("RGB", (60, 80)).save(image, "JPEG")
    with pytest.raises(ValueError, match="is a different input"):
        convert.convert_imagenet_tree(first, out, **kw)


def test_a_different_cifar10_archive_into_a_complete_output_is_refused(tmp_path):
    counts = {"train": 10, "test": 5}
    kw = dict(train_shards=2, test_shards=1, expected_counts=counts, progress=False)
    python, binary = str(tmp_path / "python.tar.gz"), str(tmp_path / "binary.tar.gz")
    testing.write_cifar10_archive(python, kind="python", counts=counts, seed=3)
    testing.write_cifar10_archive(binary, kind="binary", counts=counts, seed=3)  # same pixels
    out = str(tmp_path / "out")
    assert convert.convert_cifar10_archive(python, out, **kw).shards_written == 3
    with pytest.raises(ValueError, match=rf"holds the conversion of {re.escape(repr(python))} "
                       rf"\({os.path.getsize(python):,} bytes, sha256 [0-9a-f]{{16}}\); "
                       rf"{re.escape(repr(binary))} .* is a different input: use a new output"):
        convert.convert_cifar10_archive(binary, out, **kw)
    with open(os.path.join(out, convert.MANIFEST_FILE)) as f:
        assert json.load(f)["input"]["path"] == python        # the old record is kept
    # The same archive, even copied elsewhere: complete; an interrupted conversion resumes.
    copy = str(tmp_path / "copy.tar.gz")
    shutil.copy(python, copy)
    assert convert.convert_cifar10_archive(copy, out, **kw).shards_written == 0
    os.remove(os.path.join(out, "train-00001-of-00002"))
    assert convert.convert_cifar10_archive(python, out, **kw).shards_written == 1
    # An output written before inputs were recorded is adopted when its examples match.
    path = os.path.join(out, convert.MANIFEST_FILE)
    with open(path) as f:
        manifest = json.load(f)
    del manifest["input"]
    with open(path, "w") as f:
        json.dump(manifest, f)
    assert convert.convert_cifar10_archive(python, out, **kw).shards_written == 0
    with open(path) as f:
        assert json.load(f)["input"]["path"] == python
    with pytest.raises(ValueError, match="is a different input"):
        convert.convert_cifar10_archive(binary, out, **kw)


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--dataset=mnist", "--input=x", "--output_dir=y"], "Invalid --dataset 'mnist'"),
    (["--dataset=cifar10", "--input=x", "--output_dir=y", "--train_shards=0"],
     "Invalid --train_shards 0"),
    (["--dataset=cifar10", "--output_dir=y"], "--input is required"),
    (["--dataset=cifar10", "--input=x", "--output_dir=y", "--train_shards=many"],
     "train_shards"),
    (["--no_such_flag=1"], "no_such_flag"),
])
def test_cli_bad_flags_one_line_exit_2(args, message):
    proc = _run(*args)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.startswith("make_tfrecords.py: error")]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_cli_converts_a_cifar10_archive(tmp_path):
    archive = str(tmp_path / "cifar-10-python.tar.gz")
    testing.write_cifar10_archive(archive, kind="python", counts={"train": 20, "test": 10})
    out = str(tmp_path / "out")
    proc = _run("--dataset=cifar10", f"--input={archive}", f"--output_dir={out}",
                "--cifar_counts=20,10", "--train_shards=2", "--validation_shards=1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{out}: wrote 3 shards (20 train, 10 test)."
    assert _shards(out, "train") == ["train-00000-of-00002", "train-00001-of-00002"]
    assert len(_records(os.path.join(out, "test-00000-of-00001"))) == 10


# Runs the command given as arguments, then prints its exit status and the peak RSS (KiB) of its
# process tree: measured in this wrapper so that no earlier child of the test process counts.
_PEAK_RSS = ("import resource, subprocess, sys; status = subprocess.run(sys.argv[1:]).returncode; "
             "print(status, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


@pytest.mark.parametrize("case", ["truncated", "forbidden_object", "huge_member"])
def test_cli_bad_archives_one_line_exit_1_in_bounded_memory(tmp_path, case):
    archive = str(tmp_path / "cifar-10-python.tar.gz")
    marker = None
    if case == "truncated":
        testing.write_cifar10_archive(archive, counts={"train": 50, "test": 10})
        with open(archive, "r+b") as f:
            f.truncate(os.path.getsize(archive) * 6 // 10)
        message = f"{archive!r} is truncated or corrupt"
    elif case == "forbidden_object":
        archive, marker = _evil_archive(tmp_path)
        message = "cifar-10-batches-py/test_batch holds a forbidden object posix.system"
    else:
        _write_zero_member_archive(archive, "cifar-10-batches-py/data_batch_1", 2 << 30)
        message = "member cifar-10-batches-py/data_batch_1 claims 2,147,483,648 bytes"
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, sys.executable, SCRIPT, "--dataset=cifar10",
         f"--input={archive}", f"--output_dir={tmp_path / 'out'}", "--progress=false"],
        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        timeout=300)
    status, peak_kib = (int(v) for v in proc.stdout.split()[-2:])
    assert status == 1, proc.stderr
    peak_mib = peak_kib / 1024
    lines = [l for l in proc.stderr.splitlines() if "error" in l.lower() or "Trace" in l]
    assert len(lines) == 1 and lines[0].startswith("make_tfrecords.py: error: "), proc.stderr
    assert message in lines[0]
    assert "re-download" in lines[0] or case == "forbidden_object"
    assert marker is None or not marker.exists()
    # TensorFlow alone takes ~700 MiB; the 2 GiB member is never read.
    assert peak_mib < 1024, f"peak RSS {peak_mib:.0f} MiB"
