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

from sat_tf import cli  # noqa: E402
from sat_tf import names  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("activations", ["relu", "parametric_softplus", "softplus", "smooth_relu",
                                  "elu", "gelu", "silu"],
                  f"Activations to draw: {', '.join(names.ACTIVATIONS)}.")
flags.DEFINE_string("output", "docs/figures/activations", "Output path without extension.")
flags.DEFINE_list("formats", ["png", "pdf"], "Figure formats: png, pdf, svg.")
flags.DEFINE_float("x_min", -4.0, "Left end of the x axis.")
flags.DEFINE_float("x_max", 4.0, "Right end of the x axis.")
flags.DEFINE_integer("dpi", 100, "PNG resolution.")


def _fail(message: str) -> None:
    cli.fail("plot_activations.py", message)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; every option is a --flag.")
    try:
        acts = [names.activation(a) for a in FLAGS.activations]
        if not acts:
            raise ValueError("Give at least one activation.")
        if not FLAGS.x_min < FLAGS.x_max:
            raise ValueError(f"Invalid x range [{FLAGS.x_min}, {FLAGS.x_max}].")
        for fmt in FLAGS.formats:
            if fmt not in ("png", "pdf", "svg"):
                raise ValueError(f"Invalid figure format {fmt!r}; valid formats: png, pdf, svg.")
    except ValueError as e:
        _fail(str(e))
    from sat_tf import plots
    paths = plots.plot_activations(FLAGS.output, acts, x_range=(FLAGS.x_min, FLAGS.x_max),
                                   formats=FLAGS.formats, dpi=FLAGS.dpi)
    print("wrote " + ", ".join(paths))


if __name__ == "__main__":
    cli.run(main, "plot_activations.py")
