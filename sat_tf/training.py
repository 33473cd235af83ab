"""The adversarial training engine: the distributed step, the loop, checkpoints, summaries.

One training step (DESIGN.md §3, §5), per replica:

1. attack the batch: ``attacks.pgd`` with ``Experiment.train_attack`` (batch norm in inference
   mode, the attacker's backward rule) — skipped when ``TrainConfig.adversarial`` is False;
2. forward the (adversarial) images with ``training=True`` inside
   ``activations.backward_rule(TrainConfig.optimizer_backward)`` (Table 1's optimizer arm);
3. loss = label-smoothed cross-entropy summed over the replica's examples / global batch
   + ``weight_decay * 0.5 * sum(w^2)`` / replicas, over the weights
   ``TrainConfig.weight_decay_scope`` selects by layer type (:func:`decayed_weights`): the
   conv/dense kernels (the SAT release's ResNet) or every non-batch-norm weight (the TPU
   EfficientNet code, which includes biases and smooth_relu's learnable beta);
4. gradients (summed over replicas by the optimizer) -> optimizer; the batch-norm moving
   statistics are averaged over replicas (Keras 3 lets each replica keep its own copy);
   the exponential moving average (EMA) of the weights is updated.

``steps_per_loop`` steps run inside one ``tf.function`` (a graph loop over ``strategy.run``)
per host round trip, with input from ``strategy.distribute_datasets_from_function``. Between
loops the host logs, writes TensorBoard summaries, checkpoints, evaluates, and checks for a
non-finite loss (which stops training and leaves the last good checkpoint untouched) and
for SIGTERM (which saves a checkpoint and returns).

:func:`load_model` rebuilds a trained model from its ``model_dir`` for evaluation and export.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Callable

import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from sat_tf import activations, attacks, distribute, memory, optimizers, rundir, schedules
from sat_tf import data as data_lib
from sat_tf.config import Experiment

EXPERIMENT_FILE = rundir.EXPERIMENT_FILE
CHECKPOINT_PREFIX = "ckpt"
_METRICS = ("loss", "correct", "examples", "clean_correct", "clean_examples", "nonfinite")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or Inf."""


# ---------------------------------------------------------------------------------------------
# Model pieces, selected by layer type.

def _layers(model: keras.Model) -> list:
    return model._flatten_layers(include_self=False, recursive=True)


_KERNEL_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                  keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D, keras.layers.Dense)


def decayed_weights(model: keras.Model, scope: str = "non_bn") -> list:
    """The weights weight decay applies to, selected by layer type.

    ``scope="kernels"``: the kernels of convolution and dense layers (the SAT release's
    ResNet decays tensorpack's ``.*/W``: no biases, no batch norm, no SmoothReLU beta);
    ``"non_bn"``: every trainable weight of a layer that is not batch normalization (the TPU
    EfficientNet code).
    """
    if scope == "kernels":
        kernels = {id(w) for layer in _layers(model) if isinstance(layer, _KERNEL_LAYERS)
                   for w in (getattr(layer, name, None) for name in
                             ("kernel", "depthwise_kernel", "pointwise_kernel"))
                   if w is not None}
        return [w for w in model.trainable_weights if id(w) in kernels]
    if scope != "non_bn":
        raise ValueError(f"Invalid weight_decay_scope {scope!r}; valid choices: kernels, non_bn.")
    bn = {id(w) for layer in _layers(model)
          if isinstance(layer, keras.layers.BatchNormalization) for w in layer.weights}
    return [w for w in model.trainable_weights if id(w) not in bn]


def batch_norm_statistics(model: keras.Model) -> list:
    """The moving mean / variance (non-trainable weights) of every batch-norm layer."""
    return [w for layer in _layers(model) if isinstance(layer, keras.layers.BatchNormalization)
            for w in layer.non_trainable_weights]


def _on_own_device(variable) -> tf.Tensor:
    """This replica's value of ``variable``, placed on the variable's device.

    A cross-replica all-reduce sends each value to the device it is on. Under
    MultiWorkerMirroredStrategy with one device per worker the replica function runs without
    a device scope, so a plain read has no device and the all-reduce fails ("destinations can
    not be empty").
    """
    value = variable.value if isinstance(variable, keras.Variable) else variable
    with tf.device(value.device):
        return tf.identity(value)


_REPLICA_SEED_STRIDE = 0x9E3779B97F4A7C15 >> 1    # an odd constant: replica r shifts by r x it


