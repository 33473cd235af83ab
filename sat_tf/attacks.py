"""L-infinity PGD in pixel units (DESIGN.md §3, §5).

``pgd(model, images, labels, config, seed=...)`` is a pure function of its inputs: it can run
eagerly, inside ``strategy.run`` and under ``jit_compile=True``. Its step loop is a graph loop
(``tf.while_loop``; a single step runs without one), not Python. Images are float32 pixels in
[0, 255], so ``epsilon = 4`` means 4/255 of the range, exactly as the paper states it.

The model is called with ``training=False`` (batch norm uses and keeps its moving statistics;
dropout and stochastic depth are off) inside ``activations.backward_rule(config.backward)``,
so the attacker's backward rule is choosable (the paper's Table 1). Only the gradient with
respect to the input is computed, never weight gradients.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from sat_tf import activations
from sat_tf.config import AttackConfig

PIXEL_MIN = 0.0
PIXEL_MAX = 255.0
# One RNG algorithm everywhere, so eager, graph and XLA runs draw the same random start.
RNG_ALG = "philox"


def _logits(model, images):
    if isinstance(model, keras.Layer):
        return model(images, training=False)
    return model(images)   # e.g. a function loaded from a SavedModel


def _num_classes(model, images) -> int:
    shape = getattr(model, "output_shape", None)
    if isinstance(shape, tuple) and shape and isinstance(shape[-1], int):
        return shape[-1]
    return int(_logits(model, images[:1]).shape[-1])


def _seed(seed):
    if seed is None:
        return tf.random.get_global_generator().make_seeds(1)[:, 0]
    return tf.cast(tf.convert_to_tensor(seed), tf.int64)


def fold(seed, i):
    """A new stateless seed from ``seed`` and ``i`` (the attacks' one way to derive seeds)."""
    return tf.random.experimental.stateless_fold_in(seed, i, alg=RNG_ALG)


def project(x_adv, x, epsilon):
    """Projection onto [x - eps, x + eps] ∩ [0, 255]."""
    x_adv = tf.clip_by_value(x_adv, x - epsilon, x + epsilon)
    return tf.clip_by_value(x_adv, PIXEL_MIN, PIXEL_MAX)


def random_targets(labels, num_classes: int, seed):
    """Uniformly random target labels, each different from its true label."""
    offset = tf.random.stateless_uniform(tf.shape(labels), seed, 1, num_classes, dtype=tf.int32,
                                           alg=RNG_ALG)
    return (tf.cast(labels, tf.int32) + offset) % num_classes


def pgd(model, images, labels, config: AttackConfig, *, seed=None, targets=None):
    """Projected gradient descent on the cross-entropy, L-infinity ball of radius epsilon.

    Args:
      model: a Keras model (called with ``training=False``) or any callable images -> logits.
      images: float32 [batch, H, W, C] pixels in [0, 255].
      labels: int [batch] true labels, 0-based.
      config: epsilon, step_size (pixels), num_steps, random_start, clean_start_prob (the
        probability that this batch starts from the clean image instead of a random point),
        mode ("untargeted" ascends the loss of the true label; "targeted" descends the loss of
        a target label), backward (the activations' backward rule during the attack).
      seed: int tensor of shape [2] for the stateless random start, clean-start coin and
        random targets; None draws one from the global generator.
      targets: targeted mode only: the target labels (default: random, never the true label).

    Returns:
      ``tf.stop_gradient`` of the adversarial images, inside [x - eps, x + eps] ∩ [0, 255].
    """
    images = tf.convert_to_tensor(images, tf.float32)
    labels = tf.cast(labels, tf.int32)
    eps = tf.constant(float(config.epsilon), tf.float32)
    step = tf.constant(float(config.step_size), tf.float32)
    targeted = config.mode == "targeted"
    needs_seed = config.random_start or targeted or config.clean_start_prob > 0
    seed = _seed(seed) if needs_seed else None

    if targeted:
        if targets is None:
            targets = random_targets(labels, _num_classes(model, images),
                                     fold(seed, 2))
        attack_labels, direction = tf.cast(targets, tf.int32), -1.0
    else:
        attack_labels, direction = labels, 1.0

    x_adv = images
    if config.random_start:
        noise = tf.random.stateless_uniform(tf.shape(images), seed, -1.0, 1.0, alg=RNG_ALG) * eps
        if config.clean_start_prob > 0:
            coin = tf.random.stateless_uniform(
                [], fold(seed, 1), alg=RNG_ALG)
            noise = tf.where(coin < config.clean_start_prob, tf.zeros_like(noise), noise)
        x_adv = project(images + noise, images, eps)

    def body(i, x_adv):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            with activations.backward_rule(config.backward):
                logits = _logits(model, x_adv)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                attack_labels, tf.cast(logits, tf.float32)))
        # A model whose output ignores its input has a zero, not a missing, gradient.
        grad = tape.gradient(loss, x_adv, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        x_adv = x_adv + direction * step * tf.sign(grad)
        return i + 1, project(x_adv, images, eps)

    if config.num_steps == 1:
        # The paper's training attack. No loop: XLA:CPU gives its fast (Eigen) convolution only
        # to convolutions of the entry computation in canonical form (ConvCanonicalization
        # visits no loop body), so in a while loop the input-gradient convolutions, whose
        # kernels have their feature dimensions swapped, run on a generic loop nest; the
        # ResNet PGD-1 step measured 1.8-2.4x slower in a one-trip loop (README, XLA).
        _, x_adv = body(tf.constant(0), x_adv)
    elif config.num_steps > 1:
        _, x_adv = tf.while_loop(
            lambda i, _: i < config.num_steps, body, (tf.constant(0), x_adv),
            maximum_iterations=config.num_steps)
    return tf.stop_gradient(x_adv)
