"""Figures 1 and 2: activation functions and their first derivatives.

    python run/plot_activations.py                     # docs/figures/activations.{png,pdf}
    python run/plot_activations.py --activations=relu,parametric_softplus --output=/tmp/fig1

Curves come from sat_tf.activations' closed forms (parametric softplus alpha 10, smooth_relu
at its initial beta 20).
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import flags  # noqa: E402

from sat_tf import cli, names, plots  # noqa: E402
from sat_tf.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("activations", ["relu", "parametric_softplus", "softplus", "smooth_relu",
                                  "elu", "gelu", "silu"],
                  f"Activations to draw: {', '.join(names.ACTIVATIONS)}.")
flags.DEFINE_string("output", "docs/figures/activations", "Output path without extension.")
flags.DEFINE_list("formats", ["png", "pdf"], "Figure formats: png, pdf, svg.")
flags.DEFINE_float("x_min", -4.0, "Left end of the x axis.")
flags.DEFINE_float("x_max", 4.0, "Right end of the x axis.")
flags.DEFINE_integer("dpi", 100, "PNG resolution.")


def activations_from_flags() -> list[str]:
    """The activations to draw, canonical names; the other flags checked (TF-free)."""
    acts = [names.activation(a) for a in FLAGS.activations]
    if not acts:
        raise UserError("Give at least one activation.")
    if not FLAGS.x_min < FLAGS.x_max:
        raise UserError(f"Invalid x range [{FLAGS.x_min}, {FLAGS.x_max}].")
    plots.check_formats(FLAGS.formats)
    return acts


def main(argv):
    acts = cli.start("plot_activations.py", argv, activations_from_flags)
    paths = plots.plot_activations(FLAGS.output, acts, x_range=(FLAGS.x_min, FLAGS.x_max),
                                   formats=FLAGS.formats, dpi=FLAGS.dpi)
    print("wrote " + ", ".join(paths))


if __name__ == "__main__":
    cli.run(main, "plot_activations.py")
