"""Small datasets in the exact official formats, for tests and benchmarks (no downloads).

* :func:`write_imagenet_tree`: an ImageNet-style folder tree of real photographs: crops of the
  two JPEG photos scikit-learn ships (``load_sample_images``: china.jpg, flower.jpg), plus a
  PNG saved under a ``.JPEG`` name, a CMYK JPEG and a grayscale JPEG, as the real ImageNet has.
* :func:`write_cifar10_archive`: ``cifar-10-python.tar.gz`` / ``cifar-10-binary.tar.gz`` with
  random pixels, laid out exactly as the official archives.

scikit-learn and Pillow are test dependencies (``pip install -e ".[test]"``).
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np


def sample_photos() -> list[np.ndarray]:
    """The two uint8 RGB photos (427x640) that ship with scikit-learn."""
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def synset_names(num_classes: int) -> list[str]:
    """WordNet-style ids, e.g. ``n10000000``."""
    return [f"n{10_000_000 + 37 * i:08d}" for i in range(num_classes)]


def _crop(photos, rng, shape, native=False):
    """A random window of a photo resized to ``shape``, or (``native``) a ``shape`` window of
    the photo at its own resolution, mirrored half the time."""
    from PIL import Image

    photo = photos[rng.integers(len(photos))]
    if native:
        y = int(rng.integers(0, photo.shape[0] - shape[0] + 1))
        x = int(rng.integers(0, photo.shape[1] - shape[1] + 1))
        image = Image.fromarray(photo[y:y + shape[0], x:x + shape[1]])
        return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image
    h = int(rng.integers(photo.shape[0] // 3, photo.shape[0] + 1))
    w = int(rng.integers(photo.shape[1] // 3, photo.shape[1] + 1))
    y = int(rng.integers(0, photo.shape[0] - h + 1))
    x = int(rng.integers(0, photo.shape[1] - w + 1))
    image = Image.fromarray(photo[y:y + h, x:x + w]).resize((shape[1], shape[0]), Image.BICUBIC)
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def write_imagenet_tree(root: str, *, num_classes: int = 3, train_per_class: int = 4,
                        validation_per_class: int = 2, image_shape=(60, 80),
                        flat_validation: bool = False, odd_formats: bool = True,
                        native: bool = False, quality: int = 90, seed: int = 0) -> dict:
    """Writes ``root/train/<synset>/*.JPEG`` and ``root/validation/...``.

    ``native``: windows of the photos at their own resolution (``image_shape`` at most
    427x640), as detailed as camera JPEGs, rather than resized crops; ``quality``: JPEG quality.

    With ``flat_validation`` the validation images are ``validation/ILSVRC2012_val_%08d.JPEG``
    and their synsets, one per line in file-name order, go to
    ``root/validation_labels.txt``. Returns ``{split: {file name: synset}}``.
    """
    photos = sample_photos()
    rng = np.random.default_rng(seed)
    synsets = synset_names(num_classes)
    truth = {"train": {}, "validation": {}}
    odd = {0: "PNG", 1: "CMYK", 2: "L"} if odd_formats else {}

    def save(image, path, kind="RGB"):
        if kind == "PNG":
            image.save(path, "PNG")           # a PNG under a .JPEG name, as ImageNet has
        else:
            image.convert(kind).save(path, "JPEG", quality=quality)

    for c, synset in enumerate(synsets):
        folder = os.path.join(root, "train", synset)
        os.makedirs(folder, exist_ok=True)
        for k in range(train_per_class):
            name = f"{synset}_{k}.JPEG"
            save(_crop(photos, rng, image_shape, native), os.path.join(folder, name),
                 odd.get(c, "RGB") if k == 0 else "RGB")
            truth["train"][name] = synset
    val_items = [(s, k) for s in synsets for k in range(validation_per_class)]
    order = rng.permutation(len(val_items))
    for n, i in enumerate(order):
        synset, k = val_items[i]
        if flat_validation:
            folder, name = os.path.join(root, "validation"), f"ILSVRC2012_val_{n + 1:08d}.JPEG"
        else:
            folder, name = os.path.join(root, "validation", synset), f"{synset}_val_{k}.JPEG"
        os.makedirs(folder, exist_ok=True)
        save(_crop(photos, rng, image_shape, native), os.path.join(folder, name))
        truth["validation"][name] = synset
    if flat_validation:
        with open(os.path.join(root, "validation_labels.txt"), "w") as f:
            f.writelines(f"{truth['validation'][n]}\n" for n in sorted(truth["validation"]))
    return truth


def write_cifar10_archive(path: str, *, kind: str = "python", counts=None, seed: int = 0) -> dict:
    """Writes a CIFAR-10 archive of random images in the official layout.

    ``kind`` "python" (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``: pickled dicts
    with ``b'data'`` uint8 [N, 3072] channel-major and ``b'labels'``) or "binary"
    (``cifar-10-batches-bin/*.bin``: per image 1 label byte + 3072 pixel bytes). ``counts``
    defaults to the real ``{"train": 50000, "test": 10000}``. Returns ``{split: (images
    [N, 32, 32, 3], labels [N])}`` in archive order.
    """
    counts = counts or {"train": 50_000, "test": 10_000}
    rng = np.random.default_rng(seed)
    truth, batches = {}, []
    for split, n in counts.items():
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.int64)
        truth[split] = (images, labels)
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        bounds = np.linspace(0, n, len(names) + 1).astype(int)
        for name, lo, hi in zip(names, bounds[:-1], bounds[1:]):
            batches.append((name, images[lo:hi], labels[lo:hi]))

    folder = "cifar-10-batches-py" if kind == "python" else "cifar-10-batches-bin"
    members = {}
    for name, images, labels in batches:
        chw = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
        if kind == "python":
            batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels],
                     b"data": chw, b"filenames": [f"img_{name}_{i}.png".encode()
                                                  for i in range(len(images))]}
            members[f"{folder}/{name}"] = pickle.dumps(batch, protocol=2)
        elif kind == "binary":
            members[f"{folder}/{name}.bin"] = np.concatenate(
                [labels.astype(np.uint8)[:, None], chw], axis=1).tobytes()
        else:
            raise ValueError(f"Invalid archive kind {kind!r}; valid choices: python, binary.")
    classes = b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n"
    if kind == "python":
        members[f"{folder}/batches.meta"] = pickle.dumps(
            {b"label_names": classes.split(), b"num_cases_per_batch": 10000}, protocol=2)
    else:
        members[f"{folder}/batches.meta.txt"] = classes
    members[f"{folder}/readme.html"] = b"<html></html>\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return truth


def write_digits_tree(root: str, *, image_size: int = 32, train_per_class: int = 20,
                      validation_per_class: int = 5, image_format: str = "PNG") -> dict:
    """Writes scikit-learn's real handwritten digits as a class-per-folder tree of 10 classes
    (``root/train/digit_<d>/``, ``root/validation/digit_<d>/``), upscaled bicubic to
    ``image_size``: a user's own small-image dataset. Returns ``{split: {file: class}}``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    truth = {"train": {}, "validation": {}}
    seen = {c: 0 for c in range(10)}
    for pixels, label in zip(digits.images, digits.target):
        k = seen[int(label)]
        seen[int(label)] += 1
        if k >= train_per_class + validation_per_class:
            continue
        split = "train" if k < train_per_class else "validation"
        name = f"digit_{label}"
        folder = os.path.join(root, split, name)
        os.makedirs(folder, exist_ok=True)
        image = Image.fromarray(np.uint8(np.round(pixels * 255 / 16))).convert("RGB")
        image = image.resize((image_size, image_size), Image.BICUBIC)
        file = f"{name}_{k}.{'png' if image_format == 'PNG' else 'jpg'}"
        image.save(os.path.join(folder, file), image_format)
        truth[split][file] = name
    return truth
