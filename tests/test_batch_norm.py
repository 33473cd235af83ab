"""Batch normalization on the fused kernel: the same outputs, gradients, moving statistics,
weights and checkpoints as Keras' own layer (issue 12)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from sat_tf.batch_norm import BatchNormalization

SHAPE = (4, 6, 5, 8)


def _pair(**kwargs):
    """Keras' layer and ours, built alike with the same non-trivial weights."""
    ours, theirs = BatchNormalization(**kwargs), keras.layers.BatchNormalization(**kwargs)
    for layer in (ours, theirs):
        layer.build(SHAPE)
    rng = np.random.default_rng(0)
    values = [rng.normal(1.0, 0.3, SHAPE[-1]), rng.normal(0.0, 0.3, SHAPE[-1]),
              rng.normal(0.5, 0.2, SHAPE[-1]), rng.uniform(0.5, 2.0, SHAPE[-1])]
    for layer in (ours, theirs):
        layer.set_weights([v.astype("float32") for v in values])
    return ours, theirs


def _inputs(dtype="float32"):
    x = tf.random.stateless_normal(SHAPE, [1, 2], mean=3.0, stddev=2.0)
    return tf.cast(x, dtype)


@pytest.mark.parametrize("training", [True, False])
def test_outputs_and_gradients_equal_keras(training):
    ours, theirs = _pair(momentum=0.9, epsilon=1e-5)
    x = _inputs()
    weights = tf.random.stateless_normal(SHAPE, [5, 6])
    results = []
    for layer in (ours, theirs):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
            loss = tf.reduce_sum(y * weights)   # a loss whose gradient is not ~0
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append((y, grads, [v.numpy() for v in layer.non_trainable_weights]))
    (y1, g1, s1), (y2, g2, s2) = results
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # The moving statistics: updated alike in training (biased variance), untouched otherwise.
    for a, b in zip(s1, s2):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_training_updates_the_moving_statistics_with_the_biased_variance():
    layer = BatchNormalization(momentum=0.75, epsilon=1e-3)
    layer.build(SHAPE)
    x = _inputs()
    y = layer(x, training=True)
    axes = (0, 1, 2)
    mean, var = np.mean(x, axes), np.var(x, axes)          # NumPy's var is the biased one
    np.testing.assert_allclose(layer.moving_mean, 0.25 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, 0.75 + 0.25 * var, rtol=1e-5)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-3), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_computes_in_float32_and_returns_the_compute_dtype(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        ours, theirs = _pair()
        x = _inputs(policy.split("_")[1])
        for training in (True, False):
            a, b = ours(x, training=training), theirs(x, training=training)
            assert a.dtype == b.dtype == x.dtype
            np.testing.assert_allclose(np.asarray(tf.cast(a, tf.float32)),
                                       np.asarray(tf.cast(b, tf.float32)), rtol=2e-2, atol=2e-2)
        assert ours.moving_mean.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_inside_xla_and_tf_function():
    ours, theirs = _pair()
    x = _inputs()
    step = tf.function(lambda v: ours(v, training=True), jit_compile=True)
    np.testing.assert_allclose(step(x), theirs(x, training=True), rtol=1e-5, atol=1e-5)


def test_other_shapes_and_options_fall_back_to_keras():
    for kwargs, shape in (({}, (4, 8)), ({"center": False}, SHAPE), ({"axis": 1}, SHAPE)):
        ours, theirs = BatchNormalization(**kwargs), keras.layers.BatchNormalization(**kwargs)
        x = tf.random.stateless_normal(shape, [3, 4])
        np.testing.assert_allclose(ours(x, training=True), theirs(x, training=True),
                                   rtol=1e-5, atol=1e-5)


def test_same_weights_checkpoint_and_serialization_as_keras(tmp_path):
    ours, theirs = _pair()
    assert [w.path.split("/")[-1] for w in ours.weights] == [
        w.path.split("/")[-1] for w in theirs.weights]
    path = tf.train.Checkpoint(layer=theirs).save(str(tmp_path / "ckpt"))
    fresh = BatchNormalization()
    fresh.build(SHAPE)
    tf.train.Checkpoint(layer=fresh).restore(path).assert_existing_objects_matched()
    for a, b in zip(fresh.weights, theirs.weights):
        np.testing.assert_array_equal(a, b)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(ours))
    assert type(again) is BatchNormalization and again.get_config() == ours.get_config()
