"""The model factory: argument errors, input scaling, outputs and gradients of every activation
in every family, mixed precision, smooth_relu's weights, the backward rule through a whole
model, configs and saving."""
import contextlib
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from sat_tf import activations, models
from sat_tf.activations import Activation
from sat_tf.config import ModelConfig

# The smallest member of each family, at 32x32. (ResNeXt with the ImageNet stem: grouped
# convolutions are slow on CPU, and that stem shrinks the maps 4x before them.)
TINY = {
    "resnet": dict(name="resnet-18", image_size=32),
    "resnext": dict(name="resnext-50-32x4d", image_size=32, stem="imagenet"),
    "wrn": dict(name="wrn-10-1", image_size=32),
    "efficientnet": dict(name="efficientnet-b0", image_size=32),
}
IMAGES = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")


def _logits_and_input_grad(model, images, training=False):
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = model(x, training=training)
        loss = tf.reduce_sum(logits * tf.constant([1.0, -2.0, 3.0], logits.dtype))
    return logits, tape.gradient(loss, x)


# ---- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,pattern", [
    (dict(name="resnet-51"), r"resnet-51.*valid models: resnet-18"),
    (dict(name="vgg16"), r"vgg16.*efficientnet-b0"),
    (dict(name="resnet-18", activation="tanh"), r"tanh.*valid activations: relu"),
    (dict(name="resnet-18", num_classes=0), r"num_classes 0"),
    (dict(name="resnet-18", num_classes=-3), r"num_classes -3"),
    (dict(name="resnet-18", num_classes=2.5), r"num_classes 2.5"),
    (dict(name="resnet-18", num_classes=True), r"num_classes True"),
    (dict(name="resnet-50", image_size=16, stem="imagenet"), r"image_size 16.*at least 32x32"),
    (dict(name="resnet-50", image_size=4), r"image_size 4.*cifar stem.*at least 8x8"),
    (dict(name="efficientnet-b0", image_size=31), r"image_size 31.*at least 32x32"),
    (dict(name="wrn-28-10", image_size=3), r"image_size 3.*at least 4x4"),
    (dict(name="resnet-18", image_size=0), r"image_size 0"),
    (dict(name="resnet-18", normalization="caffe"), r"normalization 'caffe'.*sat, imagenet"),
    (dict(name="resnet-18", stem="deep"), r"stem 'deep'.*imagenet, cifar"),
    (dict(name="efficientnet-b0", stem="cifar"), r"stem 'cifar' for efficientnet-b0"),
    (dict(name="wrn-28-10", stem="imagenet"), r"stem 'imagenet' for wrn-28-10"),
    (dict(name="resnet-18", dropout_rate=1.0), r"dropout_rate 1.0"),
    (dict(name="resnet-18", drop_connect_rate=0.2), r"drop_connect_rate 0.2 for resnet-18"),
    (dict(name="efficientnet-b0", drop_connect_rate=-0.1), r"drop_connect_rate -0.1"),
    (dict(name="resnet-18", bn_momentum=1.0), r"bn_momentum 1.0"),
    (dict(name="resnet-18", bn_epsilon=0.0), r"bn_epsilon 0.0"),
])
def test_bad_arguments_raise_one_line_value_errors(kwargs, pattern):
    with pytest.raises(ValueError) as e:
        models.build_model(**kwargs)
    assert re.search(pattern, str(e.value)), str(e.value)
    assert "\n" not in str(e.value)


def test_default_image_size():
    assert models.default_image_size("resnet-50") == 224
    assert models.default_image_size("resnext-101-32x8d") == 224
    assert models.default_image_size("wrn-34-10") == 32
    assert models.default_image_size("efficientnet-b7") == 600
    assert models.build_model("wrn-10-1").input_shape == (None, 32, 32, 3)
    with pytest.raises(ValueError, match="Unknown model"):
        models.default_image_size("resnet")


# ---- input scaling ---------------------------------------------------------------------------

