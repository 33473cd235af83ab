"""Handwritten digits, a real dataset that needs no download: ``--dataset=digits``.

The 1,797 scans of scikit-learn's ``load_digits`` (the UCI "Optical Recognition of Handwritten
Digits" test set: 8x8 images of 0-16 ink levels, 10 classes), read from the scikit-learn
installation, never from the network. So the quick start (``--experiment=digits-silu``)
trains on real images on any machine.

* Split: a fixed, class-stratified split into 1,438 training and 359 evaluation images (20 %
  of each class, chosen by a seeded permutation that does not depend on ``DataConfig.seed``,
  so every run evaluates on the same images).
* Pixels: ink levels scaled to [0, 255] (level * 255 / 16), upscaled bilinearly from 8x8 to
  ``image_size`` (default 16), so the attack's epsilon is in pixels of 255 as everywhere.
* Train: the whole image, shuffled (seeded), with a random shift of up to 1 pixel of the
  8x8 grid (zero-padded); no flip: digits are not mirror-symmetric. Eval: the whole image.

The decoded split is 1,797 small images: it is built once in memory per pipeline.
"""
from __future__ import annotations

import functools

import numpy as np

from sat_tf.config import DataConfig
from sat_tf.errors import UserError

NUM_CLASSES = 10
IMAGE_SIZE = 16
SOURCE_SIZE = 8
EVAL_FRACTION = 0.2
NUM_EXAMPLES = 1797
NUM_EVAL = 359
NUM_TRAIN = NUM_EXAMPLES - NUM_EVAL
_SPLIT_SEED = 20200625           # fixed: the split never changes


@functools.lru_cache(maxsize=1)
def load() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "eval": (images, labels)}``: uint8 ``[n, 8, 8]`` pixels
    in [0, 255] and int32 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("dataset 'digits' reads scikit-learn's copy of the digits; install "
                        "it with: pip install scikit-learn") from None
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int32)
    rng = np.random.RandomState(_SPLIT_SEED)
    eval_index = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        eval_index.extend(rng.permutation(members)[:int(round(EVAL_FRACTION * len(members)))])
    is_eval = np.zeros(len(labels), bool)
    is_eval[eval_index] = True
    out = {"train": (images[~is_eval], labels[~is_eval]),
           "eval": (images[is_eval], labels[is_eval])}
    if len(out["eval"][1]) != NUM_EVAL or len(out["train"][1]) != NUM_TRAIN:
        raise UserError(f"scikit-learn's digits have {len(labels)} images, not the "
                        f"{NUM_EXAMPLES} this split expects.")
    return out


def build(data: DataConfig, *, split: str, batch_size: int, image_size=None, input_context=None):
    """The digits split as the ``sat_tf.data`` contract describes."""
    import tensorflow as tf

    from sat_tf.data import pipeline

    size = image_size or IMAGE_SIZE
    images, labels = load()[split]
    ds = tf.data.Dataset.from_tensor_slices((images[..., None], labels))
    ds = pipeline.shard(ds, input_context)

    def to_rgb(image):
        image = tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bilinear")
        return tf.tile(tf.clip_by_value(image, 0.0, 255.0), [1, 1, 3])

    if split == "train":
        key = pipeline.example_key(data.seed, input_context)

        def shift(index, example):
            image, label = example
            padded = tf.pad(image, [[1, 1], [1, 1], [0, 0]])
            image = tf.image.stateless_random_crop(padded, [SOURCE_SIZE, SOURCE_SIZE, 1],
                                                   key(index))
            return to_rgb(image), label

        ds = ds.shuffle(len(labels), seed=data.seed, reshuffle_each_iteration=True).repeat()
        ds = ds.enumerate().map(shift, num_parallel_calls=tf.data.AUTOTUNE)
        return pipeline.batch_train(ds, batch_size)
    ds = ds.map(lambda image, label: (to_rgb(image), label), num_parallel_calls=tf.data.AUTOTUNE)
    return pipeline.batch_eval(ds.cache(), batch_size)
