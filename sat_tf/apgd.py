"""Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020, Algorithm 1), L-infinity, in pixel units.

Like :func:`sat_tf.attacks.pgd`, every function here is pure: stateless random numbers from
``seed``, a graph loop (``tf.while_loop``) over the iterations, usable eagerly, inside
``strategy.run`` and under ``jit_compile=True``; images are float32 pixels in [0, 255]; the
model is called with ``training=False`` inside ``activations.backward_rule(backward)``.

The iteration (paper's notation; η the step size, α = 0.75 the momentum):

    z      = P(x_k + η sign(∇f(x_k)))
    x_k+1  = P(x_k + α (z − x_k) + (1 − α)(x_k − x_k−1))     (the first step: x_1 = z)

with P the projection onto [x − ε, x + ε] ∩ [0, 255] and η = 2ε at the start. At the
checkpoints of :func:`checkpoints` the step size of an example is halved, and its iterate reset
to its best point, when (1) its loss rose in at most ρ = 75 % of the steps since the last
checkpoint, or (2) its step size was not halved at the last checkpoint and its best loss has
not improved since. Decisions are per example.

Choices where the paper and its reference code (fra31/auto-attack) differ, and ours:

* checkpoints: the reference's integer rounding (first after ⌊0.22 N⌋ iterations, then
  windows shrinking by ⌊0.03 N⌋ down to ⌊0.06 N⌋, each at least 1). For N = 100 this is the
  paper's ⌈p_j N⌉ exactly: 22, 41, 57, 70, 80, 87, 93, 99;
* condition (1) counts "rose in at most ρ·window steps" (the reference's ``<=``); the first
  window's first step compares with the loss at the starting point (the reference compares
  with an unfilled zero);
* the random start is the reference's: uniform in the ball, scaled so each example's largest
  coordinate is ±ε.

An example counts as fooled when any iterate is misclassified (argmax ≠ label, also in the
targeted attack); :func:`apgd` returns for it that misclassified iterate (the last one found),
and for every other example its highest-loss point.
"""
from __future__ import annotations

import tensorflow as tf

from sat_tf import activations
from sat_tf.attacks import RNG_ALG, _logits, _seed, project

MOMENTUM = 0.75
RHO = 0.75
LOSSES = ("ce", "dlr", "dlr-targeted")
# The denominators' guard, as in the paper's code.
_TINY = 1e-12


def checkpoints(num_steps: int) -> list[int]:
    """Iteration counts after which the step size may be halved (see the module doc)."""
    if num_steps <= 0:
        return []
    first = max(int(0.22 * num_steps), 1)
    shortest = max(int(0.06 * num_steps), 1)
    shrink = max(int(0.03 * num_steps), 1)
    out, at, window = [], first, first
    while at <= num_steps:
        out.append(at)
        window = max(window - shrink, shortest)
        at += window
    return out


def _sorted_logits(logits, k: int):
    if logits.shape[-1] is not None and logits.shape[-1] < k:
        raise ValueError(f"The DLR loss needs at least {k} classes; the model has "
                         f"{logits.shape[-1]}.")
    return tf.math.top_k(logits, k).values


def dlr_loss(logits, labels):
    """Difference of logits ratio, per example: −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3),
    with z_π1 ≥ z_π2 ≥ ... the sorted logits. Needs 3 classes."""
    logits = tf.cast(logits, tf.float32)
    top = _sorted_logits(logits, 3)
    onehot = tf.one_hot(labels, tf.shape(logits)[-1], on_value=True, off_value=False)
    z_y = tf.reduce_sum(tf.where(onehot, logits, 0.0), axis=-1)
    other = tf.reduce_max(tf.where(onehot, -float("inf"), logits), axis=-1)
    return -(z_y - other) / (top[:, 0] - top[:, 2] + _TINY)


def dlr_targeted_loss(logits, labels, targets):
    """Targeted DLR, per example: −(z_y − z_t) / (z_π1 − (z_π3 + z_π4) / 2). Needs 4 classes."""
    logits = tf.cast(logits, tf.float32)
    top = _sorted_logits(logits, 4)
    z_y = tf.gather(logits, labels, batch_dims=1)
    z_t = tf.gather(logits, targets, batch_dims=1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _TINY)


def _loss_fn(loss: str, labels, targets):
    if loss == "ce":
        return lambda z: tf.nn.sparse_softmax_cross_entropy_with_logits(labels, z)
    if loss == "dlr":
        return lambda z: dlr_loss(z, labels)
    if loss == "dlr-targeted":
        if targets is None:
            raise ValueError("The dlr-targeted loss needs targets.")
        return lambda z: dlr_targeted_loss(z, labels, tf.cast(targets, tf.int32))
    raise ValueError(f"Invalid APGD loss {loss!r}; valid choices: {', '.join(LOSSES)}.")


def random_start_point(images, epsilon, seed):
    """The reference's start: uniform noise scaled to an L-infinity norm of exactly ε."""
    t = tf.random.stateless_uniform(tf.shape(images), seed, -1.0, 1.0, alg=RNG_ALG)
    norm = tf.reduce_max(tf.abs(t), axis=[1, 2, 3], keepdims=True)
    return project(images + epsilon * t / (norm + _TINY), images, epsilon)


