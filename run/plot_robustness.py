"""Figures 3 and 4: accuracy against robustness, ours beside the paper's.

    python run/plot_robustness.py --reports=runs/*/eval_report_step*.json \
        --paper=imagenet-resnet50- --output=docs/figures/robustness

Each --reports file is a run/eval.py report: our point is (robust, clean top-1); when the run
came from a preset with the paper's numbers, the paper's point is drawn hollow and joined to
ours. --paper adds the paper's points of every preset whose name starts with a prefix
(python run/experiments.py list), e.g. the whole of Figure 3 with imagenet-resnet50-.
No TensorFlow is imported.
"""
from __future__ import annotations

import glob
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import flags  # noqa: E402

from sat_tf import cli, plots, reports  # noqa: E402
from sat_tf.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("reports", [], "Evaluation reports (JSON; globs allowed).")
flags.DEFINE_list("labels", None, "Legend labels for the reports, in order (default: model "
                  "and activation).")
flags.DEFINE_list("paper", [], "Preset-name prefixes whose paper numbers to add, e.g. "
                  "imagenet-resnet50-.")
flags.DEFINE_string("output", "robustness", "Output path without extension.")
flags.DEFINE_string("title", "Accuracy vs robustness", "Figure title.")
flags.DEFINE_list("formats", ["png", "pdf"], "Figure formats: png, pdf, svg.")


def points_from_flags() -> tuple[list[dict], list[dict]]:
    """(our points from the reports, the paper's further points), checked (TF-free)."""
    paths = []
    for pattern in FLAGS.reports:
        found = sorted(glob.glob(pattern))
        if not found:
            raise UserError(f"No report matches {pattern!r}.")
        paths += found
    if FLAGS.labels is not None and len(FLAGS.labels) != len(paths):
        raise UserError(f"--labels has {len(FLAGS.labels)} entries for {len(paths)} reports.")
    try:
        loaded = [reports.read_json(p) for p in paths]
    except OSError as e:   # unreadable: one line like a bad value
        raise UserError(str(e)) from None
    ours = [plots.report_point(r, FLAGS.labels[i] if FLAGS.labels else None)
            for i, r in enumerate(loaded)]
    extra = plots.paper_points(FLAGS.paper,
                               exclude={r["model"].get("experiment_name") for r in loaded})
    if not ours and not extra:
        raise UserError("Nothing to plot: give --reports and/or --paper.")
    return ours, extra


def main(argv):
    ours, extra = cli.start("plot_robustness.py", argv, points_from_flags)
    written = plots.plot_robustness(ours, FLAGS.output, paper_points=extra, title=FLAGS.title,
                                    formats=FLAGS.formats)
    for p in ours:
        paper = (f"; paper {p['paper_clean']:.1f} / {p['paper_robust']:.1f}"
                 if p["paper_clean"] is not None and p["paper_robust"] is not None else "")
        print(f"{p['label']}: clean {p['clean']:.1f} / robust {p['robust']:.1f}{paper}")
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    cli.run(main, "plot_robustness.py")
