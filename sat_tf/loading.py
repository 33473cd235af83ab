"""Where a model to evaluate, export or plot comes from: a training run or a SavedModel.

:func:`resolve` checks the location and reads its description (``experiment.json`` of a run,
the metadata asset of an export) without TensorFlow, so command-line programs fail fast on bad
input; :func:`load` then loads the model (TensorFlow), as a Keras model from a checkpoint or as
a pure-TensorFlow callable from a SavedModel (no sat_tf model code involved).
"""
from __future__ import annotations

import dataclasses
import json
import os

from sat_tf.config import Experiment

EXPERIMENT_FILE = "experiment.json"          # sat_tf.rundir writes it into model_dir
EXPORT_METADATA = "assets/sat_tf_export.json"  # sat_tf.export writes it into the SavedModel


@dataclasses.dataclass
class Source:
    """A resolved model location and what it says about itself."""
    kind: str                          # "checkpoint" or "saved_model"
    path: str                          # model_dir or SavedModel folder
    experiment: Experiment | None      # the run's experiment (exports record it too)
    checkpoint: str | None = None      # a given checkpoint (None: the latest)
    use_ema: bool = True
    metadata: dict | None = None       # a SavedModel's export metadata


def _is_remote(path: str) -> bool:
    return "://" in path


def _read_json(path: str) -> dict | None:
    if _is_remote(path):
        return None   # read after TensorFlow is up (gfile)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def resolve(*, model_dir: str | None = None, saved_model: str | None = None,
            checkpoint: str | None = None, use_ema: bool = True) -> Source:
    """Checks that exactly one location is given and exists; reads its description.

    Raises a one-line ValueError otherwise. Remote (gs://) locations are checked by
    :func:`load`.
    """
    if bool(model_dir) == bool(saved_model):
        raise ValueError("Give exactly one of --model_dir (a training run) or --saved_model "
                         "(an export).")
    if saved_model:
        if checkpoint:
            raise ValueError("--checkpoint applies to --model_dir, not to --saved_model.")
        if not _is_remote(saved_model) and not os.path.isfile(
                os.path.join(saved_model, "saved_model.pb")):
            raise ValueError(f"No SavedModel in {saved_model!r} (saved_model.pb not found).")
        meta = _read_json(os.path.join(saved_model, EXPORT_METADATA))
        if meta is None and not _is_remote(saved_model):
            raise ValueError(f"{saved_model!r} is not a sat_tf export ({EXPORT_METADATA} not "
                             "found).")
        exp = _experiment(meta.get("experiment")) if meta else None
        return Source("saved_model", saved_model, exp, metadata=meta)
    if not _is_remote(model_dir) and not os.path.isdir(model_dir):
        raise ValueError(f"model_dir {model_dir!r} does not exist.")
    d = _read_json(os.path.join(model_dir, EXPERIMENT_FILE))
    if d is None and not _is_remote(model_dir):
        raise ValueError(f"{model_dir!r} holds no {EXPERIMENT_FILE}; is it a training model_dir?")
    if checkpoint and not _is_remote(checkpoint) and not (
            os.path.exists(checkpoint + ".index") or os.path.exists(checkpoint)):
        raise ValueError(f"Checkpoint {checkpoint!r} not found (expected {checkpoint}.index).")
    return Source("checkpoint", model_dir, _experiment(d) if d else None,
                  checkpoint=checkpoint, use_ema=use_ema)


def _experiment(d: dict | None) -> Experiment | None:
    return Experiment.from_dict(d) if d else None


def load(source: Source):
    """Loads the model: returns ``(model, info)``.

    ``model`` maps float32 pixels [batch, size, size, 3] to logits: a Keras model (checkpoint)
    or an :class:`sat_tf.export.ServingModel` (SavedModel). ``info`` has the model's name,
    activation, image size, classes, training step and which weights were loaded ("ema" or
    "raw"), for reports and plots; ``source.experiment`` is filled in for remote locations.
    """
    if source.kind == "saved_model":
        from sat_tf import export
        model = export.load(source.path)
        meta = model.metadata
        if source.experiment is None and meta.get("experiment"):
            source.experiment = Experiment.from_dict(meta["experiment"])
        info = {k: meta.get(k) for k in ("model", "activation", "step", "weights", "checkpoint",
                                         "experiment_name")}
        info = {"name": info.pop("model"), **info, "image_size": model.image_size,
                "num_classes": model.num_classes, "source": "saved_model", "path": source.path}
        return model, info

    from sat_tf import rundir
    model, exp, step, checkpoint = rundir.load_run(
        source.path, checkpoint=source.checkpoint, use_ema=source.use_ema)
    source.experiment = exp
    num_classes, image_size = rundir.model_shape(exp)
    info = {"name": exp.model.name, "activation": exp.model.activation, "step": step,
            "weights": "ema" if (source.use_ema and exp.train.ema_decay) else "raw",
            "checkpoint": checkpoint, "experiment_name": exp.name, "image_size": image_size,
            "num_classes": num_classes, "source": "checkpoint", "path": source.path}
    return model, info
