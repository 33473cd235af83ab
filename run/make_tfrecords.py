r"""Converts ImageNet, your own class-per-folder images, or CIFAR-10 to the TFRecord shards
``run/train.py --data_dir=...`` reads.

A folder tree, ImageNet-style (``train/<class>/*``; ``validation/<class>/*`` or flat
``validation/*`` with --validation_labels), of any number of classes and image sizes:

  python run/make_tfrecords.py --input=my_images --output_dir=my_images-tfrecords

  python run/make_tfrecords.py --dataset=imagenet --input=/data/ILSVRC2012 \
      --output_dir=gs://my-bucket/imagenet [--validation_labels=val_labels.txt]

The official CIFAR-10 archive (python or binary version, as downloaded):

  python run/make_tfrecords.py --dataset=cifar10 --input=cifar-10-python.tar.gz \
      --output_dir=/data/cifar10-tfrecords

Re-running resumes an interrupted conversion (finished shards are kept); a complete output is
left alone. The output folder records the input's fingerprint (an archive's size and SHA-256; a
folder tree's image paths, sizes and modification times): a different input into a used output
folder is refused, naming both; use a new folder for it. Bad flags give a one-line error and
exit status 2; bad input data (a truncated or corrupt archive, a member larger than the official
ones, a pickle holding code, a class folder name that would break label_map.txt) a one-line
error and exit status 1.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from sat_tf import cli  # noqa: E402
from sat_tf.errors import UserError  # noqa: E402

flags.DEFINE_string("dataset", None, "imagenet (any class-per-folder tree) or cifar10 (the "
                    "official archive); default: imagenet for a folder, cifar10 for a file.")
flags.DEFINE_string("input", None, "imagenet: the folder holding train/ and/or validation/; "
                    "cifar10: cifar-10-python.tar.gz or cifar-10-binary.tar.gz.")
flags.DEFINE_string("output_dir", None, "Where the shards go (local folder or gs://).")
flags.DEFINE_integer("train_shards", None, "Train shards (default: imagenet 1024, cifar10 16).")
flags.DEFINE_integer("validation_shards", None,
                     "Validation shards (cifar10: test shards; default: imagenet 128, cifar10 4).")
flags.DEFINE_string("validation_labels", None,
                    "imagenet, flat validation/ folder: one synset per line for the sorted file "
                    "names, or '<file name> <synset>' per line.")
flags.DEFINE_string("synset_texts", None,
                    "imagenet: optional imagenet_metadata.txt ('<synset>\\t<text>' per line) for "
                    "image/class/text.")
flags.DEFINE_list("cifar_counts", ["50000", "10000"],
                  "cifar10: the train,test image counts the archive must hold.")
flags.DEFINE_integer("num_workers", None, "Shards written at once (default: CPU count).")
flags.DEFINE_boolean("progress", True, "Show a progress bar.")

FLAGS = flags.FLAGS
DATASETS = ("imagenet", "cifar10")


def _checked() -> tuple[str, dict]:
    """Validates the flags (one-line UserError); returns the dataset and the converter's keyword
    arguments."""
    if FLAGS.dataset is not None and FLAGS.dataset not in DATASETS:
        raise UserError(f"Invalid --dataset {FLAGS.dataset!r}; valid choices: "
                        f"{', '.join(DATASETS)}.")
    if not FLAGS.input:
        raise UserError("--input is required.")
    if not FLAGS.output_dir:
        raise UserError("--output_dir is required.")
    for name in ("train_shards", "validation_shards", "num_workers"):
        v = getattr(FLAGS, name)
        if v is not None and v < 1:
            raise UserError(f"Invalid --{name} {v}; it must be >= 1.")
    if "://" not in FLAGS.input and not os.path.exists(FLAGS.input):
        raise UserError(f"--input {FLAGS.input!r} does not exist.")
    dataset = FLAGS.dataset
    if dataset is None and "://" not in FLAGS.input:
        dataset = "imagenet" if os.path.isdir(FLAGS.input) else "cifar10"
    if dataset is None:
        raise UserError(f"Give --dataset ({', '.join(DATASETS)}) for --input {FLAGS.input!r}.")
    import tensorflow as tf

    if not tf.io.gfile.exists(FLAGS.input):
        raise UserError(f"--input {FLAGS.input!r} does not exist.")
    common = dict(num_workers=FLAGS.num_workers, progress=FLAGS.progress)
    if dataset == "imagenet":
        if not tf.io.gfile.isdir(FLAGS.input):
            raise UserError(f"--input {FLAGS.input!r} must be a folder for --dataset=imagenet.")
        if FLAGS.validation_labels and not tf.io.gfile.exists(FLAGS.validation_labels):
            raise UserError(f"--validation_labels {FLAGS.validation_labels!r} does not exist.")
        if FLAGS.train_shards is not None:
            common["train_shards"] = FLAGS.train_shards
        if FLAGS.validation_shards is not None:
            common["validation_shards"] = FLAGS.validation_shards
        return dataset, dict(common, validation_labels=FLAGS.validation_labels,
                             synset_texts=FLAGS.synset_texts)
    for name in ("validation_labels", "synset_texts"):
        if getattr(FLAGS, name):
            raise UserError(f"--{name} applies to --dataset=imagenet only.")
    try:
        train, test = (int(c) for c in FLAGS.cifar_counts)
    except ValueError:
        raise UserError(f"Invalid --cifar_counts {','.join(FLAGS.cifar_counts)!r}; expected "
                        "two integers TRAIN,TEST.") from None
    if FLAGS.train_shards is not None:
        common["train_shards"] = FLAGS.train_shards
    if FLAGS.validation_shards is not None:
        common["test_shards"] = FLAGS.validation_shards
    return dataset, dict(common, expected_counts={"train": train, "test": test})


def main(argv):
    dataset, kwargs = cli.start("make_tfrecords.py", argv, _checked)
    from sat_tf.data import convert

    run = {"imagenet": convert.convert_imagenet_tree,
           "cifar10": convert.convert_cifar10_archive}[dataset]
    result = run(FLAGS.input, FLAGS.output_dir, **kwargs)  # bad input data: cli exits 1
    print(result.summary(FLAGS.output_dir))


if __name__ == "__main__":
    cli.run(main, "make_tfrecords.py")
