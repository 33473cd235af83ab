"""Named experiment presets: ``run/train.py --experiment=NAME``.

A preset is a function returning a fresh :class:`~sat_tf.config.Experiment`; flags override
its fields afterwards. This module imports no TensorFlow, so listing and validating presets
is instant.
"""
from __future__ import annotations

from typing import Callable

from sat_tf import recipes
from sat_tf.config import (AttackConfig, DataConfig, EvalConfig, Experiment, ModelConfig,
                           TrainConfig)

_REGISTRY: dict[str, Callable[[], Experiment]] = {}


def register(name: str):
    """Decorator: registers ``fn() -> Experiment`` under ``name``."""

    def wrap(fn: Callable[[], Experiment]):
        if name in _REGISTRY:
            raise ValueError(f"Experiment {name!r} is registered twice.")
        _REGISTRY[name] = fn
        return fn

    return wrap


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> Experiment:
    """A fresh copy of preset ``name`` (a one-line ValueError lists the valid names)."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown experiment {name!r}; valid experiments: {', '.join(names())}.")
    exp = _REGISTRY[name]()
    exp.name = name
    return exp


# ---------------------------------------------------------------------------------------------
# Smoke runs.

@register("synthetic-smoke")
def _synthetic_smoke() -> Experiment:
    return Experiment(
        description="A few steps of SAT on synthetic 32x32 data (smoke test of the whole stack).",
        model=ModelConfig(name="resnet-18", activation="silu"),
        data=DataConfig(dataset="synthetic"),
        train_attack=AttackConfig(epsilon=8.0, step_size=8.0, num_steps=1),
        eval_attack=AttackConfig(epsilon=8.0, step_size=2.0, num_steps=10, clean_start_prob=0.0),
        train=recipes.cifar(global_batch_size=32, train_steps=20, steps_per_loop=5),
        evaluation=EvalConfig(attack_steps=(10,), attack_epsilons=(8.0,), attack_step_size=2.0,
                              global_batch_size=64),
    )