@contextlib.contextmanager
def replica_random_streams(rng_states, replica_id):
    """Gives each replica its own dropout / stochastic-depth masks inside the context.

    Keras layers draw their masks from ``SeedGenerator`` states ``[seed, counter]``, variables
    that a strategy mirrors, so every replica would draw the same masks for its own examples.
    Inside the context (in replica context, in a traced function) replica r's seeds are
    shifted by ``r * stride``; on exit the shift is taken back, so the states stay identical
    across replicas and in checkpoints, and the counters advance as without the context.
    Replica 0 draws exactly what a single replica draws.
    """
    shifted = []
    for state in rng_states:
        value = state.value if isinstance(state, keras.Variable) else state
        shift = tf.stack([tf.cast(replica_id, value.dtype) * _REPLICA_SEED_STRIDE,
                          tf.zeros([], value.dtype)])
        state.assign(value + shift)
        shifted.append((state, shift))
    try:
        yield
    finally:
        for state, shift in shifted:
            value = state.value if isinstance(state, keras.Variable) else state
            state.assign(value - shift)


def l2_loss(weights) -> tf.Tensor:
    """0.5 * sum of squares (``tf.nn.l2_loss``), summed over ``weights``, in float32."""
    return tf.add_n([tf.nn.l2_loss(tf.cast(w, tf.float32)) for w in weights]) if weights else (
        tf.constant(0.0))


# ---------------------------------------------------------------------------------------------
# Exponential moving average of the weights.

