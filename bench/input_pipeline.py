r"""Input-pipeline throughput: the ImageNet train and eval pipelines against bare JPEG decoding.

Builds a temporary ImageNet-style dataset of real photographs (windows of scikit-learn's
china.jpg / flower.jpg at their own resolution, --image_height x --image_width, about
ImageNet's mean size, JPEG quality 95),
converts it with the project's converter, then measures images/second of

* bare decode: the same TFRecord files read, parsed and fully JPEG-decoded, nothing else;
* bare decode + bicubic resize to --image_size: the floor any pipeline that must resize
  bicubic pays (no crop, flip, shuffle or fault handling);
* the train pipeline (``sat_tf.data.build_dataset(split="train")``): distorted-box crop
  decoded with ``decode_and_crop_jpeg``, bicubic resize, clip, flip, batching;
* the eval pipeline: centre crop, bicubic resize, padded batches with masks;
* the train pipeline with RandAugment (N=2, M=10), for reference.

Each is measured --repeats times, interleaved, and the median is reported; the target is a
train pipeline at >= 70 % of bare decode on the same cores.

  python bench/input_pipeline.py [--num_images=320 --seconds=8 --repeats=3]
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_integer("num_images", 320, "Images in the temporary dataset (each split).")
flags.DEFINE_integer("image_height", 400, "Height of the JPEGs.")
flags.DEFINE_integer("image_width", 500, "Width of the JPEGs.")
flags.DEFINE_integer("image_size", 224, "Model resolution the pipelines resize to.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_float("seconds", 8.0, "Measuring time per pipeline and repeat.")
flags.DEFINE_integer("repeats", 3, "Interleaved measurements per pipeline (median reported).")
flags.DEFINE_string("work_dir", None, "Where the dataset goes (default: a temporary folder).")
FLAGS = flags.FLAGS

NUM_CLASSES = 8
SHARDS = 16


def _make_dataset(root: str) -> str:
    from sat_tf.data import convert, testing

    per_class = max(1, FLAGS.num_images // NUM_CLASSES)
    raw, out = os.path.join(root, "raw"), os.path.join(root, "tfrecords")
    if not os.path.exists(os.path.join(out, convert.MANIFEST_FILE)):
        testing.write_imagenet_tree(raw, num_classes=NUM_CLASSES, train_per_class=per_class,
                                    validation_per_class=per_class, odd_formats=False,
                                    image_shape=(FLAGS.image_height, FLAGS.image_width),
                                    native=True, quality=95)
    convert.convert_imagenet_tree(raw, out, train_shards=SHARDS, validation_shards=SHARDS,
                                  progress=False)
    return out


def _bare(data_dir: str, resize: bool):
    """Read, parse, decode the whole JPEG (and with ``resize``, bicubic to image_size)."""
    import tensorflow as tf

    from sat_tf.data import tfrecord

    def decode(record):
        image = tf.io.decode_jpeg(tfrecord.parse(record)[0], channels=3)
        if resize:
            return tf.image.resize(tf.cast(image, tf.float32), [FLAGS.image_size] * 2,
                                   method="bicubic")   # as the pipelines resize
        return tf.shape(image)[0]

    files = tfrecord.list_files(data_dir, "train")
    ds = tf.data.Dataset.from_tensor_slices(files).repeat().interleave(
        tf.data.TFRecordDataset, cycle_length=SHARDS, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(FLAGS.batch_size).prefetch(tf.data.AUTOTUNE)


def _pipeline(data_dir: str, split: str, augment: str = "none"):
    from sat_tf import data as data_lib
    from sat_tf.config import DataConfig

    cfg = DataConfig(dataset="imagenet", data_dir=data_dir, augment=augment,
                     shuffle_buffer=1024)
    ds = data_lib.build_dataset(cfg, split=split, batch_size=FLAGS.batch_size,
                                image_size=FLAGS.image_size)
    return ds.repeat() if split == "eval" else ds


def _images_per_second(ds) -> float:
    it = iter(ds)
    for _ in range(3):                       # warm up: trace, fill buffers
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < FLAGS.seconds:
        next(it)
        n += FLAGS.batch_size
    return n / (time.perf_counter() - start)


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as temp:
        data_dir = _make_dataset(FLAGS.work_dir or temp)
        pipelines = {
            "bare decode (full JPEG decode)": lambda: _bare(data_dir, resize=False),
            "bare decode + bicubic resize": lambda: _bare(data_dir, resize=True),
            "train (crop-decode, bicubic, flip)": lambda: _pipeline(data_dir, "train"),
            "eval (centre crop, bicubic, masks)": lambda: _pipeline(data_dir, "eval"),
            "train + RandAugment N=2 M=10": lambda: _pipeline(data_dir, "train", "randaugment"),
        }
        datasets = {name: make() for name, make in pipelines.items()}
        rates = {name: [] for name in pipelines}
        for _ in range(FLAGS.repeats):
            for name, ds in datasets.items():
                rates[name].append(_images_per_second(ds))

    median = {name: statistics.median(r) for name, r in rates.items()}
    bare = median["bare decode (full JPEG decode)"]
    print(f"\nInput pipelines, {FLAGS.num_images} JPEGs of {FLAGS.image_height}x"
          f"{FLAGS.image_width} -> {FLAGS.image_size}x{FLAGS.image_size}, batch "
          f"{FLAGS.batch_size}, {os.cpu_count()} CPU cores, TF {tf.__version__}, median of "
          f"{FLAGS.repeats} x {FLAGS.seconds:g} s\n")
    print(f"| {'pipeline':<36} | {'images/s':>9} | {'vs bare decode':>14} |")
    print(f"|{'-' * 38}|{'-' * 10}:|{'-' * 15}:|")
    for name, rate in median.items():
        print(f"| {name:<36} | {rate:>9.1f} | {rate / bare:>14.2f} |")
    train = median["train (crop-decode, bicubic, flip)"] / bare
    print(f"\ntrain pipeline at {train:.0%} of bare decode (target >= 70%): "
          f"{'met' if train >= 0.7 else 'NOT met'}")


if __name__ == "__main__":
    app.run(main)
