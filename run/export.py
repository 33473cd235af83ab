"""Exports a training run as a SavedModel usable with TensorFlow alone.

    python run/export.py --model_dir=/tmp/sat --export_dir=/tmp/sat-export
    saved_model_cli show --dir /tmp/sat-export --all

Signatures: ``serving_default`` (float32 pixels [batch, H, W, 3] in [0, 255] -> logits,
probabilities, classes), ``serving_encoded`` (encoded JPEG/PNG bytes, with the evaluation
preprocessing in the graph) and ``metadata``; see sat_tf/export.py. The EMA weights are
exported when the run kept them (--noema: the raw weights). The latest checkpoint is exported
unless --checkpoint names one.

Bad flag values fail with a one-line message and exit status 2 before TensorFlow is imported.
"""
from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import flags, logging  # noqa: E402

from sat_tf import cli  # noqa: E402
from sat_tf import loading  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "The training run to export (local or gs://).")
flags.DEFINE_string("checkpoint", None, "A checkpoint path in --model_dir (default: the latest).")
flags.DEFINE_bool("use_ema", True, "Export the EMA weights when the run kept them "
                  "(--noema / --nouse_ema: the raw weights).")
flags.DEFINE_alias("ema", "use_ema")
flags.DEFINE_string("export_dir", None, "A new (or empty) folder for the SavedModel.")

def _fail(message: str) -> None:
    cli.fail("export.py", message)


def check_flags() -> loading.Source:
    """TF-free checks; returns the resolved run."""
    if not FLAGS.model_dir:
        raise ValueError("--model_dir is required (the training run to export).")
    if not FLAGS.export_dir:
        raise ValueError("--export_dir is required (where the SavedModel goes).")
    d = FLAGS.export_dir
    if "://" not in d and os.path.exists(d) and (not os.path.isdir(d) or os.listdir(d)):
        raise ValueError(f"Export folder {d!r} exists and is not empty; choose a new one.")
    return loading.resolve(model_dir=FLAGS.model_dir, checkpoint=FLAGS.checkpoint,
                           use_ema=FLAGS.use_ema)


def metadata(info: dict, experiment) -> dict:
    """What the export records about where it came from."""
    return {"model": info["name"], "activation": info["activation"],
            "normalization": experiment.model.normalization, "step": info["step"],
            "weights": info["weights"], "checkpoint": info["checkpoint"],
            "experiment_name": experiment.name, "experiment": experiment.to_dict(),
            "paper": experiment.paper}


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; every option is a --flag.")
    try:
        source = check_flags()
    except ValueError as e:
        _fail(str(e))

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.set_verbosity(logging.WARNING)   # not the SavedModel writer's INFO lines
    from sat_tf import export
    try:
        model, info = loading.load(source)
        export.export_saved_model(model, FLAGS.export_dir, image_size=info["image_size"],
                                  metadata=metadata(info, source.experiment))
    except ValueError as e:
        _fail(str(e))
    print(f"Exported {info['name']} ({info['activation']}, step {info['step']}, "
          f"{info['weights']} weights, {info['image_size']}x{info['image_size']}, "
          f"{info['num_classes']} classes) from {info['checkpoint']} to {FLAGS.export_dir}; "
          f"signatures: {export.SERVING_SIGNATURE}, {export.ENCODED_SIGNATURE}, "
          f"{export.METADATA_SIGNATURE}.", flush=True)



if __name__ == "__main__":
    cli.run(main, "export.py")
