"""sat-tf: Smooth Adversarial Training (Xie et al., 2020) for TensorFlow 2 / Keras 3.

Submodules load on first use (``sat_tf.models``, ``sat_tf.attacks``, ...), so that
``sat_tf.config`` and ``sat_tf.names`` can validate input without importing TensorFlow.
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "activations", "attacks", "cli", "config", "data", "distribute", "efficientnet", "ema",
    "errors", "evaluation", "experiments", "export", "families", "install", "loading", "memory",
    "model_weights", "models", "names", "optimizers", "plots", "recipes", "reports", "resnet",
    "robustness", "rundir", "schedules", "step", "summaries", "training",
)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"sat_tf.{name}")
    raise AttributeError(f"module 'sat_tf' has no attribute {name!r}")
