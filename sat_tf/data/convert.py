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
folder holds (shard counts, example counts, a fingerprint of the inputs); converting a
different input into the same folder is refused, and a complete output is left alone.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import pickle
import random
import sys
import tarfile
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from sat_tf.data import tfrecord
from sat_tf.data.cifar10 import CLASS_NAMES as CIFAR10_CLASSES

IMAGENET_SHARDS = {"train": 1024, "validation": 128}
CIFAR10_SHARDS = {"train": 16, "test": 4}
CIFAR10_COUNTS = {"train": 50_000, "test": 10_000}
MANIFEST_FILE = "conversion.json"
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
                 *, num_workers: int | None = None, progress: bool = True) -> Result:
    """Writes every missing shard of ``splits`` into ``output_dir`` (see the module doc)."""
    for s in splits:
        if not 1 <= s.num_shards <= max(len(s.items), 1) or not s.items:
            raise ValueError(f"Invalid shard count {s.num_shards} for {dataset} {s.name} with "
                             f"{len(s.items)} images; it must be in [1, number of images].")
    manifest = {"format": "sat_tf official-imagenet-tfrecord v1", "dataset": dataset,
                "splits": {s.name: {"num_shards": s.num_shards, "num_examples": len(s.items),
                                    "fingerprint": s.fingerprint} for s in splits}}
    _claim(output_dir, manifest, splits)
    _write_text(output_dir, tfrecord.LABEL_MAP_FILE,
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
    """Checks ``output_dir`` holds nothing but (part of) this conversion, then records it."""
    tf.io.gfile.makedirs(output_dir)
    path = os.path.join(output_dir, MANIFEST_FILE)
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            existing = json.load(f)
        if existing != manifest:
            raise ValueError(f"{output_dir!r} holds a different conversion ({path} differs: other "
                             "inputs or shard counts); use an empty folder.")
        return
    for s in splits:
        stray = tf.io.gfile.glob(os.path.join(output_dir, f"{s.name}-*"))
        if stray:
            raise ValueError(f"{output_dir!r} already has {s.name} shards from another conversion "
                             f"(e.g. {os.path.basename(stray[0])}); use an empty folder.")
    _write_text(output_dir, MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


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
        raise ValueError(f"Cannot decode image {path}: {e}") from None


@dataclasses.dataclass(frozen=True)
class _ImageItem:
    path: str
    label: int            # 1-based
    synset: str
    text: str


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


def read_validation_labels(path: str, files: Sequence[str]) -> dict[str, str]:
    """``{file name: synset}`` from a label file: one synset per line for the sorted file names
    (as ``imagenet_2012_validation_synset_labels.txt``), or ``<file name> <synset>`` per line."""
    with tf.io.gfile.GFile(path) as f:
        rows = [line.split() for line in f if line.strip()]
    names = sorted(os.path.basename(p) for p in files)
    if rows and all(len(r) == 1 for r in rows):
        if len(rows) != len(names):
            raise ValueError(f"Validation label file {path!r} has {len(rows)} lines for "
                             f"{len(names)} images.")
        return {name: r[0] for name, r in zip(names, rows)}
    if rows and all(len(r) == 2 for r in rows):
        labels = {r[0]: r[1] for r in rows}
        missing = [n for n in names if n not in labels]
        if missing:
            raise ValueError(f"Validation label file {path!r} has no label for {missing[0]} "
                             f"({len(missing)} images unlabelled).")
        return labels
    raise ValueError(f"Validation label file {path!r}: expected one synset per line, or "
                     "'<file name> <synset>' per line.")


def scan_imagenet_tree(input_dir: str, validation_labels: str | None = None):
    """``(synsets, {split: [(path, synset), ...]})`` of an ImageNet-style folder tree."""
    found = {}
    train_dir = os.path.join(input_dir, "train")
    if tf.io.gfile.isdir(train_dir):
        found["train"] = [(p, s) for s in _subfolders(train_dir)
                          for p in _images_in(os.path.join(train_dir, s))]
    val_dir = os.path.join(input_dir, "validation")
    if tf.io.gfile.isdir(val_dir):
        synset_dirs = _subfolders(val_dir)
        if synset_dirs:
            found["validation"] = [(p, s) for s in synset_dirs
                                   for p in _images_in(os.path.join(val_dir, s))]
        else:
            files = _images_in(val_dir)
            if not validation_labels:
                raise ValueError(f"{val_dir!r} holds images without synset folders; give their "
                                 "label file (--validation_labels).")
            labels = read_validation_labels(validation_labels, files)
            found["validation"] = [(p, labels[os.path.basename(p)]) for p in files]
    elif validation_labels:
        raise ValueError(f"A validation label file was given but {val_dir!r} does not exist.")
    if not found:
        raise ValueError(f"{input_dir!r} has neither a train/ nor a validation/ folder.")
    if "train" in found:
        synsets = _subfolders(train_dir)
    else:
        synsets = sorted({s for _, s in found["validation"]})
    known = set(synsets)
    for split, items in found.items():
        if not items:
            raise ValueError(f"{os.path.join(input_dir, split)!r} holds no images.")
        unknown = sorted({s for _, s in items} - known)
        if unknown:
            raise ValueError(f"{split} images of synset {unknown[0]!r} that train/ does not have.")
    return synsets, found


def read_synset_texts(path: str | None) -> dict[str, str]:
    """``{synset: human-readable text}`` from ``imagenet_metadata.txt`` (``synset<TAB>text``)."""
    if not path:
        return {}
    with tf.io.gfile.GFile(path) as f:
        rows = [line.rstrip("\n").split("\t", 1) for line in f if line.strip()]
    return {r[0]: r[1] if len(r) > 1 else r[0] for r in rows}


def convert_imagenet_tree(input_dir: str, output_dir: str, *,
                          train_shards: int = IMAGENET_SHARDS["train"],
                          validation_shards: int = IMAGENET_SHARDS["validation"],
                          validation_labels: str | None = None, synset_texts: str | None = None,
                          num_workers: int | None = None, progress: bool = True) -> Result:
    """Converts the folder tree (see the module doc); returns the example counts."""
    synsets, found = scan_imagenet_tree(input_dir, validation_labels)
    texts = read_synset_texts(synset_texts)
    label = {s: i + 1 for i, s in enumerate(synsets)}
    shards = {"train": train_shards, "validation": validation_shards}
    splits = []
    for name, pairs in found.items():
        items = [_ImageItem(p, label[s], s, texts.get(s, s)) for p, s in pairs]
        random.Random(_SHUFFLE_SEED).shuffle(items)
        fingerprint = _fingerprint(f"{os.path.relpath(i.path, input_dir)}\t{i.label}"
                                   for i in items)
        splits.append(Split(name, items, shards[name], _encode_image_item, fingerprint))
    return write_splits(output_dir, "imagenet", splits, synsets, num_workers=num_workers,
                        progress=progress)


# --------------------------------------------------------------------------------------------
# The official CIFAR-10 archives.

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and NumPy arrays only (the CIFAR batches), nothing executable."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


_CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR_RECORD_BYTES = 1 + 32 * 32 * 3


def read_cifar10_archive(path: str) -> dict:
    """``{split: (images uint8 [N, 32, 32, 3], labels int [N], names [N])}`` from the official
    python or binary archive, exactly as downloaded."""
    members = {}
    with tf.io.gfile.GFile(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
        for m in tar:
            if m.isfile():
                members[m.name] = tar.extractfile(m).read()
    if any(n.startswith("cifar-10-batches-py/") for n in members):
        folder, suffix, parse = "cifar-10-batches-py/", "", _parse_python_batch
    elif any(n.startswith("cifar-10-batches-bin/") for n in members):
        folder, suffix, parse = "cifar-10-batches-bin/", ".bin", _parse_binary_batch
    else:
        raise ValueError(f"{path!r} is not a CIFAR-10 archive (no cifar-10-batches-py/ or "
                         "cifar-10-batches-bin/ folder).")
    out = {}
    for split, batches in _CIFAR_BATCHES.items():
        parts = []
        for b in batches:
            name = folder + b + suffix
            if name not in members:
                raise ValueError(f"{path!r} lacks {name}.")
            parts.append(parse(members[name], name))
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        names = [n for p in parts for n in p[2]]
        if labels.size and not (labels.min() >= 0 and labels.max() < len(CIFAR10_CLASSES)):
            raise ValueError(f"{path!r}: {split} labels outside 0..9.")
        out[split] = (images, labels, names)
    return out


def _chw_to_hwc(data) -> np.ndarray:
    return np.asarray(data, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _parse_python_batch(blob: bytes, member: str):
    batch = _ArrayUnpickler(io.BytesIO(blob), encoding="bytes").load()
    data, labels = batch[b"data"], np.asarray(batch[b"labels"], np.int64)
    if data.shape != (len(labels), 3072):
        raise ValueError(f"{member}: data of shape {data.shape} for {len(labels)} labels.")
    names = [n.decode() for n in batch.get(b"filenames", [])] or [
        f"{member}:{i}" for i in range(len(labels))]
    return _chw_to_hwc(data), labels, names


def _parse_binary_batch(blob: bytes, member: str):
    if len(blob) % _CIFAR_RECORD_BYTES:
        raise ValueError(f"{member}: {len(blob)} bytes is not a whole number of "
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
    data = read_cifar10_archive(archive)
    for split, (images, _, _) in data.items():
        if len(images) != expected[split]:
            raise ValueError(f"{archive!r} has {len(images):,} {split} images; expected "
                             f"{expected[split]:,}.")
    shards = {"train": train_shards, "test": test_shards}
    splits = []
    for split, (images, labels, names) in data.items():
        digest = hashlib.sha1(images.tobytes())
        digest.update(labels.astype(np.int64).tobytes())
        items = list(zip(images, labels, names))
        splits.append(Split(split, items, shards[split], _encode_cifar_item, digest.hexdigest()))
    return write_splits(output_dir, "cifar10", splits, CIFAR10_CLASSES, num_workers=num_workers,
                        progress=progress)
