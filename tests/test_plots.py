"""Figures from small real runs: activation curves against closed forms, the robustness
scatter from a real evaluation report, loss landscapes of two trained models (in-process and
through run/plot_landscape.py on their exports)."""
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from sat_tf import activations, data, evaluation, export, plots, reports
from sat_tf.config import AttackConfig, DataConfig
from sat_tf.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZE = 16
DATA = DataConfig(synthetic_image_size=SIZE, synthetic_train_examples=512,
                  synthetic_eval_examples=64)


def net(activation):
    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(2 / 255.0, offset=-1)(inp)
    x = keras.layers.Conv2D(8, 3, strides=2)(x)
    x = activations.Activation(activation)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(10)(x))
    model.compile(keras.optimizers.Adam(0.02),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(data.build_dataset(DATA, split="train", batch_size=64), steps_per_epoch=20,
              epochs=1, verbose=0, shuffle=False)
    return model


@pytest.fixture(scope="module")
def models():
    return {"relu": net("relu"), "silu": net("silu")}


def check_files(paths, stem):
    assert paths == [f"{stem}.png", f"{stem}.pdf"]
    with Image.open(paths[0]) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    with open(paths[1], "rb") as f:
        assert f.read(5) == b"%PDF-"


def start(script, *args, env=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    return subprocess.Popen([sys.executable, str(ROOT / "run" / script), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc, status=0):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == status, err[-3000:]
    return out, err


def test_activation_curves_match_closed_forms():
    x = np.linspace(-5, 5, 101).astype(np.float32)
    curves = plots.activation_curves(["relu", "softplus", "swish", "parametric_softplus"], x)
    sig = 1 / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(curves["relu"][0], np.maximum(x, 0))
    np.testing.assert_allclose(curves["softplus"][0], np.log1p(np.exp(x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(curves["softplus"][1], sig, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(curves["silu"][0], x * sig, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(curves["parametric_softplus"][1], 1 / (1 + np.exp(-10.0 * x)),
                               rtol=1e-5, atol=1e-6)


def test_plot_activations(tmp_path):
    stem = str(tmp_path / "fig" / "activations")
    check_files(plots.plot_activations(stem), stem)
    with pytest.raises(ValueError, match="Unknown activation 'sigmoid'"):
        plots.plot_activations(stem, ["relu", "sigmoid"])


def test_paper_points_and_formats():
    """Figure 3's paper points by preset prefix, without the presets our runs already carry;
    a prefix no preset has and an unknown figure format are the user's errors."""
    points = plots.paper_points(["imagenet-resnet50-"], exclude={"imagenet-resnet50-silu"})
    by_label = {p["label"]: (p["clean"], p["robust"]) for p in points}
    assert by_label["relu"] == (68.8, 33.0) and by_label["elu"] == (69.2, 41.7)
    assert "silu" not in by_label
    with pytest.raises(UserError, match="No preset name starts with 'cifar100-'"):
        plots.paper_points(["cifar100-"])
    plots.check_formats(["png", "pdf", "svg"])
    with pytest.raises(UserError, match="Invalid figure format 'gif'"):
        plots.check_formats(["png", "gif"])


def test_loss_landscape_against_first_order_truth(models):
    x, y, _ = next(iter(data.build_dataset(DATA, split="eval", batch_size=8)))
    model = models["silu"]
    land = plots.loss_landscape(model, x[0], int(y[0]), radius=0.5, resolution=5)
    assert land["loss"].shape == (5, 5) and land["a"][2] == 0.0
    clean = tf.nn.sparse_softmax_cross_entropy_with_logits(y[:1], model(x[:1], training=False))
    np.testing.assert_allclose(land["loss"][2, 2], float(clean[0]), rtol=1e-5)
    # Along the gradient sign the loss rises at first order: L(+h) > L(0) > L(-h).
    centre = land["loss"][:, 2]
    assert centre[3] > centre[2] > centre[1]


def test_plot_landscapes_both_kinds(models, tmp_path):
    x, y, _ = next(iter(data.build_dataset(DATA, split="eval", batch_size=8)))
    panels = [(name, plots.loss_landscape(m, x[1], int(y[1]), radius=8.0, resolution=9))
              for name, m in models.items()]
    for kind in ("surface", "contour"):
        stem = str(tmp_path / kind)
        check_files(plots.plot_landscapes(panels, stem, kind=kind), stem)
    with pytest.raises(ValueError, match="Invalid landscape kind"):
        plots.plot_landscapes(panels, stem, kind="heatmap")


def test_figures_from_the_command_line(models, tmp_path):
    """A real evaluation report -> run/plot_robustness.py (no TensorFlow: a fake package that
    refuses to import proves it); two exports -> run/plot_landscape.py; a bad
    plot_activations.py flag."""
    ds = data.build_dataset(DATA, split="eval", batch_size=32)
    attack = [AttackConfig(epsilon=8.0, step_size=2.0, num_steps=3, clean_start_prob=0.0)]
    paths = []
    for name, model in models.items():
        result = evaluation.evaluate(model, ds, attack)
        report = reports.build_report(
            result, model={"name": "tiny", "activation": name}, data={"dataset": "synthetic"},
            protocol={}, paper={"source": "test", "clean": 70.0, "robust": 40.0})
        paths.append(str(tmp_path / f"{name}.json"))
        reports.write_json(report, paths[-1])
        export.export_saved_model(model, str(tmp_path / f"export-{name}"))
    fake = tmp_path / "fake"
    (fake / "tensorflow").mkdir(parents=True)
    (fake / "tensorflow" / "__init__.py").write_text("raise ImportError('TF was imported')\n")

    procs = [
        start("plot_robustness.py", f"--reports={tmp_path}/*.json",
              "--paper=imagenet-resnet50-", f"--output={tmp_path}/robustness",
              env={"PYTHONPATH": str(fake)}),
        start("plot_landscape.py", f"--saved_models={tmp_path}/export-relu,{tmp_path}/export-silu",
              "--labels=ReLU,SiLU", "--dataset=synthetic", "--example=3", "--resolution=7",
              "--kind=contour", f"--output={tmp_path}/landscape"),
        start("plot_activations.py", "--activations=relu,sigmoid", f"--output={tmp_path}/x",
              env={"PYTHONPATH": str(fake)}),
        start("plot_robustness.py", f"--reports={tmp_path}/none*.json",
              env={"PYTHONPATH": str(fake)}),
    ]
    rob, _ = finish(procs[0])
    land, _ = finish(procs[1])
    _, err = finish(procs[2], status=2)
    assert "Unknown activation 'sigmoid'" in err and err.count("\n") == 1
    _, err = finish(procs[3], status=2)
    assert "No report matches" in err

    for name in ("relu", "silu"):
        r = reports.read_json(str(tmp_path / f"{name}.json"))
        assert (f"tiny {plots.LABELS[name]}: clean {100 * r['clean_top1']:.1f} / robust "
                f"{100 * r['robust']:.1f}; paper 70.0 / 40.0") in rob
    assert "ReLU: loss at the example" in land and "SiLU: loss at the example" in land
    for stem in ("robustness", "landscape"):
        check_files([str(tmp_path / f"{stem}.png"), str(tmp_path / f"{stem}.pdf")],
                    str(tmp_path / stem))
