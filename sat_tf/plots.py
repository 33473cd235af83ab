"""The paper's figures (matplotlib, Agg backend; PNG and PDF).

* :func:`plot_activations`: activation functions and their first derivatives (Figures 1, 2).
* :func:`plot_robustness`: accuracy against robustness from evaluation reports
  (:func:`report_point`), with the paper's numbers beside ours (:func:`paper_points`)
  (Figures 3, 4).
* :func:`loss_landscape` / :func:`plot_landscapes`: the loss around an input along the
  adversarial (gradient-sign) direction and a random sign direction, for models side by side
  (Figure 5).

matplotlib and TensorFlow are imported only by the functions that need them, so plotting
reports needs neither TensorFlow nor a display.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from sat_tf import experiments
from sat_tf.errors import UserError

FORMATS = ("png", "pdf")
FIGURE3_ACTIVATIONS = ("relu", "parametric_softplus", "softplus", "smooth_relu", "elu", "gelu",
                       "silu")
LABELS = {"relu": "ReLU", "parametric_softplus": "Parametric Softplus", "softplus": "Softplus",
          "smooth_relu": "SmoothReLU", "elu": "ELU", "gelu": "GELU", "gelu_tanh": "GELU (tanh)",
          "silu": "SiLU", "celu": "CELU", "mish": "Mish"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def check_formats(formats: Sequence[str]) -> None:
    """A one-line UserError unless every format is png, pdf or svg."""
    for fmt in formats:
        if fmt not in ("png", "pdf", "svg"):
            raise UserError(f"Invalid figure format {fmt!r}; valid formats: png, pdf, svg.")


def save(fig, stem: str, formats: Sequence[str] = FORMATS, dpi: int = 100) -> list[str]:
    """Writes ``stem.png``, ``stem.pdf`` ... and closes the figure; returns the paths."""
    check_formats(formats)
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    paths = []
    for fmt in formats:
        path = f"{stem}.{fmt}"
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        paths.append(path)
    _pyplot().close(fig)
    return paths


# ---------------------------------------------------------------------------------------------
# Figures 1 and 2.

def activation_curves(names: Sequence[str], x: np.ndarray) -> dict[str, tuple[np.ndarray, ...]]:
    """``{name: (f(x), f'(x))}`` from sat_tf.activations' closed forms (smooth_relu at its
    initial beta = 20, parametric softplus at alpha = 10)."""
    from sat_tf import activations
    x = np.asarray(x, np.float32)
    out = {}
    for name in names:
        canonical = activations.canonical_name(name)
        out[canonical] = (np.asarray(activations.forward(canonical, x)),
                          np.asarray(activations.derivative(canonical, x)))
    return out


def plot_activations(stem: str, names: Sequence[str] = FIGURE3_ACTIVATIONS, *,
                     x_range: tuple[float, float] = (-4.0, 4.0), formats=FORMATS,
                     dpi: int = 100) -> list[str]:
    """Two panels: the activation functions, and their first derivatives."""
    plt = _pyplot()
    x = np.linspace(x_range[0], x_range[1], 801, dtype=np.float32)
    curves = activation_curves(names, x)
    fig, (ax_f, ax_d) = plt.subplots(1, 2, figsize=(9.0, 3.6))
    for name, (y, dy) in curves.items():
        style = {"linewidth": 2.2 if name == "relu" else 1.4,
                 "color": "black" if name == "relu" else None,
                 "linestyle": "--" if name == "relu" else "-"}
        ax_f.plot(x, y, label=LABELS.get(name, name), **style)
        ax_d.plot(x, dy, label=LABELS.get(name, name), **style)
    ax_f.set(title="Activation functions", xlabel="x", ylabel="f(x)",
             ylim=(min(-1.2, x_range[0] / 4), x_range[1]))
    ax_d.set(title="First derivatives", xlabel="x", ylabel="f'(x)", ylim=(-0.2, 1.25))
    for ax in (ax_f, ax_d):
        ax.grid(alpha=0.3)
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.axvline(0, color="grey", linewidth=0.6)
    ax_d.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return save(fig, stem, formats, dpi)


# ---------------------------------------------------------------------------------------------
# Figures 3 and 4.

def report_point(report: dict, label: str | None = None) -> dict:
    """Our (clean, robust) accuracy in percent from a report, and the paper's if recorded."""
    m = report["model"]
    paper = report.get("paper") or {}
    return {
        "label": label or f"{m.get('name')} {LABELS.get(m.get('activation'), m.get('activation'))}",
        "clean": 100.0 * report["clean_top1"], "robust": 100.0 * report["robust"],
        "paper_clean": paper.get("clean"), "paper_robust": paper.get("robust"),
    }


def paper_points(prefixes: Sequence[str], exclude=()) -> list[dict]:
    """The paper's ``{"label", "clean", "robust"}`` of every preset whose name starts with one
    of ``prefixes`` (labelled by the rest of the name) and has both numbers, except the presets
    named in ``exclude`` (our runs of them carry their paper numbers). A prefix that no preset
    name starts with is a UserError."""
    points = []
    for prefix in prefixes:
        matched = [n for n in experiments.names() if n.startswith(prefix)]
        if not matched:
            raise UserError(f"No preset name starts with {prefix!r} (see run/experiments.py "
                            "list).")
        for name in matched:
            paper = experiments.get(name).paper
            if name in exclude or paper.get("clean") is None or paper.get("robust") is None:
                continue
            points.append({"label": name[len(prefix):] or name, "clean": paper["clean"],
                           "robust": paper["robust"]})
    return points


def plot_robustness(points: Sequence[dict], stem: str, *, paper_points: Sequence[dict] = (),
                    title: str = "Accuracy vs robustness", formats=FORMATS,
                    dpi: int = 100) -> list[str]:
    """Accuracy (y) against robustness (x), percent.

    ``points``: ours, from :func:`report_point` (filled markers; a dotted line joins each to
    its paper counterpart, drawn hollow). ``paper_points``: further paper numbers
    ``{"label", "clean", "robust"}`` without a run of ours (hollow markers).
    """
    if not points and not paper_points:
        raise UserError("Nothing to plot: give at least one report or paper point.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(points) + len(paper_points) > len(colours):
        colours = [plt.get_cmap("tab20")(i) for i in range(20)]
    for i, p in enumerate(points):
        c = colours[i % len(colours)]
        ax.scatter([p["robust"]], [p["clean"]], color=c, s=45, label=f"{p['label']} (ours)",
                   zorder=3)
        if p.get("paper_clean") is not None and p.get("paper_robust") is not None:
            ax.scatter([p["paper_robust"]], [p["paper_clean"]], facecolors="none", edgecolors=c,
                       s=60, marker="s", zorder=3)
            ax.plot([p["robust"], p["paper_robust"]], [p["clean"], p["paper_clean"]], ":",
                    color=c, linewidth=1)
    for j, p in enumerate(paper_points):
        c = colours[(len(points) + j) % len(colours)]
        ax.scatter([p["robust"]], [p["clean"]], facecolors="none", edgecolors=c, s=60,
                   marker="s", label=f"{p['label']} (paper)", zorder=3)
    if any(p.get("paper_clean") is not None for p in points):
        ax.scatter([], [], facecolors="none", edgecolors="grey", marker="s", label="paper")
    ax.set(title=title, xlabel="Robustness: PGD accuracy (%)", ylabel="Accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save(fig, stem, formats, dpi)


# ---------------------------------------------------------------------------------------------
# Figure 5.

def loss_landscape(model, image, label, *, radius: float = 8.0, resolution: int = 21,
                   seed: int = 0, batch_size: int = 128) -> dict:
    """Cross-entropy at ``image + a * d_adv + b * d_rand`` on a grid of a, b in
    [-radius, radius] (pixels of 255).

    ``d_adv`` is the sign of the input gradient of the loss at ``image`` (the FGSM direction),
    ``d_rand`` a random sign vector (seeded). The model is called with ``training=False``
    (Keras) or as a callable (a loaded SavedModel). Returns ``{"a", "b", "loss"}`` with
    ``loss[i, j]`` at ``a[i]``, ``b[j]``.
    """
    if resolution < 2:
        raise UserError(f"Invalid resolution {resolution!r}; it must be >= 2.")
    import keras
    import tensorflow as tf

    def logits(x):
        out = model(x, training=False) if isinstance(model, keras.Layer) else model(x)
        return tf.cast(out, tf.float32)

    x = tf.convert_to_tensor(np.asarray(image, np.float32)[None])
    y = tf.constant([int(label)], tf.int32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits(x))
    d_adv = tf.sign(tape.gradient(loss, x))
    d_rand = tf.sign(tf.random.stateless_uniform(x.shape, [seed, 5], -1.0, 1.0))
    a = np.linspace(-radius, radius, resolution, dtype=np.float32)
    aa, bb = np.meshgrid(a, a, indexing="ij")
    coef = np.stack([aa.ravel(), bb.ravel()], 1)
    losses = []
    for start in range(0, len(coef), batch_size):
        c = tf.constant(coef[start:start + batch_size])
        points = x + c[:, 0, None, None, None] * d_adv + c[:, 1, None, None, None] * d_rand
        labels = tf.fill([tf.shape(points)[0]], y[0])
        losses.append(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits(points)))
    return {"a": a, "b": a.copy(), "loss": np.concatenate(losses).reshape(resolution, resolution)}


def plot_landscapes(landscapes: Sequence[tuple[str, dict]], stem: str, *, kind: str = "surface",
                    formats=FORMATS, dpi: int = 100) -> list[str]:
    """One panel per ``(title, loss_landscape(...))``, side by side, as 3-D surfaces or contour
    maps."""
    if kind not in ("surface", "contour"):
        raise UserError(f"Invalid landscape kind {kind!r}; valid kinds: surface, contour.")
    if not landscapes:
        raise UserError("Nothing to plot: give at least one landscape.")
    plt = _pyplot()
    n = len(landscapes)
    fig = plt.figure(figsize=(4.6 * n, 4.0))
    for i, (title, land) in enumerate(landscapes, 1):
        aa, bb = np.meshgrid(land["a"], land["b"], indexing="ij")
        if kind == "surface":
            ax = fig.add_subplot(1, n, i, projection="3d")
            ax.plot_surface(aa, bb, land["loss"], cmap="viridis", linewidth=0, antialiased=True)
            ax.set_zlabel("loss")
        else:
            ax = fig.add_subplot(1, n, i)
            cs = ax.contourf(aa, bb, land["loss"], levels=20, cmap="viridis")
            fig.colorbar(cs, ax=ax, label="loss")
        ax.set_title(title)
        ax.set_xlabel("adversarial direction (pixels)", fontsize=8)
        ax.set_ylabel("random direction (pixels)", fontsize=8)
        ax.locator_params(nbins=5)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return save(fig, stem, formats, dpi)
