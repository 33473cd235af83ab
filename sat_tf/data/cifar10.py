"""CIFAR-10 input pipeline: ``--dataset=cifar10``.

Sources (``DataConfig.source``, read by :mod:`sat_tf.data.sources`):

* ``"tfds"`` (default): tensorflow-datasets ``cifar10``, downloaded and prepared on first use
  into ``data_dir`` (or ``TFDS_DATA_DIR``, or ``~/tensorflow_datasets``).
* ``"tfrecord"``: ``train-*`` / ``test-*`` shards written by ``run/make_tfrecords.py
  --dataset=cifar10`` from the official archive (PNG images, 1-based labels on disk).

Train: pad 4 pixels (``DataConfig.cifar_padding``: "reflect" or "zero"), random 32x32 crop,
random flip; the decoded split is cached in memory (50,000 x 3 KiB) so later epochs skip
decoding. Eval: no preprocessing. Output float32 pixels in [0, 255]; an ``image_size`` other
than 32 resizes (bicubic, clipped) after augmentation.
"""
from __future__ import annotations

import tensorflow as tf

from sat_tf.config import DataConfig
from sat_tf.data import pipeline, sources

IMAGE_SIZE = 32
PAD = 4
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck")
DOWNLOAD_HOST = "www.cs.toronto.edu"     # where tensorflow-datasets downloads CIFAR-10 from
PROBE_TIMEOUT_SECONDS = 5.0


def _probe(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_SECONDS) -> None:
    """Raises ConnectionError (an OSError) unless ``host:port`` accepts a connection within
    ``timeout`` seconds (a name that does not resolve fails at once)."""
    import socket
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"{host} is not reachable: {e.strerror or e}") from None


def _prepare_tfds(builder, data: DataConfig) -> None:
    """Downloads and prepares the TFDS ``cifar10`` builder; a one-line ConnectionError that
    says how to work offline when that fails."""
    try:
        if not builder.is_prepared():
            # tensorflow-datasets retries a failed download for minutes; one quick probe of
            # the host tells an offline machine in seconds.
            _probe(DOWNLOAD_HOST)   # (read at call time: tests point it elsewhere)
        builder.download_and_prepare()
    except OSError as e:   # no network (requests' ConnectionError is an OSError), disk full...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConnectionError(
            f"CIFAR-10 could not be downloaded/prepared by tensorflow-datasets into "
            f"{builder.data_dir} ({reason[:200]}); without internet, convert the official "
            "archive with run/make_tfrecords.py --dataset=cifar10 and train with "
            "--data_source=tfrecord --data_dir=<its output> (or start with --dataset=digits: "
            "no download).") from e


RECORDS = sources.Records(
    splits={"train": "train", "eval": "test"}, tfds_name="cifar10",
    tfds_example_name=lambda e: tf.strings.join(["cifar10 ", e["id"]]),
    prepare_tfds=_prepare_tfds)


def _resize(image, size: int):
    if size == IMAGE_SIZE:
        return image
    image = tf.image.resize(image, [size, size], method="bicubic")
    return tf.clip_by_value(image, 0.0, 255.0)


def augment_train(image, key, padding: str):
    """uint8 ``[32, 32, 3]`` -> padded, randomly cropped and flipped float32 image."""
    crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    mode = {"reflect": "REFLECT", "zero": "CONSTANT"}[padding]
    image = tf.pad(image, [[PAD, PAD], [PAD, PAD], [0, 0]], mode=mode)
    image = tf.image.stateless_random_crop(image, [IMAGE_SIZE, IMAGE_SIZE, 3], crop_key)
    image = tf.image.stateless_random_flip_left_right(image, flip_key)
    return tf.cast(image, tf.float32)


def build(data: DataConfig, *, split: str, batch_size: int, image_size=None, input_context=None):
    """The CIFAR-10 split as the ``sat_tf.data`` contract describes."""
    size = image_size or IMAGE_SIZE

    def decode(png, label, position):
        image = tf.ensure_shape(tf.io.decode_png(png, channels=3), [IMAGE_SIZE, IMAGE_SIZE, 3])
        return image, label

    ds = sources.read(RECORDS, data, split, input_context).decode(
        decode, skip_corrupt=data.skip_corrupt)
    if split == "train":
        key = pipeline.example_key(data.seed, input_context)
        ds = ds.cache().shuffle(data.shuffle_buffer, seed=data.seed, reshuffle_each_iteration=True)
        ds = ds.repeat().enumerate().map(
            lambda i, e: (_resize(augment_train(e[0], key(i), data.cifar_padding), size), e[1]),
            num_parallel_calls=tf.data.AUTOTUNE)
        return pipeline.batch_train(ds, batch_size)
    ds = ds.map(lambda image, label: (_resize(tf.cast(image, tf.float32), size), label),
                num_parallel_calls=tf.data.AUTOTUNE)
    if data.cache_eval:
        ds = ds.cache()
    return pipeline.batch_eval(ds, batch_size)
