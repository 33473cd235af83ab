"""The training loop of one run: steps per host round trip, checkpoints, logs and summaries,
periodic evaluation, stopping on SIGTERM or a diverged loss.

The :class:`Trainer` builds the model, optimizer, EMA and step counter of an experiment in the
strategy's scope and runs :class:`sat_tf.step.TrainStep` (the per-replica step) under
``strategy.run``. ``steps_per_loop`` steps run inside one ``tf.function`` (a graph loop over
``strategy.run``) per host round trip, with input from
``strategy.distribute_datasets_from_function``. Between loops the host logs, writes TensorBoard
summaries, checkpoints, evaluates, and checks for a non-finite loss (which stops training and
leaves the last good checkpoint untouched) and for SIGTERM (which saves a checkpoint and
returns).

The run directory (experiment.json, the model a run describes, loading a trained model) is
:mod:`sat_tf.rundir`; the EMA :mod:`sat_tf.ema`; summaries :mod:`sat_tf.summaries`.
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

from sat_tf import distribute, memory, optimizers, rundir, schedules, summaries
from sat_tf import data as data_lib
from sat_tf.config import Experiment
from sat_tf.ema import ExponentialMovingAverage
from sat_tf.errors import UserError
from sat_tf.step import LOGS, TrainStep


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or Inf."""


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
            raise UserError("The experiment has no model_dir (where checkpoints go).")
        self.experiment = exp = rundir.resolve_experiment(experiment)
        self.train_cfg = exp.train
        self.loop_cfg = exp.loop
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
        self.eval_batch_size = exp.loop.eval_batch_size or self.global_batch_size
        self.per_replica_eval_batch_size = distribute.per_replica_batch_size(
            self.eval_batch_size, self.strategy, what="eval batch size")
        self.num_classes, self.image_size = rundir.model_shape(exp)
        num_examples = exp.train.num_train_examples or exp.data.num_train_examples
        if num_examples is None:
            raise UserError(f"The training-set size of dataset {exp.data.dataset!r} in "
                            f"{exp.data.data_dir!r} is unknown (no conversion.json from "
                            "run/make_tfrecords.py beside the shards); give "
                            "--num_train_images.")
        self.steps_per_epoch = schedules.steps_per_epoch(exp.train, num_examples)
        self.total_steps = schedules.total_steps(exp.train, num_examples)
        self.model_dir = exp.model_dir
        self._stop_signal = None
        # Set by SIGTERM / request_stop, read by the graph loop before every step; a plain
        # variable of this process (not mirrored), created outside the strategy's scope.
        self._stop_flag = tf.Variable(False, trainable=False, name="stop_requested")

        if model_fn is None:
            self._check_memory()
        keras.utils.set_random_seed(exp.train.seed)
        with self.strategy.scope():
            self.model = rundir.build_model(exp, model_fn)
            self.schedule = schedules.Schedule(
                exp.schedule, global_batch_size=self.global_batch_size,
                steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps)
            self.optimizer = optimizers.build_optimizer(
                exp.optimizer, self.schedule, mixed_precision=exp.runtime.precision_policy())
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
                               aggregation=tf.VariableAggregation.SUM) for k in LOGS}
            k = min(exp.loop.summary_images, self.per_replica_batch_size)
            self._example_images = tf.Variable(
                tf.zeros([k, self.image_size, 2 * self.image_size, 3]), trainable=False,
                name="example_images", synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.train_step = TrainStep(
            self.model, self.optimizer, experiment=exp, num_classes=self.num_classes,
            num_replicas=self.num_replicas, ema=self.ema, example_images=k,
            jit_compile=exp.runtime.jit_compile,
            loss_scaling=exp.runtime.precision_policy() == "mixed_float16")
        objects = dict(model=self.model, optimizer=self.optimizer, step=self.step)
        if self.ema is not None:
            objects["ema"] = self.ema
        # The states of the model's random generators (dropout, stochastic depth) are not
        # weights, and tf.train.Checkpoint(model=) leaves them out; saving them makes a
        # resumed run draw the same masks.
        if self.train_step.rng_states:
            objects["rng_states"] = self.train_step.rng_states
        self.checkpoint = tf.train.Checkpoint(**objects)
        # Multi-worker: every worker saves (the save is collective), the chief into model_dir,
        # the others into a scratch folder of their own; all restore from model_dir.
        self.is_chief, self._worker = distribute.chief(self.strategy)
        self.checkpoint_manager = self._checkpoint_manager()
        self._restore()
        self._summary_writer = None
        self._evaluator = self._eval_data = None
        # Several workers (MultiWorkerMirroredStrategy across hosts) must agree on stopping.
        self._multi_worker = distribute.spans_processes(self.strategy)
        self._agreed_stop_fn = tf.function(self._stop_requested)

    # -- memory ------------------------------------------------------------------------------

    def memory_estimate(self):
        """:func:`sat_tf.memory.estimate` of one replica of this run."""
        exp = self.experiment
        slots = optimizers.slots(exp.optimizer.name)
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
        local = distribute.local_replicas(self.strategy)
        what = est.run() + (f" (x{local} replicas sharing this host)" if local > 1 else "")
        memory.check_fits(est, available // local, what=what)

    # -- checkpoints -------------------------------------------------------------------------

    def _restore(self) -> None:
        """Resumes from the newest readable checkpoint of ``model_dir`` (see
        :func:`rundir.restore_newest_readable`), if it holds this run."""
        if not rundir.find_checkpoints(self.model_dir, rundir.CHECKPOINT_PREFIX):
            if self.experiment.train.init_from:
                rundir.warm_start(self.model, self.experiment.train.init_from, log=self.log)
                if self.ema is not None:
                    self.ema.reset()
            return
        rundir.check_resumable(self.model_dir, self.experiment)
        restored = rundir.restore_newest_readable(
            self.checkpoint, self.model_dir, prefix=rundir.CHECKPOINT_PREFIX, log=self.log,
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
                max_to_keep=self.loop_cfg.max_checkpoints_to_keep,
                checkpoint_name=rundir.CHECKPOINT_PREFIX)
        return tf.train.CheckpointManager(
            self.checkpoint, os.path.join(self.model_dir, f".worker-{self._worker}"),
            max_to_keep=1, checkpoint_name=rundir.CHECKPOINT_PREFIX)

    def save_checkpoint(self) -> str:
        path = self.checkpoint_manager.save(checkpoint_number=int(self.step.numpy()))
        self.log(f"Saved checkpoint {path}.")
        return path

    # -- the step ----------------------------------------------------------------------------

    def _replica_step(self, images, labels, measure):
        logs = self.train_step(images, labels, self.step.read_value(), measure)
        self.step.assign_add(1)
        for k in LOGS:
            self._metrics[k].assign_add(logs[k])

        def keep_pair():
            self._example_images.assign(logs["example_images"])
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
        skip = start_step if self.loop_cfg.resume_input == "skip" else 0

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
        t = self.loop_cfg
        every = [t.steps_per_loop, t.checkpoint_every_steps, t.summary_every_steps]
        if t.eval_every_steps:
            every.append(t.eval_every_steps)
        return min([end] + [(step // e + 1) * e for e in every])

    def _writer(self):
        if self._summary_writer is None:
            self._summary_writer = summaries.writer(self.model_dir, "train",
                                                    is_chief=self.is_chief)
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
        t = self.loop_cfg
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
            summaries.scalar("loss", out["loss"])
            summaries.scalar("learning_rate", out["learning_rate"])
            summaries.scalar("adversarial_accuracy" if self.train_cfg.adversarial
                           else "accuracy", out["accuracy"])
            if out["clean_accuracy"] is not None:
                summaries.scalar("clean_accuracy", out["clean_accuracy"])
            summaries.scalar("images_per_sec", images_per_sec)
            if self._example_images.shape[0]:
                summaries.images("clean_and_adversarial_examples",
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
            result = self._evaluator(self._eval_data, max_batches=self.loop_cfg.eval_steps,
                                     should_stop=should_stop)
        if result is None:
            self.log(f"eval at step {step}: abandoned (stop requested).")
            return None
        a = exp.eval_attack
        pgd = result["attacks"][0]["accuracy"]
        self.log(f"eval at step {step}{' (EMA)' if self.ema is not None else ''}: "
                 f"{result['examples']} images | clean top-1 {result['clean_top1']:.4f} | "
                 f"PGD-{a.num_steps} (eps {a.epsilon:g}, step {a.step_size:g}) {pgd:.4f}")
        writer = summaries.writer(self.model_dir, "eval", is_chief=self.is_chief)
        with writer.as_default(step=step):
            summaries.scalar("clean_top1", result["clean_top1"])
            summaries.scalar("clean_top5", result["clean_top5"])
            summaries.scalar(f"pgd{a.num_steps}_accuracy", pgd)
        writer.flush()
        return result


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