def apgd_with_status(model, images, labels, *, epsilon: float, num_steps: int = 100,
                     loss: str = "ce", targets=None, random_start: bool = True, seed=None,
                     backward: str | None = None):
    """:func:`apgd`, also returning a bool [batch]: was the example misclassified at an
    iterate (the start included)."""
    x = tf.convert_to_tensor(images, tf.float32)
    labels = tf.cast(labels, tf.int32)
    eps = tf.constant(float(epsilon), tf.float32)
    loss_of = _loss_fn(loss, labels, targets)
    if random_start:
        x_start = random_start_point(x, eps, _seed(seed))
    else:
        x_start = x

    def evaluate(x_adv):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            with activations.backward_rule(backward):
                logits = tf.cast(_logits(model, x_adv), tf.float32)
            per_example = loss_of(logits)
            total = tf.reduce_sum(per_example)
        grad = tape.gradient(total, x_adv, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        wrong = tf.not_equal(tf.argmax(logits, -1, output_type=tf.int32), labels)
        return per_example, grad, wrong

    loss0, grad0, fooled0 = evaluate(x_start)
    if num_steps <= 0:
        return tf.stop_gradient(x_start), fooled0

    marks = checkpoints(num_steps)
    is_check = [False] * num_steps
    window = [0.0] * num_steps
    for prev, at in zip([0] + marks, marks):
        is_check[at - 1], window[at - 1] = True, float(at - prev)
    is_check, window = tf.constant(is_check), tf.constant(window)
    per_image = lambda v: tf.reshape(v, [-1, 1, 1, 1])

    state = dict(
        x_cur=x_start, x_old=x_start, grad=grad0,
        x_best=x_start, grad_best=grad0, loss_best=loss0, loss_prev=loss0,
        step=2.0 * eps * tf.ones_like(loss0), rises=tf.zeros_like(loss0),
        best_at_check=loss0, halved_at_check=tf.ones_like(loss0, tf.bool),
        fooled=fooled0, x_fool=x_start)

    def body(i, s):
        a = tf.where(i == 0, 1.0, MOMENTUM)
        z = project(s["x_cur"] + per_image(s["step"]) * tf.sign(s["grad"]), x, eps)
        x_new = project(s["x_cur"] + a * (z - s["x_cur"]) + (1.0 - a) * (s["x_cur"] - s["x_old"]),
                        x, eps)
        new_loss, new_grad, wrong = evaluate(x_new)
        improved = new_loss > s["loss_best"]
        n = dict(s)
        n["x_old"] = s["x_cur"]
        n["fooled"] = tf.logical_or(s["fooled"], wrong)
        n["x_fool"] = tf.where(per_image(wrong), x_new, s["x_fool"])
        n["rises"] = s["rises"] + tf.cast(new_loss > s["loss_prev"], tf.float32)
        n["loss_prev"] = new_loss
        n["x_best"] = tf.where(per_image(improved), x_new, s["x_best"])
        n["grad_best"] = tf.where(per_image(improved), new_grad, s["grad_best"])
        n["loss_best"] = tf.where(improved, new_loss, s["loss_best"])

        # The checkpoint: halve and restart from the best point where progress stalled.
        check = is_check[i]
        halve = tf.logical_or(
            n["rises"] <= RHO * window[i],
            tf.logical_and(tf.logical_not(s["halved_at_check"]),
                           s["best_at_check"] >= n["loss_best"]))
        halve = tf.logical_and(check, halve)
        n["step"] = tf.where(halve, 0.5 * s["step"], s["step"])
        n["x_cur"] = tf.where(per_image(halve), n["x_best"], x_new)
        n["grad"] = tf.where(per_image(halve), n["grad_best"], new_grad)
        n["halved_at_check"] = tf.where(check, halve, s["halved_at_check"])
        n["best_at_check"] = tf.where(check, n["loss_best"], s["best_at_check"])
        n["rises"] = tf.where(check, tf.zeros_like(n["rises"]), n["rises"])
        return i + 1, n

    _, state = tf.while_loop(lambda i, _: i < num_steps, body, (tf.constant(0), state),
                             maximum_iterations=num_steps)
    fooled = state["fooled"]
    out = tf.where(per_image(fooled), state["x_fool"], state["x_best"])
    return tf.stop_gradient(out), fooled


def apgd(model, images, labels, *, epsilon: float, num_steps: int = 100, loss: str = "ce",
         targets=None, random_start: bool = True, seed=None, backward: str | None = None):
    """Auto-PGD on ``loss`` ("ce", "dlr" or, with ``targets``, "dlr-targeted"), L-infinity
    ball of radius ``epsilon`` pixels, ``num_steps`` iterations (each one forward and one
    backward pass, plus one at the start).

    Returns ``tf.stop_gradient`` of the adversarial images inside [x − ε, x + ε] ∩ [0, 255]:
    a misclassified iterate where one was found, else the highest-loss point.
    """
    return apgd_with_status(model, images, labels, epsilon=epsilon, num_steps=num_steps,
                            loss=loss, targets=targets, random_start=random_start, seed=seed,
                            backward=backward)[0]


def top_targets(logits, num_targets: int):
    """[num_targets, batch] target classes: the 2nd, 3rd, ... highest logits (for a correctly
    classified example, its most likely wrong classes in order)."""
    k = min(num_targets + 1, int(logits.shape[-1]))
    order = tf.math.top_k(tf.cast(logits, tf.float32), k).indices
    return tf.transpose(order[:, 1:])