@pytest.mark.parametrize("normalization", ["sat", "imagenet"])
def test_input_scaling(normalization):
    model = models.build_model("wrn-10-1", num_classes=3, normalization=normalization)
    assert model.inputs[0].name == "images" and model.inputs[0].dtype == "float32"
    first = model.get_layer(f"{normalization}_scaling")
    scaled = keras.Model(model.input, first.output)
    pixels = np.zeros((1, 32, 32, 3), np.float32)
    pixels[0, 0, 0] = 0.0
    pixels[0, 0, 1] = 255.0
    pixels[0, 0, 2] = [0.485 * 255, 0.456 * 255, 0.406 * 255]
    out = scaled(pixels).numpy()[0, 0]
    if normalization == "sat":
        np.testing.assert_allclose(out[0], -1.0, atol=1e-6)
        np.testing.assert_allclose(out[1], 1.0, atol=1e-6)
    else:
        std = np.array([0.229, 0.224, 0.225])
        np.testing.assert_allclose(out[0], -np.array([0.485, 0.456, 0.406]) / std, atol=1e-5)
        np.testing.assert_allclose(out[1], (1 - np.array([0.485, 0.456, 0.406])) / std,
                                   atol=1e-5)
        np.testing.assert_allclose(out[2], 0.0, atol=1e-5)


# ---- every activation in every family --------------------------------------------------------

@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
@pytest.mark.parametrize("family", sorted(TINY))
def test_every_activation_in_every_family(family, activation):
    model = models.build_model(**TINY[family], activation=activation, num_classes=3)
    acts = [l for l in model.layers if isinstance(l, Activation)]
    assert acts and {l.activation for l in acts} == {activation}
    if family == "resnext":
        # Grouped-convolution gradients are slow on CPU: the forward pass here, the gradient
        # once in test_resnext_is_differentiable.
        logits = model(IMAGES, training=False)
    else:
        logits, grad = _logits_and_input_grad(model, IMAGES)
        _assert_useful_gradient(grad)
    assert logits.shape == (2, 3) and logits.dtype == tf.float32
    assert np.all(np.isfinite(logits.numpy()))


def test_resnext_is_differentiable():
    model = models.build_model(**TINY["resnext"], activation="smooth_relu", num_classes=3)
    _, grad = _logits_and_input_grad(model, IMAGES)
    _assert_useful_gradient(grad)


def _assert_useful_gradient(grad):
    """Differentiable with respect to the pixels: a finite, non-zero gradient."""
    g = grad.numpy()
    assert g.shape == IMAGES.shape and np.all(np.isfinite(g)) and np.any(g != 0)


def test_layers_are_named():
    pattern = re.compile(r"images|(sat|imagenet)_scaling|stem_\w+|stage\d+_block\d+_\w+|"
                         r"block\d+_\d+_\w+|head_\w+|final_\w+|avg_pool|dropout|logits")
    for cfg in TINY.values():
        model = models.build_model(**cfg, num_classes=3)
        unnamed = [l.name for l in model.layers if not pattern.fullmatch(l.name)]
        assert not unnamed, unnamed


# ---- mixed precision -------------------------------------------------------------------------

@contextlib.contextmanager
def _policy(name):
    """The Keras global dtype policy ``name`` inside, float32 after (also on errors)."""
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def mixed_bfloat16():
    with _policy("mixed_bfloat16"):
        yield


@pytest.mark.parametrize("family", ["resnet", "wrn", "efficientnet"])
def test_float32_logits_under_mixed_bfloat16(family, mixed_bfloat16):
    model = models.build_model(**TINY[family], activation="smooth_relu", num_classes=3)
    assert model.get_layer("stem_conv").compute_dtype == "bfloat16"
    first_act = next(l for l in model.layers if isinstance(l, Activation))
    assert first_act.output.dtype == "bfloat16"
    assert model.get_layer("logits").compute_dtype == "float32"
    logits, grad = _logits_and_input_grad(model, IMAGES, training=True)
    assert logits.dtype == tf.float32 and np.all(np.isfinite(logits.numpy()))
    assert grad.dtype == tf.float32 and np.all(np.isfinite(grad.numpy()))
    # Weights stay float32.
    assert all(w.dtype == "float32" for w in model.weights)


