"""Every evaluation attack behind one call, and the AutoAttack sequence (Croce & Hein, ICML
2020), for ``sat_tf.evaluation``.

:func:`run` runs one attack of an :class:`~sat_tf.config.AttackConfig` by its ``method``:

* ``pgd``: :func:`sat_tf.attacks.pgd`;
* ``apgd-ce``: :func:`sat_tf.apgd.apgd` on the cross-entropy, untargeted;
* ``apgd-t``: :func:`apgd_targeted`, APGD on the targeted DLR loss towards each of the
  ``num_targets`` most likely wrong classes of the clean image in turn, each target only on
  the examples no earlier target fooled;
* ``square``: :func:`sat_tf.square.square` with ``queries`` forward passes at most;

and :func:`autoattack` runs AutoAttack's "standard" sequence, APGD-CE, then APGD-T, then
Square, each stage only on the examples every earlier stage left correctly classified, and
reports which examples are still robust after each stage. FAB-T, the standard sequence's third
attack, is not implemented (README, "Attacks beyond PGD").

All are pure TensorFlow functions of (model, images, labels, config, seed), usable inside
``strategy.run`` and under XLA. "Only on some examples" is done in one of two ways:

* ``compact=True``: the examples are gathered into a smaller batch and scattered back (dynamic
  shapes; graph and eager mode, the default on CPUs and GPUs);
* ``compact=False``: the attack runs on the whole batch and only the chosen examples' results
  are kept (fixed shapes, for XLA and TPUs; the same result distribution, more compute).

Each returns an :class:`Outcome` with the number of forward and backward passes the algorithm
spent on each example (the way AutoAttack and Square count queries: the examples an attack or
stage skipped cost nothing, and Square stops counting at an example's first success). With
``compact=False`` the batch computes more than that count.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import tensorflow as tf

from sat_tf import apgd as apgd_lib
from sat_tf import attacks, square as square_lib
from sat_tf.config import AttackConfig

STAGES = ("apgd-ce", "apgd-t", "square")   # the standard sequence, less FAB-T
MAX_STAGES = len(STAGES)


class Outcome(NamedTuple):
    images: tf.Tensor     # float32 [batch, H, W, C]: the adversarial images
    forward: tf.Tensor    # float32 [batch]: forward passes spent on each example
    backward: tf.Tensor   # float32 [batch]: backward passes spent on each example


def _wrong(model, images, labels):
    pred = tf.argmax(tf.cast(attacks._logits(model, images), tf.float32), -1,
                     output_type=tf.int32)
    return tf.not_equal(pred, tf.cast(labels, tf.int32))


def on_active(fn, active, inputs, defaults, *, compact: bool):
    """``fn(*inputs, active=mask)``'s outputs (each [batch, ...]) on the ``active`` examples
    only; the others get ``defaults`` (each the shape of the full output). Gathered
    (``compact``), ``fn`` sees only the active examples and an all-True mask; masked, it sees
    the whole batch and ``active``, so it can leave the others alone (Square stops early, APGD-T
    skips them). No example active: ``fn`` does not run."""
    inputs, defaults = tuple(inputs), tuple(defaults)
    expand = lambda mask, t: tf.reshape(mask, [-1] + [1] * (t.shape.rank - 1))

    def run():
        if compact:
            index = tf.where(active)
            gathered = [tf.gather_nd(t, index) for t in inputs]
            outputs = fn(*gathered, active=tf.ones(tf.shape(index)[:1], tf.bool))
            return tuple(tf.tensor_scatter_nd_update(d, index, tf.cast(o, d.dtype))
                         for d, o in zip(defaults, outputs))
        outputs = fn(*inputs, active=active)
        return tuple(tf.where(expand(active, d), tf.cast(o, d.dtype), d)
                     for d, o in zip(defaults, outputs))

    return tf.cond(tf.reduce_any(active), run, lambda: defaults)


def apgd_targeted(model, images, labels, cfg: AttackConfig, *, seed, active=None,
                  compact: bool = True):
    """APGD-T: APGD on the targeted DLR loss, one run of ``cfg.num_steps`` iterations per
    target class (the clean image's 2nd, 3rd, ... most likely classes, ``cfg.num_targets`` of
    them), each run only on the examples still correctly classified. Returns (Outcome, fooled):
    a misclassified image where a target run found one, else the clean image."""
    x = tf.convert_to_tensor(images, tf.float32)
    labels = tf.cast(labels, tf.int32)
    active = tf.ones_like(labels, tf.bool) if active is None else active
    logits = tf.cast(attacks._logits(model, x), tf.float32)
    targets = apgd_lib.top_targets(logits, cfg.num_targets)
    done = tf.logical_or(tf.logical_not(active),
                         tf.not_equal(tf.argmax(logits, -1, output_type=tf.int32), labels))
    fooled = tf.logical_and(active, done)      # misclassified already: nothing to do
    forward = tf.cast(active, tf.float32)      # the clean pass that chose the targets
    backward = tf.zeros_like(forward)
    adv = x
    passes = float(cfg.num_steps + 1)
    for t in range(int(targets.shape[0])):
        def one_target(xs, ys, ts, active, t=t):
            out, hit = apgd_lib.apgd_with_status(
                model, xs, ys, epsilon=cfg.epsilon, num_steps=cfg.num_steps,
                loss="dlr-targeted", targets=ts, random_start=cfg.random_start,
                seed=attacks.fold(seed, t), backward=cfg.backward)
            return out, hit, tf.fill(tf.shape(ys), passes)
        todo = tf.logical_not(done)
        new_adv, hit, spent = on_active(
            one_target, todo, (x, labels, targets[t]),
            (adv, tf.zeros_like(done), tf.zeros_like(forward)), compact=compact)
        adv = tf.where(tf.reshape(hit, [-1, 1, 1, 1]), new_adv, adv)
        done = tf.logical_or(done, hit)
        fooled = tf.logical_or(fooled, hit)
        forward, backward = forward + spent, backward + spent
    return Outcome(tf.stop_gradient(adv), forward, backward), fooled


def run(model, images, labels, cfg: AttackConfig, *, seed, active=None,
        compact: bool = True, rescale_schedule: bool = True) -> Outcome:
    """One attack (``cfg.method``, not "autoattack"). PGD attacks every example of the batch;
    the others, as in the authors' code, only the ``active`` ones (default: those the model
    classifies correctly, one forward pass more) and return the clean image for the rest.
    ``rescale_schedule``: Square's p schedule rescaled to its budget (the Square paper's) or
    not (AutoAttack's; :func:`sat_tf.square.fraction`)."""
    x = tf.convert_to_tensor(images, tf.float32)
    labels = tf.cast(labels, tf.int32)
    ones = tf.ones(tf.shape(labels)[:1], tf.float32)
    if cfg.method == "pgd":
        adv = attacks.pgd(model, x, labels, cfg, seed=seed)
        return Outcome(adv, ones * cfg.num_steps, ones * cfg.num_steps)
    if cfg.method not in ("apgd-ce", "apgd-t", "square"):
        raise ValueError(f"Invalid attack method {cfg.method!r} for run(); autoattack runs "
                         "with autoattack().")
    if cfg.method == "apgd-t":     # its own clean pass picks the targets and the examples
        return apgd_targeted(model, x, labels, cfg, seed=seed, active=active,
                             compact=compact)[0]
    first = zeros = tf.zeros_like(ones)
    if active is None:
        active, first = tf.logical_not(_wrong(model, x, labels)), ones

    def attack(xs, ys, active):
        if cfg.method == "apgd-ce":
            adv = apgd_lib.apgd(model, xs, ys, epsilon=cfg.epsilon, num_steps=cfg.num_steps,
                                loss="ce", random_start=cfg.random_start, seed=seed,
                                backward=cfg.backward)
            spent = tf.fill(tf.shape(ys), float(cfg.num_steps + 1))
            return adv, spent, spent
        adv, queries = square_lib.square(model, xs, ys, epsilon=cfg.epsilon,
                                         num_queries=cfg.queries, seed=seed, active=active,
                                         rescale_schedule=rescale_schedule, return_queries=True)
        return adv, queries, tf.zeros_like(queries)

    adv, forward, backward = on_active(attack, active, (x, labels), (x, zeros, zeros),
                                       compact=compact)
    return Outcome(adv, forward + first, backward)


def stage_config(cfg: AttackConfig, stage: str) -> AttackConfig:
    """The configuration of one AutoAttack stage of ``cfg`` (method "autoattack")."""
    mode = "targeted" if stage == "apgd-t" else "untargeted"
    return dataclasses.replace(cfg, method=stage, mode=mode)


def autoattack(model, images, labels, cfg: AttackConfig, *, seeds, compact: bool = True):
    """AutoAttack's standard sequence (:data:`STAGES`) at ``cfg``'s epsilon, ``cfg.num_steps``
    APGD iterations, ``cfg.num_targets`` APGD-T targets and ``cfg.queries`` Square queries
    (Square's p schedule in raw queries, as AutoAttack runs it). Each stage runs once per seed
    of ``seeds`` (restarts), every run only on the examples correctly classified after
    everything before it.

    Returns (Outcome, robust): robust is a bool [stages, batch], whether the example was
    correctly classified on the clean image and on every adversarial image up to that stage.
    The images are, per example, the first misclassified adversarial image found, else the
    clean image.
    """
    x = tf.convert_to_tensor(images, tf.float32)
    labels = tf.cast(labels, tf.int32)
    robust = tf.logical_not(_wrong(model, x, labels))
    adv = x
    zeros = tf.zeros(tf.shape(labels)[:1], tf.float32)
    forward, backward = zeros + 1.0, zeros     # the clean pass that chose the examples
    after = []
    for j, stage in enumerate(STAGES):
        scfg = stage_config(cfg, stage)
        for r, seed in enumerate(seeds):
            def attack(xs, ys, active, scfg=scfg, stage=stage, s=attacks.fold(seed, j)):
                if stage == "apgd-t":
                    out, hit = apgd_targeted(model, xs, ys, scfg, seed=s, active=active,
                                             compact=compact)
                    return out.images, hit, out.forward, out.backward
                out = run(model, xs, ys, scfg, seed=s, active=active, compact=compact,
                          rescale_schedule=False)
                hit = tf.logical_and(active, _wrong(model, out.images, ys))
                return out.images, hit, out.forward + 1.0, out.backward
            new_adv, hit, f, b = on_active(
                attack, robust, (x, labels), (adv, tf.zeros_like(robust), zeros, zeros),
                compact=compact)
            adv = tf.where(tf.reshape(hit, [-1, 1, 1, 1]), new_adv, adv)
            robust = tf.logical_and(robust, tf.logical_not(hit))
            forward, backward = forward + f, backward + b
        after.append(robust)
    return Outcome(tf.stop_gradient(adv), forward, backward), tf.stack(after)
