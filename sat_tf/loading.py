"""Where a model to evaluate, export or plot comes from: a training run or a SavedModel.

:func:`resolve` checks the location and reads its description (``experiment.json`` of a run,
the metadata asset of an export) without TensorFlow, so command-line programs fail fast on bad
input; :func:`load` then loads the model (TensorFlow), as a Keras model from a checkpoint or as
a pure-TensorFlow callable from a SavedModel (no sat_tf model code involved), and returns it
with what it is (:class:`LoadedModel`).

The layout of an export folder is known here too, without TensorFlow: :func:`is_export` and
:func:`check_export_dir` (whether an export may be written to a folder), which
``sat_tf.export`` applies with TensorFlow's file system and ``run/export.py`` before
TensorFlow is imported.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
from typing import Any

from sat_tf.config import Experiment
from sat_tf.errors import UserError

EXPERIMENT_FILE = "experiment.json"          # sat_tf.rundir writes it into model_dir
EXPORT_METADATA = "assets/sat_tf_export.json"  # sat_tf.export writes it into the SavedModel
SAVED_MODEL_FILE = "saved_model.pb"

# The local file system with the names of tf.io.gfile's functions.
LOCAL_FILES = types.SimpleNamespace(exists=os.path.exists, isdir=os.path.isdir,
                                    listdir=os.listdir)


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved model location and what it says about itself."""
    kind: str                          # "checkpoint" or "saved_model"
    path: str                          # model_dir or SavedModel folder
    experiment: Experiment | None      # the run's experiment (None: remote, read by load)
    checkpoint: str | None = None      # a given checkpoint (None: the latest)
    use_ema: bool = True
    metadata: dict | None = None       # a SavedModel's export metadata


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model loaded by :func:`load`, and what reports, exports and plots say about it."""
    model: Any                         # float32 pixels [batch, size, size, 3] -> logits
    experiment: Experiment | None      # the run's (an export's record of it; None if absent)
    name: str                          # model name, e.g. "resnet-50"
    activation: str
    image_size: int
    num_classes: int | None
    step: int | None                   # the training step of the weights
    weights: str | None                # "ema" or "raw"
    checkpoint: str | None             # the checkpoint the weights come from
    experiment_name: str | None
    kind: str                          # the source's kind: "checkpoint" or "saved_model"
    path: str                          # the source's model_dir or SavedModel folder

    def describe(self) -> dict:
        """The facts as JSON (an evaluation report's ``model`` section)."""
        return {"name": self.name, "activation": self.activation, "step": self.step,
                "weights": self.weights, "checkpoint": self.checkpoint,
                "experiment_name": self.experiment_name, "image_size": self.image_size,
                "num_classes": self.num_classes, "source": self.kind, "path": self.path}


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

    Raises a one-line :class:`UserError` otherwise. Remote (gs://) locations are checked by
    :func:`load`.
    """
    if bool(model_dir) == bool(saved_model):
        raise UserError("Give exactly one of --model_dir (a training run) or --saved_model "
                        "(an export).")
    if saved_model:
        if checkpoint:
            raise UserError("--checkpoint applies to --model_dir, not to --saved_model.")
        if not _is_remote(saved_model) and not os.path.isfile(
                os.path.join(saved_model, SAVED_MODEL_FILE)):
            raise UserError(f"No SavedModel in {saved_model!r} ({SAVED_MODEL_FILE} not found).")
        meta = _read_json(os.path.join(saved_model, EXPORT_METADATA))
        if meta is None and not _is_remote(saved_model):
            raise UserError(f"{saved_model!r} is not a sat_tf export ({EXPORT_METADATA} not "
                            "found).")
        exp = _experiment(meta.get("experiment")) if meta else None
        return Source("saved_model", saved_model, exp, metadata=meta)
    if not _is_remote(model_dir) and not os.path.isdir(model_dir):
        raise UserError(f"model_dir {model_dir!r} does not exist.")
    d = _read_json(os.path.join(model_dir, EXPERIMENT_FILE))
    if d is None and not _is_remote(model_dir):
        raise UserError(f"{model_dir!r} holds no {EXPERIMENT_FILE}; is it a training model_dir?")
    if checkpoint and not _is_remote(checkpoint) and not (
            os.path.exists(checkpoint + ".index") or os.path.exists(checkpoint)):
        raise UserError(f"Checkpoint {checkpoint!r} not found (expected {checkpoint}.index).")
    return Source("checkpoint", model_dir, _experiment(d) if d else None,
                  checkpoint=checkpoint, use_ema=use_ema)


def _experiment(d: dict | None) -> Experiment | None:
    return Experiment.from_dict(d) if d else None


def load(source: Source) -> LoadedModel:
    """Loads the model of ``source`` (TensorFlow from here on).

    The model is a Keras model (checkpoint: the EMA weights when ``source.use_ema`` and the
    run kept them) or an :class:`sat_tf.export.ServingModel` (SavedModel). The experiment is
    the source's, or, for a remote location, the one read now.
    """
    if source.kind == "saved_model":
        from sat_tf import export
        model = export.load(source.path)
        meta = model.metadata
        experiment = source.experiment
        if experiment is None and meta.get("experiment"):
            experiment = Experiment.from_dict(meta["experiment"])
        return LoadedModel(
            model=model, experiment=experiment, name=meta.get("model"),
            activation=meta.get("activation"), image_size=model.image_size,
            num_classes=model.num_classes, step=meta.get("step"), weights=meta.get("weights"),
            checkpoint=meta.get("checkpoint"), experiment_name=meta.get("experiment_name"),
            kind=source.kind, path=source.path)

    from sat_tf import rundir
    model, exp, step, checkpoint = rundir.load_run(
        source.path, checkpoint=source.checkpoint, use_ema=source.use_ema)
    num_classes, image_size = rundir.model_shape(exp)
    return LoadedModel(
        model=model, experiment=exp, name=exp.model.name, activation=exp.model.activation,
        image_size=image_size, num_classes=num_classes, step=step,
        weights="ema" if (source.use_ema and exp.train.ema_decay) else "raw",
        checkpoint=checkpoint, experiment_name=exp.name, kind=source.kind, path=source.path)


# ---------------------------------------------------------------------------------------------
# Export folders

def is_export(path: str, files=LOCAL_FILES) -> bool:
    """Whether ``path`` holds a sat_tf export (the SavedModel and its metadata asset).

    ``files``: the file system, as ``tf.io.gfile`` (``exists``, ``isdir``, ``listdir``);
    default the local one.
    """
    return (files.exists(os.path.join(path, SAVED_MODEL_FILE))
            and files.exists(os.path.join(path, EXPORT_METADATA)))


def check_export_dir(export_dir: str, overwrite: bool = False, files=None) -> bool:
    """Raises a one-line :class:`UserError` unless ``export_dir`` is absent, an empty folder,
    or (with ``overwrite``) a previous sat_tf export; returns whether a previous export will be
    replaced. Anything else is never replaced: a mistyped path must not delete a training run.

    ``files``: the file system, as in :func:`is_export`. Without it (no TensorFlow) a local
    folder is checked and a remote one is left to ``sat_tf.export`` (returns False).
    """
    if files is None:
        if _is_remote(export_dir):
            return False
        files = LOCAL_FILES
    if not files.exists(export_dir):
        return False
    if not files.isdir(export_dir):
        raise UserError(f"Export folder {export_dir!r} is a file; choose a new folder.")
    if not files.listdir(export_dir):
        return False
    if not overwrite:
        raise UserError(f"Export folder {export_dir!r} exists and is not empty; choose a new "
                        "one, or overwrite it if it is a previous export (--overwrite).")
    if not is_export(export_dir, files):
        raise UserError(f"Export folder {export_dir!r} is not empty and holds no sat_tf export "
                        f"({SAVED_MODEL_FILE} and {EXPORT_METADATA}); only a previous export "
                        "is overwritten.")
    return True
