"""ImageNet (ILSVRC-2012) input pipeline: ``--dataset=imagenet``, and ``--dataset=images`` (a
folder of class folders converted by ``run/make_tfrecords.py``).

Sources (``DataConfig.source``, read by :mod:`sat_tf.data.sources`):

* ``"tfrecord"`` (default): the official TFRecord layout (:mod:`sat_tf.data.tfrecord`),
  ``train-*`` / ``validation-*`` shards in ``data_dir``, a local folder or ``gs://`` bucket;
  training visits the shards in a seeded random order.
* ``"tfds"`` (imagenet only): the tensorflow-datasets ``imagenet2012`` builder; the ILSVRC tar
  files go in ``manual_dir``, the prepared dataset in ``data_dir`` (or ``TFDS_DATA_DIR``).

Preprocessing as DESIGN.md §5 and the TPU reference. Train: a distorted bounding box (area
0.08–1 of the image, aspect 3/4–4/3, covering >= 10 % of it, 10 attempts; when every attempt
fails, the eval centre crop) is cropped *before* the JPEG is decoded (``decode_and_crop_jpeg``),
resized bicubic to ``image_size``, clipped to [0, 255] and flipped at random; then optional
RandAugment / AutoAugment (:mod:`sat_tf.data.augment`). Eval: the centre square of side
``image_size / (image_size + 32)`` of the short side, decoded the same way, bicubic, clipped.

Small images and datasets other than ImageNet choose their preprocessing
(``DataConfig.preprocessing``, default by image size: :func:`sat_tf.data.info`): "resize"
takes the whole image (bicubic resize to ``image_size``; a random flip in training), "cifar"
the whole image resized, then CIFAR-10's pad-4 random crop and flip in training.

Randomness is stateless, keyed by ``DataConfig.seed`` and the example's position in this
host's stream, so a pipeline is reproducible from its seed.
"""
from __future__ import annotations

import tensorflow as tf

from sat_tf.config import DataConfig
from sat_tf.data import augment, pipeline, sources

DEFAULT_IMAGE_SIZE = 224
CROP_PADDING = 32


def center_crop_window(shape, image_size: int):
    """``[y, x, h, w]``: the centre square, ``image_size / (image_size + 32)`` of the short side."""
    height, width = shape[0], shape[1]
    side = tf.cast(image_size / (image_size + CROP_PADDING)
                   * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
    return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def _resize(image, image_size: int):
    # Bicubic on float32 input gives the same pixels as on uint8 and runs ~40 % faster on CPU.
    image = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size],
                            method="bicubic")
    return tf.clip_by_value(image, 0.0, 255.0)


def preprocess_eval(image_bytes, image_size: int):
    """JPEG bytes -> float32 ``[image_size, image_size, 3]`` in [0, 255] (centre crop)."""
    window = center_crop_window(tf.image.extract_jpeg_shape(image_bytes), image_size)
    return _resize(tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3), image_size)


def preprocess_train(image_bytes, key, image_size: int, data: DataConfig | None = None):
    """JPEG bytes -> float32 ``[image_size, image_size, 3]`` in [0, 255] (random crop, flip).

    ``key`` is a ``[2]`` integer stateless-random seed; ``data.augment`` adds RandAugment or
    AutoAugment.
    """
    crop_key, flip_key, augment_key = tf.unstack(tf.random.experimental.stateless_split(key, 3))
    shape = tf.image.extract_jpeg_shape(image_bytes)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=crop_key,
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    # When all attempts fail the op returns the whole image: take the eval crop instead.
    failed = tf.logical_and(tf.equal(size[0], shape[0]), tf.equal(size[1], shape[1]))
    window = tf.where(failed, center_crop_window(shape, image_size),
                      tf.stack([begin[0], begin[1], size[0], size[1]]))
    image = _resize(tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3), image_size)
    image = tf.image.stateless_random_flip_left_right(image, flip_key)
    if data is not None and data.augment != "none":
        image = augment.apply(image, augment_key, data)
    return image


def decode_whole(image_bytes, image_size: int):
    """Encoded JPEG/PNG bytes -> the whole image, float32 ``[image_size, image_size, 3]`` in
    [0, 255] (bicubic, clipped): the "resize" and "cifar" preprocessing's evaluation input."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    return tf.ensure_shape(_resize(image, image_size), [image_size, image_size, 3])


def preprocess_whole_train(image_bytes, key, image_size: int, preprocessing: str,
                           data: DataConfig | None = None):
    """Training input of the "resize" (flip) and "cifar" (pad-4 crop, flip) preprocessing."""
    crop_key, flip_key, augment_key = tf.unstack(tf.random.experimental.stateless_split(key, 3))
    image = decode_whole(image_bytes, image_size)
    if preprocessing == "cifar":
        pad = 4
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], crop_key)
    image = tf.image.stateless_random_flip_left_right(image, flip_key)
    if data is not None and data.augment != "none":
        image = augment.apply(image, augment_key, data)
    return image


def _prepare_tfds(builder, data: DataConfig) -> None:
    """Prepares TFDS ``imagenet2012`` from the ILSVRC tar files in ``data.manual_dir``."""
    import tensorflow_datasets as tfds

    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=data.manual_dir))


RECORDS = sources.Records(
    splits={"train": "train", "eval": "validation"}, tfds_name="imagenet2012",
    tfds_example_name=lambda e: e["file_name"], prepare_tfds=_prepare_tfds, shuffle_files=True)


def build(data: DataConfig, *, split: str, batch_size: int, image_size=None, input_context=None,
          label_base: int = 1, preprocessing: str = "imagenet"):
    """The split as the ``sat_tf.data`` contract describes; ``label_base`` is the first label
    in the TFRecords, ``preprocessing`` one of :data:`sat_tf.config.PREPROCESSINGS`."""
    size = image_size or DEFAULT_IMAGE_SIZE
    stream = sources.read(RECORDS, data, split, input_context, label_base=label_base)
    if split == "train":
        key = pipeline.example_key(data.seed, input_context)
        # Shuffling one pass, then repeating, keeps epochs whole: each sees every record once.
        stream = stream.reorder(lambda ds: ds.shuffle(
            data.shuffle_buffer, seed=data.seed, reshuffle_each_iteration=True).repeat())

        def example(image_bytes, label, position):
            if preprocessing == "imagenet":
                return preprocess_train(image_bytes, key(position), size, data), label
            return preprocess_whole_train(image_bytes, key(position), size, preprocessing,
                                          data), label

        ds = stream.decode(example, skip_corrupt=data.skip_corrupt)
        return pipeline.batch_train(ds, batch_size)

    def eval_example(image_bytes, label, position):
        if preprocessing == "imagenet":
            return preprocess_eval(image_bytes, size), label
        return decode_whole(image_bytes, size), label

    ds = stream.decode(eval_example, skip_corrupt=data.skip_corrupt)
    if data.cache_eval:     # float32 pixels: image_size^2 * 12 bytes per example, in memory
        ds = ds.cache()
    return pipeline.batch_eval(ds, batch_size)
