"""Clean and attacked accuracy over a whole split (DESIGN.md §2).

:class:`Evaluator` is the one evaluation loop of the project: the trainer's periodic
evaluation and ``run/eval.py`` both use it (``evaluate`` is a one-call shortcut). It consumes an eval dataset of ``(images, labels, mask)`` batches
(sat_tf.data's eval contract: every example once, padding masked out), optionally distributed
with a strategy, and counts per example:

* clean top-1 / top-5;
* for each attack, correct under *every* restart (and on the clean image): an example counts
  as robust to an attack only if no restart fooled it; also, unconditioned on the clean
  prediction, how many adversarial images are classified correctly ("adversarial_correct",
  which a working untargeted attack never makes exceed the clean count). Restart r of every
  attack draws the same random start direction and random targets. Attacks are those of
  ``sat_tf.autoattack`` by their ``method`` (PGD, APGD-CE, APGD-T, Square); an "autoattack"
  attack is the AutoAttack sequence, each stage (with its restarts) only on the examples still
  robust, with the count still robust after each stage ("stages");
* for each attack, the forward and backward passes it spent, per example (the algorithms'
  count: ``sat_tf.autoattack``; the evaluator's own classification of the result is not
  counted);
* ``robust``: the worst case over all attacks run — robust only if every attack failed;
* input-gradient health on the clean images (all-zero or non-finite gradients hint at
  gradient masking).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from sat_tf import attacks as attacks_lib
from sat_tf import autoattack as autoattack_lib
from sat_tf.config import AttackConfig
from sat_tf.errors import UserError


def _call(model, images):
    if isinstance(model, keras.Layer):
        return model(images, training=False)
    return model(images)


def _batch_counts(model, images, labels, mask, attack_list, restarts, seed, num_robust,
                  compact=True):
    """Per-replica sums for one batch (runs inside strategy.run / tf.function).

    Only the first ``num_robust`` attacks enter the worst case; the rest are diagnostics.
    ``compact``: attacks that run on some examples only gather them (``sat_tf.autoattack``).
    """
    labels = tf.cast(labels, tf.int32)
    mask = tf.cast(mask, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(images)
        logits = tf.cast(_call(model, images), tf.float32)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    grads = tape.gradient(loss, images, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    flat = tf.reshape(grads, [tf.shape(grads)[0], -1])
    nonfinite = tf.logical_not(tf.reduce_all(tf.math.is_finite(flat), axis=1))
    zero = tf.logical_and(tf.logical_not(nonfinite), tf.reduce_all(tf.equal(flat, 0.0), axis=1))

    k = min(5, logits.shape[-1])
    top1 = tf.math.in_top_k(labels, logits, 1)
    top5 = tf.math.in_top_k(labels, logits, k)
    robust = top1
    per_attack, per_attack_adv, forward, backward, stages = [], [], [], [], []
    masked = lambda b: tf.reduce_sum(tf.cast(b, tf.float32) * mask)
    classify = lambda x: tf.argmax(tf.cast(_call(model, x), tf.float32), axis=-1,
                                   output_type=tf.int32)
    # Restart r of every attack uses the same seed: the same random-start direction and the
    # same random targets (common random numbers), so that attacks differing only in steps or
    # epsilon are compared on equal draws.
    restart_seeds = [attacks_lib.fold(seed, r) for r in range(restarts)]
    for a, cfg in enumerate(attack_list):
        if cfg.method == "autoattack":
            out, after = autoattack_lib.autoattack(model, images, labels, cfg,
                                                   seeds=restart_seeds, compact=compact)
            adv_correct = tf.equal(classify(out.images), labels)
            correct = tf.logical_and(after[-1], adv_correct)
            fwd, bwd = out.forward, out.backward
        else:
            adv_correct = tf.ones_like(top1)
            fwd = bwd = tf.zeros_like(mask)
            for s in restart_seeds:
                out = autoattack_lib.run(model, images, labels, cfg, seed=s, compact=compact)
                adv_correct = tf.logical_and(adv_correct, tf.equal(classify(out.images), labels))
                fwd, bwd = fwd + out.forward, bwd + out.backward
            correct = tf.logical_and(top1, adv_correct)
            after = correct[None]
        per_attack.append(masked(correct))
        per_attack_adv.append(masked(adv_correct))
        forward.append(masked(fwd))
        backward.append(masked(bwd))
        # Still robust after each stage (one stage for a single attack), padded with zeros.
        counts = [masked(after[i]) for i in range(after.shape[0])]
        stages.append(tf.stack(counts + [tf.constant(0.0)] * (
            autoattack_lib.MAX_STAGES - len(counts))))
        if a < num_robust:
            robust = tf.logical_and(robust, correct)

    stack = lambda xs: tf.stack(xs) if xs else tf.zeros([0], tf.float32)
    return (tf.reduce_sum(mask), masked(top1), masked(top5), stack(per_attack),
            stack(per_attack_adv), masked(robust), masked(zero), masked(nonfinite),
            stack(forward), stack(backward),
            tf.stack(stages) if stages else tf.zeros([0, autoattack_lib.MAX_STAGES]))


def pad_forever(ds: tf.data.Dataset) -> tf.data.Dataset:
    """``ds`` followed by all-padding batches (zeros, mask 0) without end.

    Under ``distribute_datasets_from_function`` every input pipeline (one per host) must
    keep feeding its replicas for as long as any host still has real examples: hosts hold
    different numbers of batches (41 examples, 4 hosts, per-replica batch 5 gives 3, 2, 2, 2
    batches), and a replica whose pipeline ran dry would end the step on every host. With the
    padding, every host runs the same steps, and :class:`Evaluator` stops at the first step
    in which no replica of any host has a real example. Needs static batch shapes (the eval
    contract of ``sat_tf.data``).
    """
    def zeros(spec):
        if not spec.shape.is_fully_defined():
            raise ValueError(f"pad_forever needs static batch shapes, got {spec}.")
        return tf.zeros(spec.shape, spec.dtype)

    padding = tf.data.Dataset.from_tensors(tf.nest.map_structure(zeros, ds.element_spec))
    return ds.concatenate(padding.repeat())


def distribute_eval_dataset(strategy, build: Callable[..., tf.data.Dataset],
                            global_batch_size: int):
    """The eval split distributed over ``strategy`` with exact coverage on any number of hosts.

    ``build(batch_size=, input_context=)`` returns one pipeline's ``(images, labels, mask)``
    batches (``sat_tf.data.build_dataset`` with the split fixed); each pipeline is extended
    with :func:`pad_forever`, so the distributed dataset never ends: :class:`Evaluator` stops
    when a step holds no real example on any replica.
    """
    def dataset_fn(ctx: tf.distribute.InputContext):
        ds = build(batch_size=ctx.get_per_replica_batch_size(global_batch_size),
                   input_context=ctx)
        return pad_forever(ds)

    return strategy.distribute_datasets_from_function(dataset_fn)


class Evaluator:
    """Clean and robust accuracy of one model under fixed attacks, over any eval dataset.

    The per-batch function is traced (and, on a TPU, compiled) once, when the first batch is
    evaluated, and reused by every later call: the trainer's periodic evaluation builds one
    Evaluator per run.

    Args:
      model: a Keras model (called with training=False) or a callable images -> logits.
      attacks: PGD settings to run; each is repeated ``restarts`` times with new random starts.
      strategy: a ``tf.distribute.Strategy``; None evaluates on the default device.
      restarts: random restarts per attack.
      seed: base seed; batch b on replica r attacks with seed fold_in((seed, b), r).
      diagnostic_attacks: attacks counted like the others but kept out of ``robust`` (sanity
        checks, e.g. a very large epsilon); reported under "diagnostic_attacks".
      compact: run attacks meant for some examples only (AutoAttack's stages, APGD-T's
        targets) on those examples gathered into a smaller batch; None: yes, except on a TPU
        (fixed shapes there: ``sat_tf.autoattack``).
    """

    def __init__(self, model, attacks: Sequence[AttackConfig] = (), *, strategy=None,
                 restarts: int = 1, seed: int = 0,
                 diagnostic_attacks: Sequence[AttackConfig] = (), compact: bool | None = None):
        if restarts < 1:
            raise ValueError(f"Invalid restarts {restarts!r}; it must be >= 1.")
        self.model = model
        self.attack_list = list(attacks) + list(diagnostic_attacks)
        self.num_robust = len(attacks)
        self.restarts = restarts
        self.seed = seed
        self.strategy = strategy or tf.distribute.get_strategy()
        self.compact = (not isinstance(self.strategy, tf.distribute.TPUStrategy)
                        if compact is None else compact)
        self._run_batch = tf.function(self._batch)

    def _batch(self, inputs, batch_index):
        """Global sums of one step's counts (every replica, every host)."""
        def replica_fn(images, labels, mask):
            ctx = tf.distribute.get_replica_context()
            s = attacks_lib.fold(
                tf.stack([tf.constant(self.seed, tf.int64), tf.cast(batch_index, tf.int64)]),
                ctx.replica_id_in_sync_group)

            def counts():
                return _batch_counts(self.model, images, labels, mask, self.attack_list,
                                     self.restarts, s, self.num_robust, self.compact)

            # A batch of padding only (a host past its last example) costs no attack.
            return tf.cond(tf.reduce_any(mask > 0), counts,
                           lambda: _zero_counts(len(self.attack_list)))

        out = self.strategy.run(replica_fn, args=inputs)
        return tf.nest.map_structure(
            lambda t: self.strategy.reduce(tf.distribute.ReduceOp.SUM, t, axis=None), out)

    @property
    def tracing_count(self) -> int:
        """How often the per-batch function has been traced (1 after any number of calls)."""
        return self._run_batch.experimental_get_tracing_count()

    def __call__(self, dataset, *, max_batches: int | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> dict | None:
        """Counts over ``dataset``: a ``tf.data.Dataset`` of global ``(images, labels, mask)``
        batches, or one distributed with the strategy (:func:`distribute_eval_dataset`).

        Stops at the end of the dataset, at the first step without a real example, or after
        ``max_batches`` steps. ``progress(batches_done, examples_done)`` is called after each
        step; ``should_stop()`` is asked before each step and, when True, the evaluation is
        abandoned and None returned (preemption).

        Returns:
          a dict of counts and accuracies (fractions in [0, 1]); see the module doc.
        """
        strategy = self.strategy
        if isinstance(dataset, tf.data.Dataset):
            dataset = strategy.experimental_distribute_dataset(pad_forever(dataset))
        start = time.time()
        totals = None
        batches = 0
        for inputs in dataset:
            if max_batches is not None and batches >= max_batches:
                break
            if should_stop is not None and should_stop():
                return None
            counts = [np.asarray(c, np.float64)
                      for c in self._run_batch(inputs, tf.constant(batches))]
            if counts[0] == 0:      # no replica of any host had a real example: all done
                break
            totals = counts if totals is None else [t + c for t, c in zip(totals, counts)]
            batches += 1
            if progress is not None:
                progress(batches, int(round(float(totals[0]))))
        if totals is None:
            raise UserError("The evaluation dataset is empty.")
        return self._result(totals, batches, time.time() - start)

    def _result(self, totals, batches: int, seconds: float) -> dict:
        (n, top1, top5, per_attack, per_attack_adv, robust, zero, nonfinite, forward,
         backward, stages) = totals
        n, top1, top5, robust, zero, nonfinite = map(
            float, (n, top1, top5, robust, zero, nonfinite))
        frac = lambda c: float(c) / n if n else 0.0
        attack_results = []
        for a, cfg in enumerate(self.attack_list):
            c, ac = np.atleast_1d(per_attack)[a], np.atleast_1d(per_attack_adv)[a]
            row = {"config": dataclasses.asdict(cfg), "restarts": self.restarts,
                   "correct": int(round(c)), "accuracy": frac(c),
                   "adversarial_correct": int(round(ac)), "adversarial_accuracy": frac(ac),
                   "forward_passes_per_example": frac(np.atleast_1d(forward)[a]),
                   "backward_passes_per_example": frac(np.atleast_1d(backward)[a])}
            if cfg.method == "autoattack":
                row["stages"] = [{"stage": name, "correct": int(round(k)), "accuracy": frac(k)}
                                 for name, k in zip(autoattack_lib.STAGES, stages[a])]
            attack_results.append(row)
        return {
            "examples": int(round(n)),
            "batches": batches,
            "clean_top1": frac(top1),
            "clean_top5": frac(top5),
            "clean_correct": int(round(top1)),
            "attacks": attack_results[:self.num_robust],
            "diagnostic_attacks": attack_results[self.num_robust:],
            "robust_correct": int(round(robust)),
            "robust": frac(robust),
            "zero_gradient_fraction": frac(zero),
            "nonfinite_gradient_fraction": frac(nonfinite),
            "seconds": seconds,
        }


def _zero_counts(num_attacks: int):
    """The structure :func:`_batch_counts` returns, all zeros."""
    z = tf.constant(0.0)
    per_attack = tf.zeros([num_attacks], tf.float32)
    return (z, z, z, per_attack, per_attack, z, z, z, per_attack, per_attack,
            tf.zeros([num_attacks, autoattack_lib.MAX_STAGES]))


def evaluate(model, dataset, attacks: Sequence[AttackConfig] = (), *, strategy=None,
             restarts: int = 1, seed: int = 0, max_batches: int | None = None,
             progress: Callable[[int, int], None] | None = None,
             diagnostic_attacks: Sequence[AttackConfig] = ()) -> dict:
    """Clean and robust accuracy of ``model`` over ``dataset``: one :class:`Evaluator` call
    (see its arguments)."""
    evaluator = Evaluator(model, attacks, strategy=strategy, restarts=restarts, seed=seed,
                          diagnostic_attacks=diagnostic_attacks)
    return evaluator(dataset, max_batches=max_batches, progress=progress)