def test_the_mixed_policy_is_reset_after_use_and_after_errors():
    """What the mixed_bfloat16 fixture does around a test, checked in any test order."""
    assert keras.mixed_precision.global_policy().name == "float32"
    with _policy("mixed_bfloat16"):
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "float32"
    with pytest.raises(RuntimeError, match="a failing test"):
        with _policy("mixed_bfloat16"):
            raise RuntimeError("a failing test")
    assert keras.mixed_precision.global_policy().name == "float32"


# ---- smooth_relu's weights and the backward rule through a model ------------------------------

def test_smooth_relu_one_beta_per_call_site():
    model = models.build_model("resnet-18", activation="smooth_relu", num_classes=10,
                               image_size=32)
    acts = [l for l in model.layers if isinstance(l, Activation)]
    assert len(acts) == 1 + 2 * 8
    assert all(len(l.trainable_weights) == 1 and l.beta.shape == () for l in acts)
    betas = [l.beta for l in acts]
    assert len({id(w) for w in betas}) == len(betas)
    assert all(float(w.numpy()) == 20.0 for w in betas)
    trainable = {id(w) for w in model.trainable_weights}
    assert all(id(w) in trainable for w in betas)
    assert (models.count_params("resnet-18", 10, "smooth_relu", image_size=32)
            == models.count_params("resnet-18", 10, "relu", image_size=32) + len(betas))


@pytest.mark.parametrize("family", ["resnet", "efficientnet"])
def test_backward_rule_reaches_every_activation(family):
    model = models.build_model(**TINY[family], activation="relu", num_classes=3)
    natural_logits, natural = _logits_and_input_grad(model, IMAGES)
    with activations.backward_rule("relu"):
        _, same = _logits_and_input_grad(model, IMAGES)
    np.testing.assert_allclose(same.numpy(), natural.numpy(), rtol=1e-5, atol=1e-9)

    @tf.function
    def smooth():
        with activations.backward_rule("parametric_softplus"):
            return _logits_and_input_grad(model, IMAGES)

    logits, surrogate = smooth()
    np.testing.assert_allclose(logits.numpy(), natural_logits.numpy(), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(surrogate.numpy()))
    assert not np.allclose(surrogate.numpy(), natural.numpy(), rtol=1e-2, atol=0)


# ---- configs and saving ----------------------------------------------------------------------

def test_build_model_from_config():
    cfg = ModelConfig(name="resnet-18", activation="silu")
    model = models.build_model_from_config(cfg, num_classes=10, image_size=32)
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)
    assert model.get_layer("stem_conv").kernel_size == (3, 3)      # CIFAR stem for 32x32
    assert model.get_layer("stem_act").activation == "silu"
    cfg = ModelConfig(name="efficientnet-b0", num_classes=5, image_size=64, bn_momentum=0.99,
                      dropout_rate=0.1)
    model = models.build_model_from_config(cfg, num_classes=1000, image_size=None)
    assert model.input_shape == (None, 64, 64, 3) and model.output_shape == (None, 5)
    assert model.get_layer("dropout").rate == 0.1
    assert model.get_layer("stem_bn").momentum == 0.99
    default = models.build_model_from_config(ModelConfig(name="efficientnet-b1"),
                                             num_classes=4, image_size=None)
    assert default.input_shape == (None, 240, 240, 3)
    assert default.get_layer("dropout").rate == 0.2


def test_save_and_load(tmp_path):
    model = models.build_model("wrn-10-1", activation="smooth_relu", num_classes=3)
    model.get_layer("stage1_block1_act1").beta.assign(5.0)
    path = str(tmp_path / "wrn.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded(IMAGES, training=False).numpy(),
                                  model(IMAGES, training=False).numpy())
    assert float(loaded.get_layer("stage1_block1_act1").beta.numpy()) == 5.0
