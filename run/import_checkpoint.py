"""Imports released weights as a sat-tf run directory: the SAT authors' TF1 checkpoints and
Keras' EfficientNet weight files.

    python run/import_checkpoint.py --source=sat-resnet --activation=silu
        --checkpoint=Res50-silu/Res50-silu --model_dir=/runs/r50-silu
    python run/import_checkpoint.py --source=sat-efficientnet
        --checkpoint=efficientnet-bL1-enhanced/efficientnet-bL1-enhanced --use_ema
        --model_dir=/runs/l1-enhanced
    python run/import_checkpoint.py --source=keras-efficientnet --model=efficientnet-b0
        --checkpoint=~/.keras/models/efficientnetb0.h5 --model_dir=/runs/keras-b0

--source: sat-resnet (the release's ResNet/ResNeXt, tensorpack names), sat-efficientnet (its
EfficientNets, TPU names), keras-efficientnet (keras.applications EfficientNetB0-B7 .h5 or
.weights.h5). The architecture, class count and (SmoothReLU) activation are read from the
checkpoint; --activation names the release's --activation-name otherwise (its "gelu" is the
tanh form), --model only confirms. Every weight must be found exactly once with its shape, and
nothing but training state may be left over: otherwise one line names the first variables
that failed and nothing is written.

The run directory (experiment.json with the paper's ImageNet protocol and the release's
numbers, ckpt-0, import.json recording what was read and how) is then used as any run:

    python run/eval.py --model_dir=/runs/r50-silu --data_dir=/data/imagenet
    python run/export.py --model_dir=/runs/r50-silu --export_dir=/exports/r50-silu
    python run/train.py --init_from=/runs/r50-silu --model_dir=/runs/r50-silu-ft ...

Bad flag values fail with a one-line message and exit status 2 before TensorFlow is imported;
a checkpoint that does not fit with one line and status 1.
"""
from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import flags  # noqa: E402

from sat_tf import checkpoint_import, cli  # noqa: E402
from sat_tf.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("source", None, "Where the checkpoint comes from: "
                    f"{', '.join(checkpoint_import.SOURCES)}.")
flags.DEFINE_string("checkpoint", None, "TF1 checkpoint prefix (the path of its .index file "
                    "without .index), or a Keras .h5 / .weights.h5 file.")
flags.DEFINE_string("model_dir", None, "A new (or empty) folder for the run directory.")
flags.DEFINE_string("model", None, "sat-tf model name: required for keras-efficientnet; "
                    "otherwise read from the checkpoint (given: checked against it).")
flags.DEFINE_string("activation", None, "sat-resnet: the release's --activation-name (relu, "
                    "silu, elu, gelu, softplus, mish; smoothrelu is recognised). Default "
                    "silu for EfficientNets.")
flags.DEFINE_integer("image_size", None, "Input resolution (default: 224 for ResNets, the "
                     "EfficientNet table's; the release's 299/380 ResNets need it).")
flags.DEFINE_integer("num_classes", None, "Class count (default: the checkpoint's; Keras: "
                     "1000).")
flags.DEFINE_bool("use_ema", None, "sat-efficientnet: import the moving averages "
                  "(*/ExponentialMovingAverage; L1-Enhanced) instead of the raw weights. "
                  "Default: the raw ones when present.")
flags.DEFINE_string("input_channels", None, "sat-resnet: the channel order the release's "
                    "weights take, bgr (default: its evaluation feeds cv2's BGR images; the "
                    "stem kernel is reversed for sat-tf's RGB input) or rgb.")


def arguments_from_flags() -> dict:
    """TF-free checks; the arguments of checkpoint_import.import_checkpoint."""
    for name in ("source", "checkpoint", "model_dir"):
        if not getattr(FLAGS, name):
            raise UserError(f"--{name} is required.")
        if name == "source":
            checkpoint_import.check_source(FLAGS.source)
    args = dict(source=FLAGS.source, checkpoint=os.path.expanduser(FLAGS.checkpoint),
                model_dir=os.path.expanduser(FLAGS.model_dir),
                model=FLAGS.model, activation=FLAGS.activation, image_size=FLAGS.image_size,
                num_classes=FLAGS.num_classes, use_ema=FLAGS.use_ema,
                input_channels=FLAGS.input_channels)
    checkpoint_import.check_arguments(
        args["source"], activation=args["activation"], model=args["model"],
        input_channels=args["input_channels"], use_ema=args["use_ema"],
        image_size=args["image_size"], num_classes=args["num_classes"])
    checkpoint_import.check_checkpoint_path(args["source"], args["checkpoint"])
    checkpoint_import.check_model_dir(args["model_dir"])
    return args


def main(argv):
    args = cli.start("import_checkpoint.py", argv, arguments_from_flags, quiet_logging=True)
    try:
        checkpoint_import.import_checkpoint(**args, log=lambda line: print(line, flush=True))
    except checkpoint_import.MismatchError as e:
        cli.fail("import_checkpoint.py", str(e), status=1)


if __name__ == "__main__":
    cli.run(main, "import_checkpoint.py")
