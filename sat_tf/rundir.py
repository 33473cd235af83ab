"""The run directory (``model_dir``) of a training run, and what keeps it safe.

A run directory holds ``experiment.json`` (the run's configuration), checkpoints
``ckpt-<step>`` with TensorFlow's ``checkpoint`` state file, summaries, ``final_eval.json``
(the evaluation at the last step) and, while a trainer runs, ``.lock``. This module guards it:

* :class:`RunLock`: one trainer at a time. Two trainers in one directory overwrite each
  other's checkpoints; the second is refused in one line naming the holder. A crashed
  trainer leaves no stale lock: locally the lock is an ``flock`` the kernel drops with the
  process; on a bucket (no locks there) it is a file whose holder refreshes it, and a file
  not refreshed for :data:`REMOTE_LOCK_STALE_SECONDS` counts as abandoned.
* :func:`check_resumable`: a directory is resumed only by the same run. Fields that may change
  on resume (length, cadence, hardware, evaluation) are listed in :data:`MAY_CHANGE`; any
  other difference is refused, naming the fields.
* :func:`find_checkpoints` / :func:`restore_newest_readable`: the newest checkpoint that can be
  read, even when the ``checkpoint`` state file is unparsable or the newest checkpoint is
  truncated (each skipped one is named), and a state file repaired to match.
* :func:`resolve_experiment` / :func:`model_shape` / :func:`build_model`: the facts a run
  records about its model and data, and the model they describe.
* :func:`load_run` / :func:`load_model`: a trained model back from its directory.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import time
from typing import Callable

import keras
import tensorflow as tf

from sat_tf import data as data_lib
from sat_tf.config import Experiment
from sat_tf.ema import ExponentialMovingAverage
from sat_tf.errors import UserError, mismatch

EXPERIMENT_FILE = "experiment.json"
CHECKPOINT_PREFIX = "ckpt"
FINAL_EVAL_FILE = "final_eval.json"
LOCK_FILE = ".lock"
REMOTE_LOCK_STALE_SECONDS = 15 * 60

# Dotted config paths (or prefixes ending in ".") that may differ when a run is resumed.
MAY_CHANGE = (
    "name", "description", "paper", "model_dir", "runtime.", "eval_attack.", "evaluation.",
    "loop.", "train.train_steps", "train.train_epochs", "train.init_from",
    "data.data_dir", "data.manual_dir", "data.num_parallel_reads", "data.skip_corrupt",
    "data.cache_eval", "data.shuffle_buffer",
)

# Facts a run records since they were looked up once (:func:`resolve_experiment`):
# a run directory written before they were recorded holds None there, which matches any value.
RECORDED_LATER = (
    "model.num_classes", "model.image_size", "data.num_classes", "data.num_train_examples",
    "data.num_eval_examples", "data.label_base", "data.preprocessing",
)


class RunDirError(UserError):
    """The run directory cannot be used as asked (busy, another run, unreadable)."""


# ---------------------------------------------------------------------------------------------
# experiment.json

def read_experiment(model_dir: str) -> Experiment | None:
    path = os.path.join(model_dir, EXPERIMENT_FILE)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return Experiment.from_dict(json.load(f))


def _write_json(path: str, value) -> None:
    """Writes ``value`` as JSON to ``path`` atomically (a temporary file renamed over it)."""
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(json.dumps(value, indent=2, sort_keys=True) + "\n")
    tf.io.gfile.rename(tmp, path, overwrite=True)


def write_experiment(model_dir: str, exp: Experiment) -> None:
    _write_json(os.path.join(model_dir, EXPERIMENT_FILE), exp.to_dict())


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "paper":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _may_change(path: str) -> bool:
    return any(path == p or (p.endswith(".") and path.startswith(p)) for p in MAY_CHANGE)


def differences(stored: Experiment, given: Experiment) -> list[str]:
    """``path (stored X, given Y)`` for every field that differs and may not change."""
    a, b = _flatten(stored.to_dict()), _flatten(given.to_dict())
    out = []
    for path in sorted(set(a) | set(b)):
        x, y = a.get(path), b.get(path)
        if isinstance(x, list):
            x = tuple(x)
        if isinstance(y, list):
            y = tuple(y)
        if x is None and path in RECORDED_LATER:
            continue
        if x != y and not _may_change(path):
            out.append(f"{path} (stored {x!r}, given {y!r})")
    return out


def check_resumable(model_dir: str, given: Experiment) -> None:
    """Raises :class:`RunDirError` when ``model_dir`` holds another run than ``given``."""
    stored = read_experiment(model_dir)
    if stored is None:
        return
    diff = differences(stored, given)
    if diff:
        raise RunDirError(
            f"model_dir {model_dir!r} holds another run: it differs in {'; '.join(diff)}. "
            "Resume it with its own settings (see its experiment.json) or use a new model_dir.")


# ---------------------------------------------------------------------------------------------
# The final evaluation

def write_final_eval(model_dir: str, step: int, result: dict) -> None:
    _write_json(os.path.join(model_dir, FINAL_EVAL_FILE), {"step": step, "eval": result})


def read_final_eval(model_dir: str, step: int) -> dict | None:
    """The evaluation recorded at ``step`` (the last), or None."""
    path = os.path.join(model_dir, FINAL_EVAL_FILE)
    try:
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path) as f:
            record = json.load(f)
    except (ValueError, OSError, tf.errors.OpError):
        return None
    return record.get("eval") if record.get("step") == step else None


def final_eval_done(model_dir: str, step: int) -> bool:
    """Whether the evaluation at ``step`` (the last) finished and was recorded."""
    path = os.path.join(model_dir, FINAL_EVAL_FILE)
    if not tf.io.gfile.exists(path):
        return False
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.load(f).get("step") == step
    except (ValueError, OSError):
        return False


# ---------------------------------------------------------------------------------------------
# One trainer per run directory

class RunLock:
    """Held by the trainer of ``model_dir`` while it trains (a context manager)."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.path = os.path.join(model_dir, LOCK_FILE)
        self.remote = "://" in model_dir
        self._file = None
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}"

    def __enter__(self) -> "RunLock":
        if self.remote:
            self._acquire_remote()
        else:
            self._acquire_local()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _busy(self, holder: str) -> RunDirError:
        return RunDirError(
            f"model_dir {self.model_dir!r} is in use by another trainer ({holder.strip()}); "
            "wait for it to finish or stop it, or use another model_dir.")

    def _acquire_local(self) -> None:
        import fcntl
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read() or "unknown holder"
            f.close()
            raise self._busy(holder) from None
        f.seek(0)
        f.truncate()
        f.write(f"{self.holder}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f

    def _acquire_remote(self) -> None:
        if tf.io.gfile.exists(self.path):
            with tf.io.gfile.GFile(self.path) as f:
                text = f.read()
            match = re.search(r"refreshed (\d+)", text)
            age = time.time() - int(match.group(1)) if match else float("inf")
            if age < REMOTE_LOCK_STALE_SECONDS and not text.startswith(self.holder + ","):
                raise self._busy(text.split(", refreshed")[0])
        self.refresh()

    def refresh(self) -> None:
        """Keeps a bucket lock fresh (the trainer calls it between loops); no-op locally."""
        if self.remote:
            with tf.io.gfile.GFile(self.path, "w") as f:
                f.write(f"{self.holder}, refreshed {int(time.time())}\n")

    def release(self) -> None:
        if self._file is not None:
            import fcntl
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        elif self.remote and tf.io.gfile.exists(self.path):
            tf.io.gfile.remove(self.path)


# ---------------------------------------------------------------------------------------------
# Checkpoints

@dataclasses.dataclass
class Restored:
    path: str | None            # the checkpoint restored (None: none could be)
    skipped: list[str]          # newer checkpoints that could not be read, with the reason


def find_checkpoints(model_dir: str, prefix: str = "ckpt") -> list[str]:
    """Every ``<prefix>-<step>`` in ``model_dir`` that has an index file, newest first, found
    by listing the folder (the ``checkpoint`` state file may be damaged)."""
    found = []
    for index in tf.io.gfile.glob(os.path.join(model_dir, f"{prefix}-*.index")):
        m = re.fullmatch(rf"{re.escape(prefix)}-(\d+)\.index", os.path.basename(index))
        if m:
            found.append((int(m.group(1)), index[:-len(".index")]))
    return [path for _, path in sorted(found, reverse=True)]


# What reading a damaged checkpoint raises: a truncated data file IndexError ("Read less
# bytes than requested"), a damaged index DataLossError (an OpError). A checkpoint of another
# model raises AssertionError or ValueError (shape mismatch): never skipped.
UNREADABLE = (tf.errors.OpError, IndexError, EOFError)


def restore_newest_readable(checkpoint: tf.train.Checkpoint, model_dir: str, *,
                            prefix: str = "ckpt", log: Callable[[str], None] = print,
                            repair: bool = True, partial: bool = False) -> Restored:
    """Restores the newest checkpoint of ``model_dir`` that can be read into ``checkpoint``.

    A checkpoint whose files are truncated or corrupt is skipped with a log line naming it,
    and the next older one tried. With ``repair`` (the chief), a ``checkpoint`` state file
    that is unparsable, or that names a skipped checkpoint, is rewritten to list the readable
    ones, so that rotation and later restores see them. A checkpoint of another model (objects
    that do not match) is not skipped: that raises. ``partial``: ``checkpoint`` holds only
    some of the saved objects (e.g. the model without its optimizer).
    """
    candidates = find_checkpoints(model_dir, prefix)
    skipped = []
    for path in candidates:
        try:
            status = checkpoint.restore(path)
            if partial:
                status.expect_partial()
            status.assert_existing_objects_matched()
        except AssertionError:
            raise
        except UNREADABLE as e:
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            skipped.append(f"{os.path.basename(path)} ({reason})")
            log(f"Skipped unreadable checkpoint {path}: {reason}")
            continue
        if repair:
            _repair_state(model_dir, path, [c for c in candidates if _step(c) <= _step(path)])
        return Restored(path, skipped)
    return Restored(None, skipped)


def _step(path: str) -> int:
    return int(path.rsplit("-", 1)[1])


def _repair_state(model_dir: str, latest: str, readable_and_older: list[str]) -> None:
    state = tf.train.get_checkpoint_state(model_dir)
    if state is not None and state.model_checkpoint_path in (latest, os.path.basename(latest)):
        return
    tf.compat.v1.train.update_checkpoint_state(
        model_dir, latest, all_model_checkpoint_paths=list(reversed(readable_and_older)))


# ---------------------------------------------------------------------------------------------
# The model of a run

def model_shape(exp: Experiment) -> tuple[int, int]:
    """(num_classes, image_size) the experiment's model is built with: the model section's
    values, else the dataset's class count and natural image size, else the model's default
    image size."""
    info = data_lib.info(exp.data)
    num_classes = exp.model.num_classes or info.num_classes
    if num_classes is None:
        raise UserError(f"The class count of dataset {exp.data.dataset!r} in "
                        f"{exp.data.data_dir!r} is unknown (no conversion.json from "
                        "run/make_tfrecords.py beside the shards); give --num_classes.")
    if info.num_classes is not None and num_classes < info.num_classes:
        where = f" ({info.metadata})" if info.metadata else ""
        raise UserError(f"num_classes {num_classes} is smaller than the {info.num_classes} "
                        f"classes of dataset {exp.data.dataset!r}{where}.")
    image_size = exp.model.image_size or info.image_size
    if image_size is None:
        from sat_tf import models
        image_size = models.default_image_size(exp.model.name)
    return num_classes, image_size


def resolve_experiment(exp: Experiment) -> Experiment:
    """A copy of ``exp`` with the facts otherwise looked up at every start filled in: the
    model's class count and image size, the data's class count, split sizes, label base and
    preprocessing (from the folder's conversion.json or the dataset's known values). A run
    records them in experiment.json, so loading it later needs no data folder and a resumed
    run is checked against what it trained with."""
    num_classes, image_size = model_shape(exp)
    facts = data_lib.info(exp.data)
    return exp.replace(**{
        "model.num_classes": num_classes, "model.image_size": image_size,
        "data.num_classes": facts.num_classes,
        "data.num_train_examples": facts.num_train_examples,
        "data.num_eval_examples": facts.num_eval_examples,
        "data.label_base": facts.label_base, "data.preprocessing": facts.preprocessing})


def build_model(exp: Experiment, model_fn: Callable | None = None) -> keras.Model:
    """``model_fn(num_classes=, image_size=)`` if given, else the model ``exp.model`` names."""
    num_classes, image_size = model_shape(exp)
    if model_fn is not None:
        return model_fn(num_classes=num_classes, image_size=image_size)
    from sat_tf import models
    return models.build_model_from_config(exp.model, num_classes=num_classes,
                                          image_size=image_size)


# ---------------------------------------------------------------------------------------------
# Loading a trained model

def load_model(model_dir: str, *, checkpoint: str | None = None, use_ema: bool = True,
               model_fn: Callable | None = None) -> tuple[keras.Model, Experiment, int]:
    """Rebuilds the model of a training run and restores its weights.

    Args:
      model_dir: the run's directory (``experiment.json`` and checkpoints).
      checkpoint: a checkpoint path (default: the latest in ``model_dir``).
      use_ema: put the EMA weights in the model when the run kept them.
      model_fn: as in :class:`sat_tf.training.Trainer`, when the run used a custom model.

    Returns:
      (model, experiment, step).
    """
    model, exp, step, _ = load_run(model_dir, checkpoint=checkpoint, use_ema=use_ema,
                                   model_fn=model_fn)
    return model, exp, step


def load_run(model_dir: str, *, checkpoint: str | None = None, use_ema: bool = True,
             model_fn: Callable | None = None, log: Callable[[str], None] = print
             ) -> tuple[keras.Model, Experiment, int, str]:
    """:func:`load_model`, also returning the checkpoint restored. Without ``checkpoint``, the
    newest readable one (damaged newer ones are skipped, each named through ``log``)."""
    exp = read_experiment(model_dir)
    if exp is None:
        raise UserError(f"{model_dir!r} holds no {EXPERIMENT_FILE}; is it a training model_dir?")
    model = build_model(exp, model_fn)
    step = tf.Variable(0, dtype=tf.int64, trainable=False)
    objects = dict(model=model, step=step)
    ema = None
    if use_ema and exp.train.ema_decay:
        ema = objects["ema"] = ExponentialMovingAverage(model, exp.train.ema_decay)
    ckpt = tf.train.Checkpoint(**objects)
    if checkpoint:
        try:
            ckpt.restore(checkpoint).expect_partial().assert_existing_objects_matched()
        except UNREADABLE as e:
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise RunDirError(f"Checkpoint {checkpoint!r} cannot be read ({reason}).") from None
        path = checkpoint
    else:
        restored = restore_newest_readable(ckpt, model_dir, prefix=CHECKPOINT_PREFIX, log=log,
                                           repair=False, partial=True)
        if restored.path is None:
            detail = f" that can be read ({'; '.join(restored.skipped)})" if (
                restored.skipped) else ""
            raise UserError(f"{model_dir!r} holds no checkpoint{detail}.")
        path = restored.path
    if ema is not None:
        ema.copy_to_model()
    return model, exp, int(step.numpy()), path


# ---------------------------------------------------------------------------------------------
# Starting from another run's weights

CLASSIFIER_LAYER = "logits"     # sat_tf.models names the classifier so


def warm_start(model: keras.Model, init_from: str, *,
               log: Callable[[str], None] = print) -> dict:
    """Puts the weights of run directory ``init_from`` (its newest readable checkpoint, EMA
    weights when it kept them; an imported release is one) into ``model``, weight by weight.

    Every weight of ``model`` must be found in the source's model under the same name with the
    same shape, and every weight there must be used, except the classifier: when the class
    counts differ it keeps its fresh initialisation (fine-tuning on another dataset). Anything
    else is one line naming the first weights that differ, before any weight is set.
    """
    if read_experiment(init_from) is None:
        raise RunDirError(f"init_from {init_from!r} holds no {EXPERIMENT_FILE}; give a run "
                          "directory (a training run or run/import_checkpoint.py's).")
    source, src_exp, step, path = load_run(init_from, use_ema=True, log=log)
    theirs = {w.path: w for w in source.weights}
    pairs, missing, differ, kept = [], [], [], []
    for w in model.weights:
        layer = w.path.split("/")[0]
        other = theirs.pop(w.path, None)
        if other is None:
            missing.append(w.path)
        elif tuple(other.shape) != tuple(w.shape):
            if layer == CLASSIFIER_LAYER:
                kept.append(w.path)
            else:
                differ.append(f"{w.path} {list(other.shape)} there, {list(w.shape)} here")
        else:
            pairs.append((w, other))
    unused = list(theirs)      # the source's weights no weight here asked for
    problems = mismatch(("weights not there", missing, 3), ("of another shape", differ, 2),
                        ("of its weights unused", unused, 3))
    if problems:
        raise RunDirError(
            f"init_from {init_from!r} ({src_exp.model.name}, {src_exp.model.activation}) does "
            f"not fit this run's model ({model.name}): {problems}.")
    for w, other in pairs:
        w.assign(other)
    weights = "ema" if src_exp.train.ema_decay else "raw"
    line = (f"Initialised {len(pairs)} weights from {path} (step {step}, {weights} weights of "
            f"{src_exp.model.name})")
    if kept:
        line += "; the classifier keeps its fresh initialisation (another class count)"
    log(line + ".")
    return {"checkpoint": path, "step": step, "weights": len(pairs),
            "classifier_reinitialised": bool(kept)}
