"""One replica's training step (DESIGN.md §3, §5): attack, loss and gradients, the update, the
batch-norm statistics shared across replicas, the EMA.

Per replica, under ``strategy.run``:

1. attack the batch: ``attacks.pgd`` with ``Experiment.train_attack`` (batch norm in inference
   mode, the attacker's backward rule) — skipped when ``TrainConfig.adversarial`` is False;
2. forward the (adversarial) images with ``training=True`` inside
   ``activations.backward_rule(TrainConfig.optimizer_backward)`` (Table 1's optimizer arm);
3. loss = label-smoothed cross-entropy summed over the replica's examples / global batch
   + ``weight_decay * 0.5 * sum(w^2)`` / replicas, over the weights
   ``OptimizerConfig.weight_decay_scope`` selects by layer type
   (:func:`sat_tf.model_weights.decayed_weights`);
4. gradients (summed over replicas by the optimizer) -> optimizer; the batch-norm moving
   statistics are averaged over replicas (Keras 3 lets each replica keep its own copy);
   the exponential moving average of the weights is updated.

The step returns its logs as a dict (:data:`LOGS`); the trainer owns the loop around it.
"""
from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from sat_tf import activations, attacks
from sat_tf.config import Experiment
from sat_tf.ema import ExponentialMovingAverage
from sat_tf.model_weights import batch_norm_statistics, decayed_weights, random_generator_states

# What a step reports, summed over replicas and steps by the trainer: the loss (this replica's
# share of the global loss), correct predictions and examples on the training images, the same
# on the clean images when measured, and 1.0 when the loss was NaN or Inf.
LOGS = ("loss", "correct", "examples", "clean_correct", "clean_examples", "nonfinite")

_REPLICA_SEED_STRIDE = 0x9E3779B97F4A7C15 >> 1    # an odd constant: replica r shifts by r x it


class TrainStep:
    """The training step of one replica, as a function of the batch and the step number.

    Args:
      model, optimizer: built in the strategy's scope.
      experiment: the resolved run (its ``train`` and ``train_attack`` sections).
      num_classes: of the model's head.
      num_replicas: replicas in sync (the loss is each replica's share).
      ema: the run's :class:`~sat_tf.ema.ExponentialMovingAverage`, updated after each step.
      example_images: how many (clean | attacked) pairs a measured step returns.
      jit_compile: compile the attack, forward and backward pass with XLA.
      loss_scaling: ``mixed_float16``: the gradients are of the optimizer's scaled loss.
    """

    def __init__(self, model: keras.Model, optimizer, *, experiment: Experiment,
                 num_classes: int, num_replicas: int,
                 ema: ExponentialMovingAverage | None = None, example_images: int = 0,
                 jit_compile: bool = False, loss_scaling: bool = False):
        self.model, self.optimizer, self.ema = model, optimizer, ema
        self.train_cfg = experiment.train
        self.optimizer_cfg = experiment.optimizer
        self.train_attack = experiment.train_attack
        self.num_classes = num_classes
        self.num_replicas = num_replicas
        self.global_batch_size = experiment.train.global_batch_size
        self.example_images = example_images
        self._loss_scaling = loss_scaling
        self._decayed = decayed_weights(model, experiment.optimizer.weight_decay_scope)
        self._bn_statistics = batch_norm_statistics(model)
        self.rng_states = random_generator_states(model)
        self.forward_backward = tf.function(self._forward_backward,
                                            jit_compile=jit_compile or None)

    def attack(self, images, labels, seed):
        """The images the weights train on: ``attacks.pgd`` with ``train_attack`` (batch norm
        in inference mode, the attacker's backward rule), or ``images`` in clean mode."""
        if not self.train_cfg.adversarial:
            return tf.convert_to_tensor(images, tf.float32)
        return attacks.pgd(self.model, images, labels, self.train_attack, seed=seed)

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
                    + self.optimizer_cfg.weight_decay * l2_loss(self._decayed) / self.num_replicas)
            scaled = self.optimizer.scale_loss(loss) if self._loss_scaling else loss
        return loss, logits, tape.gradient(scaled, self.model.trainable_variables)

    def _forward_backward(self, images, labels, seed, measure):
        """(gradients, logs) of one replica's batch: attack, forward, loss and gradients (may
        be XLA-compiled). With ``measure`` also the clean accuracy (one more forward pass) and
        ``example_images`` (clean | attacked) pairs side by side."""
        labels = tf.cast(labels, tf.int32)
        inputs = self.attack(images, labels, seed)
        loss, logits, grads = self.loss_and_gradients(inputs, labels)
        k = self.example_images

        def measure_clean():
            clean_logits = tf.cast(self.model(images, training=False), tf.float32)
            pair = tf.concat([images[:k], inputs[:k]], axis=2)
            return (_correct(clean_logits, labels), tf.cast(tf.shape(labels)[0], tf.float32),
                    pair)

        def skip():
            return (tf.constant(0.0), tf.constant(0.0),
                    tf.zeros([k, images.shape[1], 2 * images.shape[2], 3]))

        clean, clean_examples, pair = tf.cond(measure, measure_clean, skip)
        return grads, {
            "loss": loss, "correct": _correct(logits, labels),
            "examples": tf.cast(tf.shape(labels)[0], tf.float32),
            "clean_correct": clean, "clean_examples": clean_examples,
            "nonfinite": tf.cast(tf.logical_not(tf.math.is_finite(loss)), tf.float32),
            "example_images": pair}

    def __call__(self, images, labels, step, measure) -> dict:
        """Step number ``step`` (before its increment) on this replica's batch, in replica
        context: the update, the shared batch-norm statistics and the EMA. Returns the
        :data:`LOGS` and ``example_images``."""
        ctx = tf.distribute.get_replica_context()
        seed = tf.random.experimental.stateless_fold_in(
            tf.stack([tf.constant(self.train_cfg.seed, tf.int64), step]),
            ctx.replica_id_in_sync_group, alg=attacks.RNG_ALG)
        with replica_random_streams(self.rng_states, ctx.replica_id_in_sync_group):
            grads, logs = self.forward_backward(images, labels, seed, measure)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        if self.num_replicas > 1 and self._bn_statistics:
            means = ctx.all_reduce(tf.distribute.ReduceOp.MEAN,
                                   [_on_own_device(v) for v in self._bn_statistics])
            for v, m in zip(self._bn_statistics, means):
                v.assign(m)
        if self.ema is not None:
            self.ema.update(step)
        return logs


def _correct(logits, labels):
    return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels),
                                 tf.float32))


def l2_loss(weights) -> tf.Tensor:
    """0.5 * sum of squares (``tf.nn.l2_loss``), summed over ``weights``, in float32."""
    return tf.add_n([tf.nn.l2_loss(tf.cast(w, tf.float32)) for w in weights]) if weights else (
        tf.constant(0.0))


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
