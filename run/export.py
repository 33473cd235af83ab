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
The export is sat_tf.export.export_run's; this program turns the flags into its arguments.
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import flags  # noqa: E402

from sat_tf import cli, loading  # noqa: E402
from sat_tf.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "The training run to export (local or gs://).")
flags.DEFINE_string("checkpoint", None, "A checkpoint path in --model_dir (default: the latest).")
flags.DEFINE_bool("use_ema", True, "Export the EMA weights when the run kept them "
                  "(--noema / --nouse_ema: the raw weights).")
flags.DEFINE_alias("ema", "use_ema")
flags.DEFINE_string("export_dir", None, "A new (or empty) folder for the SavedModel.")
flags.DEFINE_bool("overwrite", False, "Replace --export_dir if it holds a previous export "
                  "(anything else there is never replaced).")


def source_from_flags() -> loading.Source:
    """TF-free checks; returns the resolved run."""
    if not FLAGS.model_dir:
        raise UserError("--model_dir is required (the training run to export).")
    if not FLAGS.export_dir:
        raise UserError("--export_dir is required (where the SavedModel goes).")
    loading.check_export_dir(FLAGS.export_dir, FLAGS.overwrite)   # gs://: checked by export
    return loading.resolve(model_dir=FLAGS.model_dir, checkpoint=FLAGS.checkpoint,
                           use_ema=FLAGS.use_ema)


def main(argv):
    source = cli.start("export.py", argv, source_from_flags, quiet_logging=True)
    from sat_tf import export
    # ValueErrors from here on (no checkpoint, a folder taken meanwhile) exit 1 via cli.run.
    try:
        exported = export.export_run(source, FLAGS.export_dir, overwrite=FLAGS.overwrite)
    except export.ExportError as e:   # disk full, quota, permissions: nothing left behind
        cli.fail("export.py", str(e), status=1)
    print(exported.summary(), flush=True)


if __name__ == "__main__":
    cli.run(main, "export.py")
