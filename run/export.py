"""Exports a training run as a SavedModel usable with TensorFlow alone.

    python run/export.py --model_dir=/tmp/sat --export_dir=/tmp/sat-export
    saved_model_cli show --dir /tmp/sat-export --all

Signatures: ``serving_default`` (float32 pixels [batch, H, W, 3] in [0, 255] -> logits,
probabilities, classes), ``serving_encoded`` (encoded JPEG/PNG bytes, with the evaluation
preprocessing in the graph) and ``metadata``; see sat_tf/export.py. The EMA weights are
exported when the run kept them (--noema: the raw weights). The latest checkpoint is exported
unless --checkpoint names one.

--export_dir must be new or empty; --overwrite replaces a previous export there (and nothing
else). The SavedModel is written to a hidden sibling folder and renamed into place when
complete, so a failed write (disk full, quota, permissions) leaves no partial folder and any
previous export intact.

Bad flag values fail with a one-line message and exit status 2 before TensorFlow is imported;
problems found while running (a missing checkpoint, a failed write) with one line and status 1.
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
flags.DEFINE_bool("overwrite", False, "Replace --export_dir if it holds a previous export "
                  "(anything else there is never replaced).")


def _fail(message: str) -> None:
    cli.fail("export.py", message)


def check_flags() -> loading.Source:
    """TF-free checks; returns the resolved run."""
    if not FLAGS.model_dir:
        raise ValueError("--model_dir is required (the training run to export).")
    if not FLAGS.export_dir:
        raise ValueError("--export_dir is required (where the SavedModel goes).")
    d = FLAGS.export_dir
    if "://" not in d and os.path.exists(d):   # gs:// folders: sat_tf.export checks them
        # The same rules and messages as sat_tf.export.check_export_dir, without TensorFlow.
        if not os.path.isdir(d):
            raise ValueError(f"Export folder {d!r} is a file; choose a new folder.")
        if os.listdir(d) and not FLAGS.overwrite:
            raise ValueError(f"Export folder {d!r} exists and is not empty; choose a new one, "
                             "or overwrite it if it is a previous export (--overwrite).")
        if os.listdir(d) and not (os.path.isfile(os.path.join(d, "saved_model.pb")) and
                                  os.path.isfile(os.path.join(d, loading.EXPORT_METADATA))):
            raise ValueError(f"Export folder {d!r} is not empty and holds no sat_tf export "
                             f"(saved_model.pb and {loading.EXPORT_METADATA}); only a previous "
                             "export is overwritten.")
    return loading.resolve(model_dir=FLAGS.model_dir, checkpoint=FLAGS.checkpoint,
                           use_ema=FLAGS.use_ema)


def metadata(info: dict, experiment) -> dict:
    """What the export records about where it came from."""
    return {"model": info["name"], "activation": info["activation"],
            "normalization": experiment.model.normalization, "step": info["step"],
            "weights": info["weights"], "checkpoint": info["checkpoint"],
            "experiment_name": experiment.name, "experiment": experiment.to_dict(),
            "paper": experiment.paper}


def run_preprocessing(experiment) -> str:
    """The run's recorded preprocessing (runs from before it was recorded: the dataset's
    default, as those runs evaluated)."""
    from sat_tf import data
    return experiment.data.preprocessing or data.default_preprocessing(
        experiment.data.dataset, None)


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
    # ValueErrors from here on (no checkpoint, a folder taken meanwhile) exit 1 via cli.run.
    model, info = loading.load(source)
    replacing = bool(FLAGS.overwrite) and export.is_export(FLAGS.export_dir)
    try:
        export.export_saved_model(model, FLAGS.export_dir, image_size=info["image_size"],
                                  metadata=metadata(info, source.experiment),
                                  overwrite=FLAGS.overwrite,
                                  preprocessing=run_preprocessing(source.experiment))
    except export.ExportError as e:   # disk full, quota, permissions: nothing left behind
        cli.fail("export.py", str(e), status=1)
    print(f"Exported {info['name']} ({info['activation']}, step {info['step']}, "
          f"{info['weights']} weights, {info['image_size']}x{info['image_size']}, "
          f"{info['num_classes']} classes) from {info['checkpoint']} to {FLAGS.export_dir}"
          f"{' (replacing the previous export)' if replacing else ''}; "
          f"signatures: {export.SERVING_SIGNATURE}, {export.ENCODED_SIGNATURE}, "
          f"{export.METADATA_SIGNATURE}.", flush=True)


if __name__ == "__main__":
    cli.run(main, "export.py")