class ExponentialMovingAverage(tf.Module):
    """Averages of a model's trainable weights and batch-norm moving statistics.

    As ``tf.train.ExponentialMovingAverage(decay, num_updates=global_step)`` in the TPU code,
    applied after the step increment: update number t (0-based) uses ``num_updates = t + 1``
    and the decay ``min(decay, (1 + num_updates) / (10 + num_updates))``. The averages are
    checkpointed with the run; :meth:`swapped` / :meth:`copy_to_model` put them in the model
    for evaluation and export.

    Under a distribution strategy each replica keeps and updates its own copy of the averages
    (``ON_READ`` variables; a checkpoint or a cross-replica read takes the first replica's), so
    an update moves no data between replicas: the weights and batch-norm statistics it
    averages are already the same on every replica.
    """

    def __init__(self, model: keras.Model, decay: float):
        super().__init__(name="ema")
        self.decay = float(decay)
        targets = list(model.trainable_weights) + batch_norm_statistics(model)
        self._targets = _Untracked(targets)
        self.averages = [
            tf.Variable(tf.convert_to_tensor(v), trainable=False, name=f"ema_{i}",
                        synchronization=tf.VariableSynchronization.ON_READ,
                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            for i, v in enumerate(targets)]

    def update(self, step) -> None:
        """Update number ``step`` (0-based: the global step before its increment), in replica
        or cross-replica context."""
        num_updates = tf.cast(step, tf.float32) + 1.0
        decay = tf.minimum(self.decay, (1.0 + num_updates) / (10.0 + num_updates))
        for avg, v in zip(self.averages, self._targets.value):
            avg.assign_sub((1.0 - decay) * (avg - tf.cast(tf.convert_to_tensor(v), avg.dtype)))

    def copy_to_model(self) -> None:
        for avg, v in zip(self.averages, self._targets.value):
            v.assign(avg.read_value())

    @contextlib.contextmanager
    def swapped(self):
        """The averages in the model inside the context, the trained weights after it."""
        backup = [tf.identity(tf.convert_to_tensor(v)) for v in self._targets.value]
        self.copy_to_model()
        try:
            yield
        finally:
            for v, b in zip(self._targets.value, backup):
                v.assign(b)


class _Untracked:
    """Holds objects without making them checkpoint dependencies of their owner."""

    def __init__(self, value):
        self.value = value


# ---------------------------------------------------------------------------------------------
# The model of an experiment.

def model_shape(exp: Experiment) -> tuple[int, int]:
    """(num_classes, image_size) the experiment's model is built with: the model section's
    values, else the dataset's class count and natural image size, else the model's default
    image size."""
    info = data_lib.info(exp.data)
    num_classes = exp.model.num_classes or info.num_classes
    if num_classes is None:
        raise ValueError(f"The class count of dataset {exp.data.dataset!r} in "
                         f"{exp.data.data_dir!r} is unknown (no conversion.json from "
                         "run/make_tfrecords.py beside the shards); give --num_classes.")
    if info.num_classes is not None and num_classes < info.num_classes:
        where = f" ({info.metadata})" if info.metadata else ""
        raise ValueError(f"num_classes {num_classes} is smaller than the {info.num_classes} "
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
# The trainer.

class Trainer:
    """Owns the model, optimizer, EMA, step counter and checkpoints of one experiment.

    Args:
      experiment: the validated run; ``experiment.model_dir`` receives checkpoints,
        summaries and ``experiment.json``.
      strategy: the ``tf.distribute.Strategy`` (default: ``distribute.strategy_from_config``
        of ``experiment.runtime``; when given, ``distribute.configure`` still applies the
        runtime's precision policy and op determinism).
      model_fn: optional ``model_fn(num_classes=, image_size=) -> keras.Model`` replacing
        the model ``experiment.model`` names (tests, custom models).
      log: receives the console lines (progress, checkpoints, evaluation).

    The model's initial weights are a function of ``TrainConfig.seed`` (Keras' global seed is
    set before the model is built). An existing checkpoint in ``model_dir`` is restored.
    """

    def __init__(self, experiment: Experiment, *, strategy: tf.distribute.Strategy | None = None,
                 model_fn: Callable | None = None, log: Callable[[str], None] = print):
        experiment.validate()
        if not experiment.model_dir:
            raise ValueError("The experiment has no model_dir (where checkpoints go).")
        self.experiment = exp = resolve_experiment(experiment)
        self.train_cfg = exp.train
        self.log = log
        if strategy is None:
            strategy = distribute.strategy_from_config(exp.runtime, seed=exp.train.seed)
        else:  # the runtime's process-wide settings (precision policy, determinism) still apply
            distribute.configure(exp.runtime, seed=exp.train.seed)
        self.strategy = strategy
        self.num_replicas = self.strategy.num_replicas_in_sync
        self.global_batch_size = exp.train.global_batch_size
        self.per_replica_batch_size = distribute.per_replica_batch_size(
            self.global_batch_size, self.strategy)
        self.eval_batch_size = exp.train.eval_batch_size or self.global_batch_size
        self.per_replica_eval_batch_size = distribute.per_replica_batch_size(
            self.eval_batch_size, self.strategy, what="eval batch size")
        self.num_classes, self.image_size = model_shape(exp)
        num_examples = exp.train.num_train_examples or exp.data.num_train_examples
        if num_examples is None:
            raise ValueError(f"The training-set size of dataset {exp.data.dataset!r} in "
                             f"{exp.data.data_dir!r} is unknown (no conversion.json from "
                             "run/make_tfrecords.py beside the shards); give "
                             "--num_train_images.")
        self.steps_per_epoch = schedules.steps_per_epoch(exp.train, num_examples)
        self.total_steps = schedules.total_steps(exp.train, num_examples)
        self.model_dir = exp.model_dir
        self._loss_scaling = exp.runtime.precision_policy() == "mixed_float16"
        self._stop_signal = None
        # Set by SIGTERM / request_stop, read by the graph loop before every step; a plain
        # variable of this process (not mirrored), created outside the strategy's scope.
        self._stop_flag = tf.Variable(False, trainable=False, name="stop_requested")

        if model_fn is None:
            self._check_memory()
        keras.utils.set_random_seed(exp.train.seed)
        with self.strategy.scope():
            self.model = build_model(exp, model_fn)
            self.schedule = schedules.Schedule(exp.train, steps_per_epoch=self.steps_per_epoch,
                                               total_steps=self.total_steps)
            self.optimizer = optimizers.build_optimizer(
                exp.train, self.schedule, mixed_precision=exp.runtime.precision_policy())
            self.optimizer.build(self.model.trainable_variables)
            self.ema = (ExponentialMovingAverage(self.model, exp.train.ema_decay)
                        if exp.train.ema_decay else None)
            # Every replica counts its own copy (no cross-replica traffic per step); they agree.
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                                    synchronization=tf.VariableSynchronization.ON_READ,
                                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self._metrics = {
                k: tf.Variable(0.0, trainable=False, name=f"metric_{k}",
                               synchronization=tf.VariableSynchronization.ON_READ,
                               aggregation=tf.VariableAggregation.SUM) for k in _METRICS}
            k = min(exp.train.summary_images, self.per_replica_batch_size)
            self._example_images = tf.Variable(
                tf.zeros([k, self.image_size, 2 * self.image_size, 3]), trainable=False,
                name="example_images", synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self._decayed = decayed_weights(self.model, exp.train.weight_decay_scope)
        self._bn_statistics = batch_norm_statistics(self.model)

        objects = dict(model=self.model, optimizer=self.optimizer, step=self.step)
        if self.ema is not None:
            objects["ema"] = self.ema
        # The states of the model's random generators (dropout, stochastic depth) are
        # variables but not weights, and tf.train.Checkpoint(model=) leaves them out; saving
        # them makes a resumed run draw the same masks.
        weights = {id(w) for w in self.model.weights}
        rng_states = [v for v in self.model.variables if id(v) not in weights]
        self._rng_states = rng_states
        if rng_states:
            objects["rng_states"] = rng_states
        self.checkpoint = tf.train.Checkpoint(**objects)
        # Multi-worker: every worker saves (the save is collective), the chief into model_dir,
        # the others into a scratch folder of their own; all restore from model_dir.
        self.is_chief, self._worker = _chief(self.strategy)
        self.checkpoint_manager = self._checkpoint_manager()
        self._restore()
        self._gradients = tf.function(self._forward_backward,
                                      jit_compile=exp.runtime.jit_compile or None)
        self._summary_writer = None
        self._evaluator = self._eval_data = None
        # Several workers (MultiWorkerMirroredStrategy across hosts) must agree on stopping.
        self._multi_worker = (isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)
                              and self.num_replicas > len(self.strategy.extended.worker_devices))
        self._agreed_stop_fn = tf.function(self._stop_requested)

    # -- memory ------------------------------------------------------------------------------

    def memory_estimate(self):
        """:func:`sat_tf.memory.estimate` of one replica of this run."""
        exp = self.experiment
        slots = {"sgd_nesterov": 1, "sgd": 1, "rmsprop": 2, "adam": 2}[exp.train.optimizer]
        return memory.estimate(
            exp.model.name, image_size=self.image_size, stem=exp.model.stem,
            num_classes=self.num_classes, per_replica_batch=self.per_replica_batch_size,
            attack_steps=exp.train_attack.num_steps, adversarial=exp.train.adversarial,
            precision=exp.runtime.precision_policy(), optimizer_slots=slots,
            ema=exp.train.ema_decay is not None)

    def _check_memory(self) -> None:
        """On a host without accelerators, refuses (one line, before any work) a run whose
        replicas on this host clearly need more memory than it has: the kernel's OOM killer
        would otherwise end it minutes later without a message."""
        if tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
            return
        available = memory.available_bytes()
        if available is None:
            return
        est = self.memory_estimate()
        try:
            local = len(self.strategy.extended.worker_devices)
        except RuntimeError:          # the default strategy: one replica
            local = 1
        what = est.run() + (f" (x{local} replicas sharing this host)" if local > 1 else "")
        memory.check_fits(est, available // local, what=what)

    # -- checkpoints -------------------------------------------------------------------------

    def _restore(self) -> None:
        """Resumes from the newest readable checkpoint of ``model_dir`` (see
        :func:`rundir.restore_newest_readable`), if it holds this run."""
        if not rundir.find_checkpoints(self.model_dir, CHECKPOINT_PREFIX):
            return
        rundir.check_resumable(self.model_dir, self.experiment)
        restored = rundir.restore_newest_readable(
            self.checkpoint, self.model_dir, prefix=CHECKPOINT_PREFIX, log=self.log,
            repair=self.is_chief)
        if restored.path is None:
            raise rundir.RunDirError(
                f"None of the checkpoints in model_dir {self.model_dir!r} can be read "
                f"({'; '.join(restored.skipped)}); move them away to start afresh.")
        if self.is_chief:   # the manager read the state file before it was repaired
            self.checkpoint_manager = self._checkpoint_manager()
        self.log(f"Restored {restored.path} (step {int(self.step.numpy())}).")

    def _checkpoint_manager(self) -> tf.train.CheckpointManager:
        if self.is_chief:
            return tf.train.CheckpointManager(
                self.checkpoint, self.model_dir,
                max_to_keep=self.train_cfg.max_checkpoints_to_keep,
                checkpoint_name=CHECKPOINT_PREFIX)
        return tf.train.CheckpointManager(
            self.checkpoint, os.path.join(self.model_dir, f".worker-{self._worker}"),
            max_to_keep=1, checkpoint_name=CHECKPOINT_PREFIX)

    def save_checkpoint(self) -> str:
        path = self.checkpoint_manager.save(checkpoint_number=int(self.step.numpy()))
        self.log(f"Saved checkpoint {path}.")
        return path

    # -- the step ----------------------------------------------------------------------------

    def attack(self, images, labels, seed):
        """The images the weights train on: ``attacks.pgd`` with ``train_attack`` (batch norm
        in inference mode, the attacker's backward rule), or ``images`` in clean mode."""
        if not self.train_cfg.adversarial:
            return tf.convert_to_tensor(images, tf.float32)
        return attacks.pgd(self.model, images, labels, self.experiment.train_attack, seed=seed)

    def loss_and_gradients(self, inputs, labels):
        """(loss, logits, gradients) of one replica's batch.

        The forward pass runs with ``training=True`` under the optimizer's backward rule; the
        loss is this replica's share of the global loss: label-smoothed cross-entropy summed
        over its examples / global batch + weight decay / replicas. Under ``mixed_float16``
        the gradients are of the scaled loss (the LossScaleOptimizer unscales them).
        """
        labels = tf.cast(labels, tf.int32)
        smoothing = self.train_cfg.label_smoothing
        targets = (tf.one_hot(labels, self.num_classes) * (1.0 - smoothing)
                   + smoothing / self.num_classes)
        with tf.GradientTape() as tape:
            with activations.backward_rule(self.train_cfg.optimizer_backward):
                logits = tf.cast(self.model(inputs, training=True), tf.float32)
            per_example = tf.nn.softmax_cross_entropy_with_logits(targets, logits)
            loss = (tf.reduce_sum(per_example) / self.global_batch_size
                    + self.train_cfg.weight_decay * l2_loss(self._decayed) / self.num_replicas)
            scaled = self.optimizer.scale_loss(loss) if self._loss_scaling else loss
        return loss, logits, tape.gradient(scaled, self.model.trainable_variables)

    def _forward_backward(self, images, labels, seed, measure):
        """Attack, forward, loss and gradients of one replica's batch (may be XLA-compiled)."""
        labels = tf.cast(labels, tf.int32)
        inputs = self.attack(images, labels, seed)
        loss, logits, grads = self.loss_and_gradients(inputs, labels)
        correct = tf.reduce_sum(tf.cast(tf.equal(
            tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))

        k = self._example_images.shape[0]

        def measure_clean():
            clean_logits = tf.cast(self.model(images, training=False), tf.float32)
            clean = tf.reduce_sum(tf.cast(tf.equal(
                tf.argmax(clean_logits, -1, output_type=tf.int32), labels), tf.float32))
            pair = tf.concat([images[:k], inputs[:k]], axis=2)
            return clean, tf.cast(tf.shape(labels)[0], tf.float32), pair

        def skip():
            return (tf.constant(0.0), tf.constant(0.0),
                    tf.zeros([k, self.image_size, 2 * self.image_size, 3]))

        clean, clean_examples, pair = tf.cond(measure, measure_clean, skip)
        return grads, loss, correct, clean, clean_examples, pair

    def _replica_step(self, images, labels, measure):
        ctx = tf.distribute.get_replica_context()
        step = self.step.read_value()
        seed = tf.random.experimental.stateless_fold_in(
            tf.stack([tf.constant(self.train_cfg.seed, tf.int64), step]),
            ctx.replica_id_in_sync_group, alg=attacks.RNG_ALG)
        with replica_random_streams(self._rng_states, ctx.replica_id_in_sync_group):
            grads, loss, correct, clean, clean_examples, pair = self._gradients(
                images, labels, seed, measure)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        if self.num_replicas > 1 and self._bn_statistics:
            means = ctx.all_reduce(tf.distribute.ReduceOp.MEAN,
                                   [_on_own_device(v) for v in self._bn_statistics])
            for v, m in zip(self._bn_statistics, means):
                v.assign(m)
        if self.ema is not None:
            self.ema.update(step)
        self.step.assign_add(1)
        m = self._metrics
        m["loss"].assign_add(loss)
        m["correct"].assign_add(correct)
        m["examples"].assign_add(tf.cast(tf.shape(labels)[0], tf.float32))
        m["clean_correct"].assign_add(clean)
        m["clean_examples"].assign_add(clean_examples)
        m["nonfinite"].assign_add(tf.cast(tf.logical_not(tf.math.is_finite(loss)), tf.float32))

        def keep_pair():
            self._example_images.assign(pair)
            return tf.constant(True)

        tf.cond(measure, keep_pair, lambda: tf.constant(False))

    @tf.function
    def run_steps(self, iterator, num_steps, measure: bool = True):
        """``num_steps`` training steps from a distributed iterator of (images, labels), in one
        host round trip (a graph loop over ``strategy.run``). With ``measure`` the last step
        also measures the clean accuracy (one more forward pass) and keeps a few adversarial
        examples for the summaries."""
        for i in tf.range(num_steps):
            if self._stop_requested():      # SIGTERM: checked before every step
                break
            images, labels = next(iterator)
            last = tf.logical_and(measure, i == num_steps - 1)
            self.strategy.run(self._replica_step, args=(images, labels, last))

    def _stop_requested(self):
        """The stop flag (set by SIGTERM or :meth:`request_stop`); with several workers, True
        on every worker as soon as any of them has it, so all stop at the same step."""
        flag = self._stop_flag.read_value()
        if not self._multi_worker:
            return flag
        votes = self.strategy.run(lambda: tf.cast(flag, tf.int32))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None) > 0

    # -- input -------------------------------------------------------------------------------

    def _train_dataset(self, start_step: int):
        skip = start_step if self.train_cfg.resume_input == "skip" else 0

        def dataset_fn(ctx: tf.distribute.InputContext):
            ds = data_lib.build_dataset(
                self.experiment.data, split="train",
                batch_size=ctx.get_per_replica_batch_size(self.global_batch_size),
                image_size=self.image_size, input_context=ctx)
            if skip:
                ds = ds.skip(skip * ctx.num_replicas_in_sync // ctx.num_input_pipelines)
            return ds

        with data_lib.remembered_listings():
            return self.strategy.distribute_datasets_from_function(dataset_fn)

    def _eval_dataset(self):
        from sat_tf import evaluation

        def build(batch_size, input_context):
            return data_lib.build_dataset(self.experiment.data, split="eval",
                                          batch_size=batch_size, image_size=self.image_size,
                                          input_context=input_context)

        with data_lib.remembered_listings():
            return evaluation.distribute_eval_dataset(self.strategy, build,
                                                      self.eval_batch_size)

    # -- the loop ----------------------------------------------------------------------------

    def request_stop(self, reason: str = "stop requested") -> None:
        """Ends training before the next step, with a checkpoint (what SIGTERM does); safe
        to call from any thread while a loop runs."""
        self._stop_signal = reason
        self._stop_flag.assign(True)

    @contextlib.contextmanager
    def _sigterm_saves(self):
        """SIGTERM stops training before the next step, even inside a graph loop.

        Python runs a signal handler only when the main thread returns to the interpreter,
        which a ``steps_per_loop`` graph loop does not do for minutes. So the signal is also
        written to a wake-up pipe (``signal.set_wakeup_fd``), and a watcher thread sets the stop
        flag that the loop reads before every step.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        previous = signal.signal(signal.SIGTERM,
                                 lambda signum, frame: self.request_stop("SIGTERM"))
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

        def watch():
            while True:
                received = os.read(read_fd, 64)
                if not received:        # the write end was closed: training is over
                    return
                if signal.SIGTERM in received:
                    self._stop_signal = self._stop_signal or "SIGTERM"
                    self._stop_flag.assign(True)
                if previous_fd != -1:   # whoever listened before (an event loop) still hears
                    try:
                        os.write(previous_fd, received)
                    except OSError:
                        pass

        watcher = threading.Thread(target=watch, name="sat_tf-sigterm", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            signal.set_wakeup_fd(previous_fd)
            signal.signal(signal.SIGTERM, previous)
            os.close(write_fd)
            watcher.join(timeout=10)
            os.close(read_fd)

    def _agreed_stop(self) -> bool:
        """Whether any worker asked to stop (a collective with several workers)."""
        return bool(self._agreed_stop_fn())

    def _read_metrics(self) -> dict:
        values = {k: float(v.read_value()) for k, v in self._metrics.items()}
        for v in self._metrics.values():
            v.assign(0.0)
        return values

    def learning_rate(self, step: int | None = None) -> float:
        step = int(self.step.numpy()) if step is None else step
        return float(self.schedule(step))

    def _next_stop(self, step: int, end: int) -> int:
        t = self.train_cfg
        every = [t.steps_per_loop, t.checkpoint_every_steps, t.summary_every_steps]
        if t.eval_every_steps:
            every.append(t.eval_every_steps)
        return min([end] + [(step // e + 1) * e for e in every])

    def _writer(self):
        if self._summary_writer is None:
            self._summary_writer = (
                tf.summary.create_file_writer(os.path.join(self.model_dir, "train"))
                if self.is_chief else tf.summary.create_noop_writer())
        return self._summary_writer

    def train(self, *, until_step: int | None = None) -> dict:
        """Trains to ``total_steps`` (or ``until_step``), resuming from the latest checkpoint.

        Returns a dict: ``status`` ("completed", "stopped" at until_step, or "preempted" by
        SIGTERM / :meth:`request_stop`), ``step``, the last ``train`` metrics, every reported
        one in ``history``, and the last ``eval`` result. Raises :class:`TrainingDiverged` on
        a NaN/Inf loss, before anything is saved.
        """
        tf.io.gfile.makedirs(self.model_dir)
        # One trainer per run directory (the chief's lock; the other workers write elsewhere).
        lock = rundir.RunLock(self.model_dir) if self.is_chief else contextlib.nullcontext()
        with lock:
            return self._train(until_step, lock)

    def _train(self, until_step: int | None, lock) -> dict:
        if self.is_chief:
            rundir.check_resumable(self.model_dir, self.experiment)
            rundir.write_experiment(self.model_dir, self.experiment)
        end = self.total_steps if until_step is None else min(until_step, self.total_steps)
        step = int(self.step.numpy())
        self._stop_signal = None
        self._stop_flag.assign(False)
        t = self.train_cfg
        self.log(f"Training {self.experiment.model.name} ({self.experiment.model.activation}) on "
                 f"{self.experiment.data.dataset}: {self.total_steps} steps of "
                 f"{self.global_batch_size} images over {self.num_replicas} replica(s) "
                 f"({self.steps_per_epoch:.1f} steps per epoch), from step {step}.")
        iterator = iter(self._train_dataset(step))
        result = {"status": "completed", "step": step, "train": None, "eval": None,
                  "history": []}
        busy = 0.0
        first_step = step
        started = time.time()
        last_good = self.checkpoint_manager.latest_checkpoint
        with self._sigterm_saves():
            while step < end:
                planned = self._next_stop(step, end)
                n = planned - step
                t0 = time.time()
                self.run_steps(iterator, tf.constant(n, tf.int32))
                nonfinite = float(self._metrics["nonfinite"].read_value())
                busy += time.time() - t0
                ran = int(self.step.numpy()) - step
                step += ran
                if nonfinite:
                    raise TrainingDiverged(
                        f"The training loss became NaN or Inf between steps {step - ran} and "
                        f"{step}; training stopped without saving. The last good checkpoint "
                        f"is {last_good or 'none'}.")
                # The loop ends early only on a stop request (this worker's or another's).
                stop = self._stop_signal or (
                    "a stop requested by another worker" if step < planned else None)
                if step % t.summary_every_steps == 0 or step == end or (stop and ran):
                    result["train"] = self._report(step, busy, first_step, started)
                    result["history"].append(result["train"])
                    busy, first_step, started = 0.0, step, time.time()
                saved = False
                if step % t.checkpoint_every_steps == 0 or step == end or stop:
                    last_good, saved = self.save_checkpoint(), True
                if (not stop and t.eval_every_steps and step % t.eval_every_steps == 0
                        and step != self.total_steps):   # the last step's evaluation: below
                    result["eval"] = self.evaluate(should_stop=self._agreed_stop)
                    if result["eval"] is None:      # abandoned for a stop request
                        stop = self._stop_signal or "a stop requested by another worker"
                        if not saved:
                            last_good = self.save_checkpoint()
                if stop:
                    self._log_preempted(stop, step)
                    result["status"] = "preempted"
                    break
                if hasattr(lock, "refresh"):
                    lock.refresh()
            # The evaluation at the last step, also when a run was stopped during it before.
            if (result["status"] == "completed" and step == self.total_steps
                    and not rundir.final_eval_done(self.model_dir, step)):
                result["eval"] = self.evaluate(should_stop=self._agreed_stop)
                if result["eval"] is None:
                    self._log_preempted(self._stop_signal or "a stop requested by another "
                                        "worker", step)
                    result["status"] = "preempted"
                elif self.is_chief:
                    rundir.write_final_eval(self.model_dir, step, result["eval"])
            elif result["status"] == "completed" and step == self.total_steps:
                result["eval"] = rundir.read_final_eval(self.model_dir, step)
        result["step"] = step
        if result["status"] == "completed" and step < self.total_steps:
            result["status"] = "stopped"
        if self._summary_writer is not None:
            self._summary_writer.flush()
        return result

    def _log_preempted(self, reason: str, step: int) -> None:
        self.log(f"{reason} at step {step}: checkpoint saved; run the same command again to "
                 "resume.")

    def _report(self, step: int, busy: float, first_step: int, started: float) -> dict:
        m = self._read_metrics()
        steps = max(step - first_step, 1)
        images_per_sec = steps * self.global_batch_size / max(busy, 1e-9)
        out = {
            "step": step,
            "loss": m["loss"] / steps,
            "accuracy": m["correct"] / max(m["examples"], 1.0),
            "clean_accuracy": (m["clean_correct"] / m["clean_examples"]
                               if m["clean_examples"] else None),
            "learning_rate": self.learning_rate(step - 1),
            "images_per_sec": images_per_sec,
        }
        acc_name = "adv_acc" if self.train_cfg.adversarial else "acc"
        eta = (self.total_steps - step) * self.global_batch_size / max(images_per_sec, 1e-9)
        clean = "" if out["clean_accuracy"] is None else f" | clean_acc {out['clean_accuracy']:.3f}"
        self.log(f"step {step}/{self.total_steps} | loss {out['loss']:.4f} | {acc_name} "
                 f"{out['accuracy']:.3f}{clean} | lr {out['learning_rate']:.4g} | "
                 f"{images_per_sec:.1f} img/s | ETA {_duration(eta)}")
        with self._writer().as_default(step=step):
            summary_scalar("loss", out["loss"])
            summary_scalar("learning_rate", out["learning_rate"])
            summary_scalar("adversarial_accuracy" if self.train_cfg.adversarial
                           else "accuracy", out["accuracy"])
            if out["clean_accuracy"] is not None:
                summary_scalar("clean_accuracy", out["clean_accuracy"])
            summary_scalar("images_per_sec", images_per_sec)
            if self._example_images.shape[0]:
                summary_images("clean_and_adversarial_examples",
                               self._example_images.read_value())
        return out

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(self, should_stop: Callable[[], bool] | None = None) -> dict | None:
        """Clean and ``eval_attack`` accuracy on the eval split (EMA weights when kept).

        The evaluation function is built once per trainer and traced on its first use.
        ``should_stop()`` is asked before every batch; when it says True the evaluation is
        abandoned and None returned.
        """
        from sat_tf import evaluation
        exp = self.experiment
        step = int(self.step.numpy())
        if self._evaluator is None:
            self._evaluator = evaluation.Evaluator(
                self.model, [exp.eval_attack], strategy=self.strategy, seed=self.train_cfg.seed)
            self._eval_data = self._eval_dataset()
        swap = self.ema.swapped() if self.ema is not None else contextlib.nullcontext()
        with swap:
            result = self._evaluator(self._eval_data, max_batches=self.train_cfg.eval_steps,
                                     should_stop=should_stop)
        if result is None:
            self.log(f"eval at step {step}: abandoned (stop requested).")
            return None
        a = exp.eval_attack
        pgd = result["attacks"][0]["accuracy"]
        self.log(f"eval at step {step}{' (EMA)' if self.ema is not None else ''}: "
                 f"{result['examples']} images | clean top-1 {result['clean_top1']:.4f} | "
                 f"PGD-{a.num_steps} (eps {a.epsilon:g}, step {a.step_size:g}) {pgd:.4f}")
        writer = (tf.summary.create_file_writer(os.path.join(self.model_dir, "eval"))
                  if self.is_chief else tf.summary.create_noop_writer())
        with writer.as_default(step=step):
            summary_scalar("clean_top1", result["clean_top1"])
            summary_scalar("clean_top5", result["clean_top5"])
            summary_scalar(f"pgd{a.num_steps}_accuracy", pgd)
        writer.flush()
        return result


# TensorBoard events written with TensorFlow's own tf.summary.write and the metadata of
# TensorBoard's scalar and image plugins, so the tensorboard package is needed only to view them.

def summary_scalar(name: str, value) -> None:
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        data_class=summary_pb2.DATA_CLASS_SCALAR)
    tf.summary.write(name, tf.cast(value, tf.float32), metadata=metadata)


def summary_images(name: str, images) -> None:
    """``images``: [n, H, W, 3] pixels in [0, 255]."""
    images = tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.uint8)
    height, width = images.shape[1], images.shape[2]
    encoded = tf.map_fn(tf.image.encode_png, images, fn_output_signature=tf.string)
    tensor = tf.concat([tf.constant([str(width), str(height)]), encoded], axis=0)
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="images"),
        data_class=summary_pb2.DATA_CLASS_BLOB_SEQUENCE)
    tf.summary.write(name, tensor, metadata=metadata)


def _chief(strategy) -> tuple[bool, int]:
    """(is this process the chief, its worker index) under a multi-worker strategy."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True, 0
    task_type, task_id = resolver.task_type, resolver.task_id or 0
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    chief = task_type in (None, "chief") or (task_type == "worker" and task_id == 0
                                             and not has_chief)
    return chief, task_id


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------------
# Loading a trained model.

def load_model(model_dir: str, *, checkpoint: str | None = None, use_ema: bool = True,
               model_fn: Callable | None = None) -> tuple[keras.Model, Experiment, int]:
    """Rebuilds the model of a training run and restores its weights.

    Args:
      model_dir: the run's directory (``experiment.json`` and checkpoints).
      checkpoint: a checkpoint path (default: the latest in ``model_dir``).
      use_ema: put the EMA weights in the model when the run kept them.
      model_fn: as in :class:`Trainer`, when the run used a custom model.

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
    exp = rundir.read_experiment(model_dir)
    if exp is None:
        raise ValueError(f"{model_dir!r} holds no {EXPERIMENT_FILE}; is it a training model_dir?")
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
        except rundir.UNREADABLE as e:
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise rundir.RunDirError(f"Checkpoint {checkpoint!r} cannot be read ({reason}).") \
                from None
        path = checkpoint
    else:
        restored = rundir.restore_newest_readable(ckpt, model_dir, prefix=CHECKPOINT_PREFIX,
                                                  log=log, repair=False, partial=True)
        if restored.path is None:
            detail = f" that can be read ({'; '.join(restored.skipped)})" if (
                restored.skipped) else ""
            raise ValueError(f"{model_dir!r} holds no checkpoint{detail}.")
        path = restored.path
    if ema is not None:
        ema.copy_to_model()
    return model, exp, int(step.numpy()), path
