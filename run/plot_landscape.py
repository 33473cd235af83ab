"""Figure 5: the loss landscape around an input, for models side by side.

    python run/plot_landscape.py --model_dirs=runs/relu,runs/silu --labels=ReLU,SiLU \
        --example=0 --radius=8 --kind=surface --output=docs/figures/landscape
    python run/plot_landscape.py --saved_models=/tmp/a,/tmp/b --dataset=synthetic

For each model: the cross-entropy at x + a * sign(grad) + b * r, where grad is the model's
input gradient at the validation example x (the adversarial direction) and r a random sign
vector (--seed), for a and b in [-radius, radius] pixels. The example comes from the first
model's evaluation split (--dataset / --data_dir override it). Models come from training runs
(--model_dirs, EMA weights when kept; --noema for raw) or exports (--saved_models).
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import flags  # noqa: E402

from sat_tf import cli, loading  # noqa: E402
from sat_tf.config import DATASETS, Experiment  # noqa: E402
from sat_tf.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("model_dirs", [], "Training runs to plot, side by side.")
flags.DEFINE_list("saved_models", [], "Exports to plot (after the --model_dirs).")
flags.DEFINE_list("labels", None, "Panel titles, in order (default: model and activation).")
flags.DEFINE_bool("use_ema", True, "EMA weights when a run kept them (--noema: raw).")
flags.DEFINE_alias("ema", "use_ema")
flags.DEFINE_string("dataset", None, f"Dataset: {', '.join(DATASETS)} (default: the first "
                    "model's).")
flags.DEFINE_string("data_dir", None, "Data folder (default: the first model's).")
flags.DEFINE_integer("example", 0, "Index of the validation example.")
flags.DEFINE_float("radius", 8.0, "Half-width of the grid in pixels of 255.")
flags.DEFINE_integer("resolution", 21, "Grid points per axis.")
flags.DEFINE_integer("seed", 0, "Seed of the random direction.")
flags.DEFINE_enum("kind", "surface", ["surface", "contour"], "3-D surface or contour map.")
flags.DEFINE_string("output", "landscape", "Output path without extension.")
flags.DEFINE_list("formats", ["png", "pdf"], "Figure formats: png, pdf, svg.")


def check_flags():
    """TF-free: the resolved sources and the data config of the example."""
    sources = [loading.resolve(model_dir=d, use_ema=FLAGS.use_ema) for d in FLAGS.model_dirs]
    sources += [loading.resolve(saved_model=d) for d in FLAGS.saved_models]
    if not sources:
        raise UserError("Give --model_dirs and/or --saved_models.")
    if FLAGS.labels is not None and len(FLAGS.labels) != len(sources):
        raise UserError(f"--labels has {len(FLAGS.labels)} entries for {len(sources)} models.")
    if FLAGS.example < 0:
        raise UserError(f"Invalid --example {FLAGS.example}; it must be >= 0.")
    if not FLAGS.radius > 0:
        raise UserError(f"Invalid --radius {FLAGS.radius}; it must be > 0.")
    if FLAGS.resolution < 2:
        raise UserError(f"Invalid --resolution {FLAGS.resolution}; it must be >= 2.")
    exp = sources[0].experiment or Experiment()
    overrides = {k: v for k, v in (("data.dataset", FLAGS.dataset),
                                   ("data.data_dir", FLAGS.data_dir)) if v is not None}
    data = exp.replace(**overrides).data
    data.validate()
    return sources, data


def main(argv):
    sources, data_cfg = cli.start("plot_landscape.py", argv, check_flags)
    from sat_tf import data, plots
    loaded = [loading.load(s) for s in sources]
    sizes = {m.image_size for m in loaded}
    if len(sizes) != 1:
        cli.fail("plot_landscape.py", f"The models take different image sizes {sorted(sizes)}; "
                 "the landscapes need one input.")
    size = sizes.pop()
    n = data.info(data_cfg).num_eval_examples
    if FLAGS.example >= n:
        cli.fail("plot_landscape.py", f"Invalid --example {FLAGS.example}; the evaluation split "
                 f"has {n} examples.")
    batch = 64
    ds = data.build_dataset(data_cfg, split="eval", batch_size=batch, image_size=size)
    images, labels, _ = next(iter(ds.skip(FLAGS.example // batch)))
    image, label = images[FLAGS.example % batch], int(labels[FLAGS.example % batch])
    panels = []
    for i, m in enumerate(loaded):
        land = plots.loss_landscape(m.model, image, label, radius=FLAGS.radius,
                                    resolution=FLAGS.resolution, seed=FLAGS.seed)
        title = FLAGS.labels[i] if FLAGS.labels else (
            f"{m.name} {plots.LABELS.get(m.activation, m.activation)}")
        mid = FLAGS.resolution // 2
        print(f"{title}: loss at the example {land['loss'][mid, mid]:.4f}, max "
              f"{land['loss'].max():.4f}, along +adversarial edge "
              f"{land['loss'][-1, mid]:.4f}")
        panels.append((title, land))
    paths = plots.plot_landscapes(panels, FLAGS.output, kind=FLAGS.kind, formats=FLAGS.formats)
    print("wrote " + ", ".join(paths))


if __name__ == "__main__":
    cli.run(main, "plot_landscape.py")
