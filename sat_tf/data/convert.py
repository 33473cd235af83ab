"""Converters to the TFRecord format of :mod:`sat_tf.data.tfrecord` (``run/make_tfrecords.py``).

* :func:`convert_imagenet_tree`: an ImageNet-style folder tree -> ``train-*`` /
  ``validation-*`` shards. ``train/<synset>/<image>``; validation either as
  ``validation/<synset>/<image>`` or flat ``validation/<image>`` plus a label file. Labels
  are the sorted synset index + 1. Images that are not RGB JPEG (PNG, CMYK, grayscale, ...)
  are re-encoded as RGB JPEG (quality 100), as the original converter does; every JPEG kept
  as is is decoded once to prove it is readable.
* :func:`convert_cifar10_archive`: the official ``cifar-10-python.tar.gz`` or
  ``cifar-10-binary.tar.gz`` -> ``train-*`` / ``test-*`` shards (PNG), checking the counts.

Shards are written in parallel (threads: Pillow and the TFRecord writer release the GIL),
each to a hidden temporary name and renamed into place when complete, so an interrupted run
resumes where it stopped: finished shards are kept. ``conversion.json`` records what the
folder holds (shard counts, example counts, fingerprints of the examples) and what it was
converted from (the input's path and fingerprint: an archive's size and SHA-256; a folder
tree's image paths, sizes and modification times). Converting a different input into the
same folder is refused, naming both inputs, and a complete output of the same input is left
alone.

The inputs may come from anyone: a class name that would break ``label_map.txt``, a truncated
or corrupt archive, a pickle holding anything but data, or an archive member larger than the
official ones is refused with a one-line :class:`~sat_tf.errors.UserError`, and reading an
archive takes memory bounded by the official member sizes, however large its members claim
to be.
"""
from __future__ import annotations

import bz2
import codecs
import concurrent.futures
import dataclasses
import gzip
import hashlib
import io
import json
import lzma
import os
import pickle
import random
import re
import sys
import tarfile
import time
import zlib
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from sat_tf.data import LABEL_MAP_FILE, MANIFEST_FILE, tfrecord
from sat_tf.data.cifar10 import CLASS_NAMES as CIFAR10_CLASSES
from sat_tf.errors import UserError

IMAGENET_SHARDS = {"train": 1024, "validation": 128}
# Records per shard of the official layout (1,281,167 / 1024 and 50,000 / 128): a smaller
# folder gets proportionally fewer shards (at least one), ImageNet exactly the official counts.
IMAGENET_SHARD_RECORDS = {"train": 1251, "validation": 390}
CIFAR10_SHARDS = {"train": 16, "test": 4}
CIFAR10_COUNTS = {"train": 50_000, "test": 10_000}
_SHUFFLE_SEED = 12345        # fixed, so a resumed run assigns the same images to each shard


@dataclasses.dataclass(frozen=True)
class Split:
    """One split to write: ``items`` are turned into serialized examples by ``encode``."""
    name: str
    items: Sequence
    num_shards: int
    encode: Callable[[object], bytes]
    fingerprint: str


@dataclasses.dataclass(frozen=True)
class Result:
    counts: dict               # split -> number of examples
    shards_written: int        # 0 when the output was already complete

    def summary(self, output_dir: str) -> str:
        counts = ", ".join(f"{n:,} {split}" for split, n in self.counts.items())
        if not self.shards_written:
            return f"{output_dir}: already complete ({counts}); nothing written."
        return f"{output_dir}: wrote {self.shards_written} shards ({counts})."


# --------------------------------------------------------------------------------------------
# Writing shards (shared by both converters).

