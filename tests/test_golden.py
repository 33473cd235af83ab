"""Pins of behaviour that a refactoring must not change (issue 11).

Two short deterministic runs through the public entry points; their final loss, a checksum of
the weights, optimizer slots and EMA averages, and the logits of a fixed batch were recorded
by ``tests/data/make_golden.py`` at commit 9d894a8, before the redesign. ``legacy_run/`` is a
run directory that commit wrote: later versions must load it to the same logits and resume it.

The experiments are built from dictionaries in the layout of that commit's experiment.json,
so reading an old run's configuration is pinned too.
"""
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

from sat_tf import rundir, training
from sat_tf.config import Experiment

HERE = os.path.dirname(os.path.abspath(__file__))
LEGACY = "mirrored"
SIZE, CLASSES = 16, 4

_DATA = {"dataset": "synthetic", "synthetic_image_size": SIZE, "synthetic_num_classes": CLASSES,
         "synthetic_train_examples": 64, "synthetic_eval_examples": 16}
RUNS = {
    # Two replicas, PGD-2, Nesterov SGD with warm-up and steps, kernel-only decay, EMA.
    "mirrored": {
        "model": {"name": "wrn-10-1", "activation": "silu"},
        "data": _DATA,
        "train_attack": {"epsilon": 8.0, "step_size": 4.0, "num_steps": 2,
                         "clean_start_prob": 0.25},
        "eval_attack": {"epsilon": 8.0, "step_size": 2.0, "num_steps": 3,
                        "clean_start_prob": 0.0},
        "train": {"global_batch_size": 16, "train_steps": 4, "train_epochs": None,
                  "steps_per_loop": 2, "summary_every_steps": 2, "checkpoint_every_steps": 4,
                  "eval_steps": 1, "optimizer": "sgd_nesterov", "base_learning_rate": 0.8,
                  "lr_schedule": "step", "warmup_epochs": 1.0, "decay_boundaries": [2.0],
                  "weight_decay": 1e-3, "weight_decay_scope": "kernels", "ema_decay": 0.9,
                  "seed": 3},
        "runtime": {"strategy": "mirrored", "devices": ["/cpu:0", "/cpu:1"],
                    "deterministic": True},
    },
    # One device, Table 1's "both" arm, RMSProp with exponential decay, non-BN decay, no EMA.
    "one_device": {
        "model": {"name": "wrn-10-1", "activation": "relu"},
        "data": _DATA,
        "train_attack": {"epsilon": 4.0, "step_size": 4.0, "num_steps": 1,
                         "backward": "parametric_softplus"},
        "eval_attack": {"epsilon": 4.0, "step_size": 1.0, "num_steps": 2,
                        "clean_start_prob": 0.0},
        "train": {"global_batch_size": 8, "train_steps": 3, "train_epochs": None,
                  "steps_per_loop": 3, "summary_every_steps": 3, "checkpoint_every_steps": 3,
                  "eval_steps": 1, "optimizer": "rmsprop", "base_learning_rate": 0.05,
                  "lr_schedule": "exponential", "warmup_epochs": 0.0, "decay_epochs": 0.1,
                  "weight_decay": 1e-4, "weight_decay_scope": "non_bn",
                  "label_smoothing": 0.1, "optimizer_backward": "parametric_softplus",
                  "seed": 5},
        "runtime": {"deterministic": True},
    },
}

# Recorded by tests/data/make_golden.py at commit 9d894a8.
PINS = {
    "mirrored": {
        "loss": 1.666640043258667,
        "clean_top1": 0.1875,
        "weights": 4851.068919268477,
        "optimizer": 13.047085588477195,
        "ema": 4853.699067712238,
        "step": 4,
        "logits": [
            [0.00698729, -0.01458013, 0.02250271, 0.05559298],
            [-0.00118736, -0.03724294, 0.02571789, 0.07455099],
            [-0.01409226, -0.03039344, 0.02325169, 0.06251527],
            [-0.01750598, -0.03673873, 0.01326729, 0.06015882],
        ],
    },
    "one_device": {
        "loss": 1.4356482823689778,
        "clean_top1": 0.25,
        "weights": 4857.665819985147,
        "optimizer": 56469.787582036464,
        "ema": 0.0,
        "step": 3,
        "logits": [
            [0.03145362, 0.03416122, -0.03662756, -0.0104895],
            [-0.00529131, 0.01092884, -0.02315517, 0.03176973],
            [0.02087425, 0.03451454, 0.01913084, 0.01448022],
            [-0.01206474, -0.01124186, -0.00220279, 0.00494756],
        ],
    },
}


def _images():
    return tf.random.stateless_uniform([4, SIZE, SIZE, 3], [7, 11], 0.0, 255.0)


def _checksum(variables) -> float:
    return float(sum(np.abs(np.asarray(v, np.float64)).sum() for v in variables))


def run_and_measure(name: str, model_dir: str) -> dict:
    """Trains run ``name`` in ``model_dir``; what :data:`PINS` records of it."""
    exp = Experiment.from_dict({**RUNS[name], "model_dir": str(model_dir)})
    try:
        trainer = training.Trainer(exp, log=lambda _: None)
        result = trainer.train()
    finally:
        tf_config.disable_op_determinism()
    assert result["status"] == "completed"
    ema = trainer.ema.averages if trainer.ema is not None else []
    model, _, step = rundir.load_model(str(model_dir))
    return {
        "loss": result["train"]["loss"],
        "clean_top1": result["eval"]["clean_top1"],
        "weights": _checksum(trainer.model.weights),
        "optimizer": _checksum([v for v in trainer.optimizer.variables
                                if "iteration" not in v.path]),
        "ema": _checksum(ema),
        "step": step,
        "logits": np.asarray(model(_images(), training=False), np.float64).round(8).tolist(),
    }


def _assert_matches(got: dict, pinned: dict) -> None:
    assert got["step"] == pinned["step"]
    for key in ("loss", "clean_top1", "weights", "optimizer", "ema"):
        np.testing.assert_allclose(got[key], pinned[key], rtol=2e-6, err_msg=key)
    np.testing.assert_allclose(got["logits"], pinned["logits"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_short_run_reproduces_its_pinned_loss_and_weights(tmp_path, name):
    _assert_matches(run_and_measure(name, tmp_path), PINS[name])


def test_a_run_directory_written_before_the_redesign_loads_and_resumes(tmp_path):
    model_dir = tmp_path / "run"
    shutil.copytree(os.path.join(HERE, "data", "legacy_run"), model_dir)
    model, exp, step = rundir.load_model(str(model_dir))
    assert step == PINS[LEGACY]["step"]
    np.testing.assert_allclose(np.asarray(model(_images(), training=False), np.float64),
                               PINS[LEGACY]["logits"], rtol=1e-5, atol=1e-7)
    longer = exp.replace(**{"model_dir": str(model_dir), "train.train_steps": step + 2})
    lines = []
    try:
        trainer = training.Trainer(longer, log=lines.append)
        result = trainer.train()
    finally:
        tf_config.disable_op_determinism()
    assert any(f"(step {step})" in line and "Restored" in line for line in lines)
    assert result["status"] == "completed" and result["step"] == step + 2