def write_splits(output_dir: str, dataset: str, splits: Sequence[Split], label_map: Sequence[str],
                 *, source: dict | None = None, image_size: dict | None = None,
                 num_workers: int | None = None, progress: bool = True) -> Result:
    """Writes every missing shard of ``splits`` into ``output_dir`` (see the module doc).

    ``source`` records the input: ``{"path": ..., "bytes": ..., "sha256": ...}`` (and
    ``"files"`` for a folder tree); an output claimed by another input is refused.
    ``image_size`` records the images' size (:func:`image_size_sample`). With the class
    count, split sizes and label base, it is what training reads (``sat_tf.data.info``).
    """
    for s in splits:
        if not 1 <= s.num_shards <= max(len(s.items), 1) or not s.items:
            raise UserError(f"Invalid shard count {s.num_shards} for {dataset} {s.name} with "
                            f"{len(s.items)} images; it must be in [1, number of images].")
    manifest = {"format": "sat_tf official-imagenet-tfrecord v1", "dataset": dataset,
                "splits": {s.name: {"num_shards": s.num_shards, "num_examples": len(s.items),
                                    "fingerprint": s.fingerprint} for s in splits},
                "num_classes": len(label_map), "label_base": 1}
    if image_size is not None:
        manifest["image_size"] = image_size
    if source is not None:
        manifest["input"] = source
    _claim(output_dir, manifest, splits)
    _write_text(output_dir, LABEL_MAP_FILE,
                "".join(f"{i + 1} {name}\n" for i, name in enumerate(label_map)))

    jobs = []
    for s in splits:
        n = len(s.items)
        for i in range(s.num_shards):
            name = tfrecord.shard_name(s.name, i, s.num_shards)
            if not tf.io.gfile.exists(os.path.join(output_dir, name)):
                jobs.append((s, name, s.items[i * n // s.num_shards:(i + 1) * n // s.num_shards]))
    counts = {s.name: len(s.items) for s in splits}
    if not jobs:
        return Result(counts, 0)

    total = sum(s.num_shards for s in splits)
    bar = _Progress(f"{dataset} -> {output_dir}", total, total - len(jobs), enabled=progress)
    workers = num_workers or os.cpu_count() or 1
    if workers == 1:
        for job in jobs:
            bar.update(_write_shard(output_dir, *job))
    else:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(_write_shard, output_dir, *job) for job in jobs]
            try:
                for f in concurrent.futures.as_completed(futures):
                    bar.update(f.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    bar.close()
    return Result(counts, len(jobs))


def _write_shard(output_dir: str, split: Split, name: str, items) -> int:
    temp = os.path.join(output_dir, tfrecord.incomplete_name(name))
    with tf.io.TFRecordWriter(temp) as writer:
        for item in items:
            writer.write(split.encode(item))
    tf.io.gfile.rename(temp, os.path.join(output_dir, name), overwrite=True)
    return len(items)


def _claim(output_dir: str, manifest: dict, splits: Sequence[Split]) -> None:
    """Checks ``output_dir`` holds nothing but (part of) this conversion, then records it.

    The same input is recognised by its fingerprint, wherever it is now (an archive copied
    elsewhere is the same archive); the manifest keeps the path it was first converted from.
    A manifest written before inputs were recorded is adopted when its splits, example
    fingerprints included, are those of this conversion.
    """
    tf.io.gfile.makedirs(output_dir)
    path = os.path.join(output_dir, MANIFEST_FILE)
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            existing = json.load(f)
        old, new = existing.get("input"), manifest.get("input")
        if old is not None and _without_path(old) != _without_path(new):
            raise UserError(f"{output_dir!r} holds the conversion of {_describe(old)}; "
                            f"{_describe(new)} is a different input: use a new output folder.")
        if existing.get("splits") != manifest["splits"]:
            raise UserError(f"{output_dir!r} holds a different conversion ({path} differs: other "
                            "shard counts or examples); use an empty folder.")
        # A record from an older version gains what it lacks (the input, the facts training
        # reads); its path stays the first one.
        missing = {k: v for k, v in manifest.items() if k not in existing}
        if missing:
            _write_text(output_dir, MANIFEST_FILE, _manifest_text({**existing, **missing}))
        return
    for s in splits:
        stray = tf.io.gfile.glob(os.path.join(output_dir, f"{s.name}-*"))
        if stray:
            raise UserError(f"{output_dir!r} already has {s.name} shards from another conversion "
                            f"(e.g. {os.path.basename(stray[0])}); use an empty folder.")
    _write_text(output_dir, MANIFEST_FILE, _manifest_text(manifest))


def _manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def _without_path(source: dict | None) -> dict:
    return {k: v for k, v in (source or {}).items() if k != "path"}


def _describe(source: dict | None) -> str:
    """``'/data/x.tar.gz' (170,498,071 bytes, sha256 6d958be074577803)``."""
    if not source:
        return "an unrecorded input"
    facts = [f"{source['files']:,} files"] if "files" in source else []
    facts += [f"{source['bytes']:,} bytes", f"sha256 {source['sha256'][:16]}"]
    return f"{source['path']!r} ({', '.join(facts)})"


def _input_path(path: str) -> str:
    """``path`` as recorded in the manifest: absolute unless it is a URL (``gs://...``)."""
    return path if "://" in path else os.path.abspath(path)


def _write_text(output_dir: str, name: str, text: str) -> None:
    temp = os.path.join(output_dir, tfrecord.incomplete_name(name))
    with tf.io.gfile.GFile(temp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(temp, os.path.join(output_dir, name), overwrite=True)


class _Progress:
    """A one-line text progress bar on stderr."""

    def __init__(self, title: str, total: int, done: int, enabled: bool):
        self.title, self.total, self.done, self.enabled = title, total, done, enabled
        self.images, self.start = 0, time.monotonic()
        self._draw()

    def update(self, images: int) -> None:
        self.done += 1
        self.images += images
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * self.done // max(self.total, 1)
        rate = self.images / max(time.monotonic() - self.start, 1e-9)
        print(f"\r{self.title} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
              f"shards, {self.images:,} images, {rate:,.0f} images/s", end="", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr, flush=True)


def _fingerprint(lines) -> str:
    h = hashlib.sha1()
    for line in lines:
        h.update(line.encode() if isinstance(line, str) else line)
        h.update(b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# ImageNet-style folder trees.

def to_rgb_jpeg(data: bytes, path: str) -> tuple[bytes, int, int]:
    """``(jpeg, height, width)``: RGB JPEG bytes as they are, anything else re-encoded.

    Raises a ValueError naming ``path`` when the image cannot be decoded.
    """
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if image.format == "JPEG" and image.mode == "RGB":
            # Decoding at 1/8 scale still reads all the compressed data: proof enough.
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
            return data, height, width
        out = io.BytesIO()
        image.convert("RGB").save(out, "JPEG", quality=100)
        return out.getvalue(), height, width
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"Cannot decode image {path}: {e}") from None


@dataclasses.dataclass(frozen=True)
class _ImageItem:
    path: str
    label: int            # 1-based
    synset: str
    text: str


IMAGE_SIZE_SAMPLE = 256      # images whose size a folder conversion records


def image_size_sample(paths: Sequence[str], sample: int = IMAGE_SIZE_SAMPLE) -> dict:
    """The median height, width and short side of up to ``sample`` of the images (evenly
    spaced in ``paths``), read from their headers only; training chooses its default
    preprocessing and image size from them."""
    from PIL import Image

    step = max(1, len(paths) // sample)
    sizes = []
    for path in list(paths)[::step][:sample]:
        try:
            with tf.io.gfile.GFile(path, "rb") as f, Image.open(f) as image:
                width, height = image.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"Cannot decode image {path}: {e}") from None
        sizes.append((height, width))
    heights, widths = np.array(sizes).T
    return {"sampled": len(sizes), "median_height": int(np.median(heights)),
            "median_width": int(np.median(widths)),
            "median_short_side": int(np.median(np.minimum(heights, widths)))}


def _encode_image_item(item: _ImageItem) -> bytes:
    with tf.io.gfile.GFile(item.path, "rb") as f:
        data = f.read()
    jpeg, height, width = to_rgb_jpeg(data, item.path)
    return tfrecord.make_example(jpeg, item.label, image_format="JPEG", height=height,
                                 width=width, synset=item.synset, text=item.text,
                                 filename=os.path.basename(item.path))


def _images_in(folder: str) -> list[str]:
    return sorted(os.path.join(folder, n) for n in tf.io.gfile.listdir(folder)
                  if not n.startswith(".") and not tf.io.gfile.isdir(os.path.join(folder, n)))


def _subfolders(folder: str) -> list[str]:
    return sorted(n.rstrip("/") for n in tf.io.gfile.listdir(folder)
                  if tf.io.gfile.isdir(os.path.join(folder, n)) and not n.startswith("."))


_CLASS_NAME_RULE = ("a class name must be non-empty printable text with no spaces, tabs, "
                    "newlines or control characters: label_map.txt lists '<label> <name>' per "
                    "line")


def _valid_class_name(name: str) -> bool:
    return bool(name) and not any(c.isspace() or not c.isprintable() for c in name)


def _check_class_folders(parent: str, names: Sequence[str]) -> None:
    """Refuses a class folder whose name would corrupt ``label_map.txt`` (checked before any
    shard is written, so nothing is converted under a label that cannot be written)."""
    for name in names:
        if not _valid_class_name(name):
            raise UserError(f"Invalid class folder {os.path.join(parent, name)!r}: "
                            f"{_CLASS_NAME_RULE}; rename it.")


def read_validation_labels(path: str, files: Sequence[str]) -> dict[str, str]:
    """``{file name: synset}`` from a label file: one synset per line for the sorted file names
    (as ``imagenet_2012_validation_synset_labels.txt``), or ``<file name> <synset>`` per line."""
    with tf.io.gfile.GFile(path) as f:
        rows = [line.split() for line in f if line.strip()]
    names = sorted(os.path.basename(p) for p in files)
    if rows and all(len(r) == 1 for r in rows):
        if len(rows) != len(names):
            raise UserError(f"Validation label file {path!r} has {len(rows)} lines for "
                            f"{len(names)} images.")
        return {name: r[0] for name, r in zip(names, rows)}
    if rows and all(len(r) == 2 for r in rows):
        labels = {r[0]: r[1] for r in rows}
        missing = [n for n in names if n not in labels]
        if missing:
            raise UserError(f"Validation label file {path!r} has no label for {missing[0]} "
                            f"({len(missing)} images unlabelled).")
        return labels
    raise UserError(f"Validation label file {path!r}: expected one synset per line, or "
                    "'<file name> <synset>' per line.")


def scan_imagenet_tree(input_dir: str, validation_labels: str | None = None):
    """``(synsets, {split: [(path, synset), ...]})`` of an ImageNet-style folder tree."""
    found = {}
    train_dir = os.path.join(input_dir, "train")
    if tf.io.gfile.isdir(train_dir):
        _check_class_folders(train_dir, _subfolders(train_dir))
        found["train"] = [(p, s) for s in _subfolders(train_dir)
                          for p in _images_in(os.path.join(train_dir, s))]
    val_dir = os.path.join(input_dir, "validation")
    if tf.io.gfile.isdir(val_dir):
        synset_dirs = _subfolders(val_dir)
        _check_class_folders(val_dir, synset_dirs)
        if synset_dirs:
            found["validation"] = [(p, s) for s in synset_dirs
                                   for p in _images_in(os.path.join(val_dir, s))]
        else:
            files = _images_in(val_dir)
            if not validation_labels:
                raise UserError(f"{val_dir!r} holds images without synset folders; give their "
                                "label file (--validation_labels).")
            labels = read_validation_labels(validation_labels, files)
            found["validation"] = [(p, labels[os.path.basename(p)]) for p in files]
            bad = sorted(s for s in set(labels.values()) if not _valid_class_name(s))
            if bad:
                raise UserError(f"Invalid synset {bad[0]!r} in {validation_labels!r}: "
                                f"{_CLASS_NAME_RULE}.")
    elif validation_labels:
        raise UserError(f"A validation label file was given but {val_dir!r} does not exist.")
    if not found:
        raise UserError(f"{input_dir!r} has neither a train/ nor a validation/ folder.")
    if "train" in found:
        synsets = _subfolders(train_dir)
    else:
        synsets = sorted({s for _, s in found["validation"]})
    known = set(synsets)
    for split, items in found.items():
        if not items:
            raise UserError(f"{os.path.join(input_dir, split)!r} holds no images.")
        unknown = sorted({s for _, s in items} - known)
        if unknown:
            raise UserError(f"{split} images of synset {unknown[0]!r} that train/ does not have.")
    return synsets, found


def read_synset_texts(path: str | None) -> dict[str, str]:
    """``{synset: human-readable text}`` from ``imagenet_metadata.txt`` (``synset<TAB>text``)."""
    if not path:
        return {}
    with tf.io.gfile.GFile(path) as f:
        rows = [line.rstrip("\n").split("\t", 1) for line in f if line.strip()]
    return {r[0]: r[1] if len(r) > 1 else r[0] for r in rows}


def _file_stats(paths: Sequence[str]) -> list[tuple[int, int]]:
    """``(size, modification time in ns)`` of each file: ``os.stat`` on local disks, parallel
    ``gfile`` stats (round trips) on buckets."""
    if not any("://" in p for p in paths):
        return [(st.st_size, st.st_mtime_ns) for st in map(os.stat, paths)]

    def stat(path):
        st = tf.io.gfile.stat(path)
        return st.length, st.mtime_nsec

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        return list(pool.map(stat, paths))


def _tree_source(input_dir: str, paths: Sequence[str], extra: dict[str, str | None]) -> dict:
    """The input record of a folder tree: the SHA-256 of the sorted relative paths, sizes and
    modification times of its images and of the bytes of the ``extra`` files (label and text
    files, which decide labels and texts). Reading every image would take as long as the
    conversion; a replaced or rewritten image changes its size or modification time."""
    paths = sorted(paths)
    stats = _file_stats(paths)
    digest = hashlib.sha256()
    for path, (size, mtime) in zip(paths, stats):
        digest.update(json.dumps([os.path.relpath(path, input_dir), size, mtime]).encode())
        digest.update(b"\n")
    for role, path in sorted(extra.items()):
        if path:
            with tf.io.gfile.GFile(path, "rb") as f:
                digest.update(f"{role}\t{hashlib.sha256(f.read()).hexdigest()}\n".encode())
    return {"path": _input_path(input_dir), "files": len(paths),
            "bytes": sum(size for size, _ in stats), "sha256": digest.hexdigest()}


def default_shards(split: str, num_images: int) -> int:
    """The official shard count, or fewer for a smaller folder (see IMAGENET_SHARD_RECORDS)."""
    return max(1, min(IMAGENET_SHARDS[split], -(-num_images // IMAGENET_SHARD_RECORDS[split])))


def convert_imagenet_tree(input_dir: str, output_dir: str, *,
                          train_shards: int | None = None,
                          validation_shards: int | None = None,
                          validation_labels: str | None = None, synset_texts: str | None = None,
                          num_workers: int | None = None, progress: bool = True) -> Result:
    """Converts the folder tree (see the module doc); returns the example counts."""
    synsets, found = scan_imagenet_tree(input_dir, validation_labels)
    texts = read_synset_texts(synset_texts)
    label = {s: i + 1 for i, s in enumerate(synsets)}
    shards = {"train": train_shards, "validation": validation_shards}
    shards = {k: v or default_shards(k, len(found.get(k, ()))) for k, v in shards.items()}
    splits = []
    for name, pairs in found.items():
        items = [_ImageItem(p, label[s], s, texts.get(s, s)) for p, s in pairs]
        random.Random(_SHUFFLE_SEED).shuffle(items)
        fingerprint = _fingerprint(f"{os.path.relpath(i.path, input_dir)}\t{i.label}"
                                   for i in items)
        splits.append(Split(name, items, shards[name], _encode_image_item, fingerprint))
    paths = [p for pairs in found.values() for p, _ in pairs]
    source = _tree_source(input_dir, paths, {"validation_labels": validation_labels,
                                             "synset_texts": synset_texts})
    return write_splits(output_dir, tree_dataset(synsets), splits, synsets, source=source,
                        image_size=image_size_sample(sorted(paths)), num_workers=num_workers,
                        progress=progress)


def tree_dataset(synsets: Sequence[str]) -> str:
    """The dataset name a folder tree is recorded (and trained) as: "imagenet" for the 1,000
    ILSVRC synsets, else "images" (any class-per-folder dataset)."""
    if len(synsets) == 1000 and all(re.fullmatch(r"n\d{8}", s) for s in synsets):
        return "imagenet"
    return "images"


# --------------------------------------------------------------------------------------------
# The official CIFAR-10 archives.

_CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR_RECORD_BYTES = 1 + 32 * 32 * 3
_CIFAR_FOLDERS = {"cifar-10-batches-py/": "", "cifar-10-batches-bin/": ".bin"}
# The largest official members are ~31 MB (a python batch: 10,000 x 3,072 pixel bytes plus
# labels and file names) and 30.73 MB (a binary batch: 10,000 x 3,073 bytes). Twice that, to
# allow for a batch re-pickled less compactly, is still a bound on what one member may cost.
_MAX_MEMBER_BYTES = 64 << 20
_CHUNK_BYTES = 1 << 20
_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)

try:
    from numpy._core import multiarray as _multiarray
except ImportError:                                   # NumPy 1.x
    from numpy.core import multiarray as _multiarray


class _Forbidden(pickle.UnpicklingError):
    """A pickle asked for an object that is not plain data: nothing of it is built."""


class _NDArrayClass:
    """Stands for ``numpy.ndarray`` in a batch pickle: NumPy's own pickles pass the class to
    ``_reconstruct`` and never call it, and a call ``ndarray(shape)`` would allocate any size
    from a few bytes of pickle."""

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("the pickle calls numpy.ndarray itself, as NumPy's own "
                                     "pickles never do")


class _BatchArray(np.ndarray):
    """An array of a batch pickle while it is read: its data must be bytes, which NumPy keeps a
    reference to rather than a copy; the bytes are charged to the pickle's budget anyway, as
    NumPy copies byte-swapped or unaligned data. ``_charge`` (the unpickler's) is dropped once
    used, so the array does not keep the unpickler, its memo and the pickle alive."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and state and isinstance(state[-1], bytes)):
            raise pickle.UnpicklingError("an array whose data is not bytes")
        self.__dict__.pop("_charge")(len(state[-1]))
        super().__setstate__(state)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and NumPy arrays only (the CIFAR batches), nothing executable.

    Memory stays bounded by the pickle's size: arrays are only rebuilt empty, as NumPy pickles
    them, then given bytes of the pickle; and what the allowed callables build (``encode``,
    ``scalar``, array data), which a pickle may ask for again and again from one memoised
    argument, may not exceed twice the pickle's size.
    """

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def __init__(self, blob: bytes):
        super().__init__(io.BytesIO(blob), encoding="bytes")
        self._left = 2 * len(blob) + _CHUNK_BYTES

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise _Forbidden(f"{module}.{name}")
        return {"_reconstruct": self._reconstruct, "scalar": self._scalar,
                "ndarray": _NDArrayClass(), "dtype": np.dtype, "encode": self._encode}[name]

    def _charge(self, size: int) -> None:
        self._left -= size
        if self._left < 0:
            raise pickle.UnpicklingError("the pickle builds more data than it holds")

    def _reconstruct(self, cls, shape, dtype):
        if not isinstance(cls, _NDArrayClass) or not isinstance(shape, tuple) or 0 not in shape:
            raise pickle.UnpicklingError("an array not rebuilt empty, as NumPy pickles them")
        array = _multiarray._reconstruct(_BatchArray, shape, dtype)
        array._charge = self._charge
        return array

    def _scalar(self, dtype, *args):
        self._charge(dtype.itemsize if isinstance(dtype, np.dtype) else 0)
        return _multiarray.scalar(dtype, *args)

    def _encode(self, obj, *args):
        out = codecs.encode(obj, *args)
        self._charge(len(out))
        return out


def read_cifar10_archive(path: str) -> dict:
    """``{split: (images uint8 [N, 32, 32, 3], labels int [N], names [N])}`` from the official
    python or binary archive, exactly as downloaded.

    Read in one streaming pass that holds one member at a time (see :func:`_tar_files`);
    a truncated or corrupt archive, a member larger than the official ones, or a batch that is
    not plain data is a one-line ValueError naming the archive.
    """
    return _read_cifar10_archive(path)[0]


def _read_cifar10_archive(path: str) -> tuple[dict, dict]:
    """``(read_cifar10_archive(path), the archive's input record)``: its path, size and
    SHA-256, hashed from the bytes read for the conversion."""
    parsers = {folder + b + suffix: (_parse_binary_batch if suffix else _parse_python_batch)
               for folder, suffix in _CIFAR_FOLDERS.items()
               for batches in _CIFAR_BATCHES.values() for b in batches}
    parsed, folders = {}, set()
    with tf.io.gfile.GFile(path, "rb") as f:
        hashing = _HashingReader(f)
        raw = io.BufferedReader(hashing, _CHUNK_BYTES)
        try:
            stream = _decompressed(raw)
            for name, read in _tar_files(stream):
                folders.update(d for d in _CIFAR_FOLDERS if name.startswith(d))
                if name in parsers:
                    if name in parsed:
                        raise UserError(f"member {name} appears twice; re-download the archive.")
                    parsed[name] = parsers[name](read(), name)
            while stream.read(_CHUNK_BYTES):        # to its end: checks the gzip CRC and size
                pass
            while raw.read(_CHUNK_BYTES):           # and any bytes after it, for the hash
                pass
        except (EOFError, OSError, zlib.error, lzma.LZMAError, tarfile.TarError) as e:
            raise UserError(f"{path!r} is truncated or corrupt ({type(e).__name__}: {e}); "
                            "re-download it.") from None
        except ValueError as e:
            raise UserError(f"{path!r}: {e}") from None
    if not folders:
        raise UserError(f"{path!r} is not a CIFAR-10 archive (no cifar-10-batches-py/ or "
                        "cifar-10-batches-bin/ folder).")
    folder = min(folders, key=list(_CIFAR_FOLDERS).index)     # python first, as before
    out = {}
    for split, batches in _CIFAR_BATCHES.items():
        parts = []
        for b in batches:
            name = folder + b + _CIFAR_FOLDERS[folder]
            if name not in parsed:
                raise UserError(f"{path!r} lacks {name}.")
            parts.append(parsed[name])
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        names = [n for p in parts for n in p[2]]
        if labels.size and not (labels.min() >= 0 and labels.max() < len(CIFAR10_CLASSES)):
            raise UserError(f"{path!r}: {split} labels outside 0..9.")
        out[split] = (images, labels, names)
    source = {"path": _input_path(path), "bytes": hashing.size,
              "sha256": hashing.sha256.hexdigest()}
    return out, source


class _HashingReader(io.RawIOBase):
    """The bytes of ``f`` (a ``GFile``), hashed (SHA-256) and counted as they are read."""

    def __init__(self, f):
        self._f, self.sha256, self.size = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._f.read(len(buffer))
        buffer[:len(data)] = data
        self.sha256.update(data)
        self.size += len(data)
        return len(data)


def _decompressed(raw: io.BufferedReader):
    """The tar stream in ``raw``: gzip-compressed (the official archives), bzip2, xz or plain."""
    magic = raw.peek(6)[:6]
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    return raw


def _tar_files(stream):
    """``(name, read)`` for each regular file of the tar ``stream``, in order: ``read()``
    returns the file's bytes (before the next file is asked for); files not read are skipped.

    Every entry's size is checked against ``_MAX_MEMBER_BYTES`` from its header, before any
    of it is read, and only the bytes of the files read are held. ``tarfile``'s reader is not
    used: it keeps every entry's header, and reads extended headers and sparse maps into
    memory however large they claim to be. ``TarInfo.frombuf`` still parses each header and
    checks its checksum. Extended headers (pax, GNU long names) are skipped: the official
    archives have none, their members' names being short.
    """
    while True:
        header = _read_exactly(stream, tarfile.BLOCKSIZE)
        if header == bytes(tarfile.BLOCKSIZE):
            return                                            # the end-of-archive marker
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        if not 0 <= info.size <= _MAX_MEMBER_BYTES:
            raise UserError(f"member {info.name} claims {info.size:,} bytes; the official "
                            "CIFAR-10 members have about 31 MB and at most 64 MiB is read: "
                            "not an official archive, re-download it.")
        if info.type == tarfile.GNUTYPE_SPARSE:
            raise UserError(f"member {info.name} is a sparse file, as no official CIFAR-10 "
                            "member is; re-download the archive.")
        padding = -info.size % tarfile.BLOCKSIZE
        if info.type not in _REGULAR_TYPES:
            _skip(stream, info.size + padding)
            continue
        read_it = []

        def read(info=info):
            read_it.append(True)
            return _read_exactly(stream, info.size)

        yield info.name, read
        _skip(stream, (0 if read_it else info.size) + padding)


def _read_exactly(stream, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError(f"the archive ends {size - len(data):,} bytes early")
    return data


def _skip(stream, size: int) -> None:
    while size:
        size -= len(_read_exactly(stream, min(size, _CHUNK_BYTES)))


def _chw_to_hwc(data) -> np.ndarray:
    return np.asarray(data, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _parse_python_batch(blob: bytes, member: str):
    unpickler = _ArrayUnpickler(blob)
    try:
        batch = unpickler.load()
    except _Forbidden as e:
        raise UserError(f"member {member} holds a forbidden object {e}: refused to unpickle it "
                        "(nothing of it was run; a CIFAR-10 batch holds only arrays, lists and "
                        "bytes).") from None
    except Exception as e:  # noqa: BLE001 - whatever the bytes make the unpickler raise
        raise UserError(f"member {member} is not a CIFAR-10 batch pickle "
                        f"({type(e).__name__}: {e}).") from None
    finally:
        # The memo holds the unpickler's own methods (a cycle) and every memoised object, such
        # as the text the data was encoded from: freed now rather than by the next collection.
        unpickler.memo.clear()
    if not isinstance(batch, dict):
        raise UserError(f"member {member} holds a {type(batch).__name__}, not a dict of "
                        "b'data' and b'labels'.")
    data, labels, names = batch.get(b"data"), batch.get(b"labels"), batch.get(b"filenames")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3072):
        raise UserError(f"member {member}: b'data' is not a uint8 array of shape [N, 3072].")
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        labels = labels.tolist()
    if not (isinstance(labels, (list, tuple)) and all(
            isinstance(v, (int, np.integer)) and 0 <= v < len(CIFAR10_CLASSES) for v in labels)):
        raise UserError(f"member {member}: b'labels' is not a list of class indices 0..9.")
    if data.shape[0] != len(labels):
        raise UserError(f"member {member}: data of shape {data.shape} for {len(labels)} labels.")
    if names is None:
        names = [f"{member}:{i}".encode() for i in range(len(labels))]
    elif not (isinstance(names, (list, tuple)) and len(names) == len(labels) and all(
            isinstance(n, bytes) and len(n) <= 255 for n in names)):
        raise UserError(f"member {member}: b'filenames' is not a list of one file names (bytes, "
                        "at most 255) per image.")
    return (_chw_to_hwc(data.view(np.ndarray)), np.asarray(labels, np.int64),
            [n.decode(errors="replace") for n in names])


def _parse_binary_batch(blob: bytes, member: str):
    if len(blob) % _CIFAR_RECORD_BYTES:
        raise UserError(f"member {member} has {len(blob):,} bytes, not a whole number of "
                        f"{_CIFAR_RECORD_BYTES}-byte records.")
    rows = np.frombuffer(blob, np.uint8).reshape(-1, _CIFAR_RECORD_BYTES)
    return (_chw_to_hwc(rows[:, 1:]), rows[:, 0].astype(np.int64),
            [f"{member}:{i}" for i in range(len(rows))])


def _encode_cifar_item(item) -> bytes:
    from PIL import Image

    image, label, name = item
    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    return tfrecord.make_example(out.getvalue(), int(label) + 1, image_format="PNG", height=32,
                                 width=32, synset=CIFAR10_CLASSES[label],
                                 text=CIFAR10_CLASSES[label], filename=name)


def convert_cifar10_archive(archive: str, output_dir: str, *,
                            train_shards: int = CIFAR10_SHARDS["train"],
                            test_shards: int = CIFAR10_SHARDS["test"],
                            expected_counts: dict | None = None,
                            num_workers: int | None = None, progress: bool = True) -> Result:
    """Converts the official archive, after checking it holds ``expected_counts`` images
    (default: the real 50,000 train / 10,000 test)."""
    expected = dict(CIFAR10_COUNTS if expected_counts is None else expected_counts)
    data, source = _read_cifar10_archive(archive)
    for split, (images, _, _) in data.items():
        if len(images) != expected[split]:
            raise UserError(f"{archive!r} has {len(images):,} {split} images; expected "
                            f"{expected[split]:,}.")
    shards = {"train": train_shards, "test": test_shards}
    splits = []
    for split, (images, labels, names) in data.items():
        digest = hashlib.sha1(images.tobytes())
        digest.update(labels.astype(np.int64).tobytes())
        items = list(zip(images, labels, names))
        splits.append(Split(split, items, shards[split], _encode_cifar_item, digest.hexdigest()))
    return write_splits(output_dir, "cifar10", splits, CIFAR10_CLASSES, source=source,
                        image_size={"sampled": sum(len(s.items) for s in splits),
                                    "median_height": 32, "median_width": 32,
                                    "median_short_side": 32},
                        num_workers=num_workers, progress=progress)
