"""Activations: values and derivatives against closed forms written here in NumPy (float64),
numerical safety at |x| = 1e4, the Table 1 backward-rule surgery, smooth_relu's weight, errors
and serialization."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from sat_tf import activations, names
from sat_tf.activations import Activation, backward_rule
from sat_tf.errors import UserError

GRID = np.array([-1e4, -100.0, -20.0, -5.0, -2.0, -1.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 1.0, 2.0,
                 5.0, 20.0, 100.0, 1e4])
SMOOTH_RELU_ALPHA = 20.0**2


# ---- independent truth (float64 NumPy) -------------------------------------------------------

def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _softplus(x):
    return np.logaddexp(0.0, x)


_erf = np.vectorize(math.erf)
_K = math.sqrt(2.0 / math.pi)


def _value(name, x, alpha=None):
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "softplus":
        return _softplus(x)
    if name == "parametric_softplus":
        a = 10.0 if alpha is None else alpha
        return _softplus(a * x) / a
    if name == "silu":
        return x * _sigmoid(x)
    if name == "gelu":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(_K * (x + 0.044715 * x**3)))
    if name in ("elu", "celu"):
        a = 1.0 if alpha is None else alpha
        return np.where(x > 0, x, a * np.expm1(np.minimum(x, 0.0) / a))
    if name == "mish":
        return x * np.tanh(_softplus(x))
    if name == "smooth_relu":
        a = SMOOTH_RELU_ALPHA if alpha is None else alpha
        r = np.maximum(x, 0.0)
        return r - np.log1p(a * r) / a
    raise AssertionError(name)


def _slope(name, x, alpha=None):
    """f'(x); at the kink of relu the subgradient 0 (TensorFlow's convention)."""
    if name == "relu":
        return (x > 0).astype(np.float64)
    if name == "softplus":
        return _sigmoid(x)
    if name == "parametric_softplus":
        return _sigmoid((10.0 if alpha is None else alpha) * x)
    if name == "silu":
        s = _sigmoid(x)
        return s + x * s * (1.0 - s)
    if name == "gelu":
        return 0.5 * (1.0 + _erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(
            2.0 * math.pi)
    if name == "gelu_tanh":
        t = np.tanh(_K * (x + 0.044715 * x**3))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _K * (1.0 + 3.0 * 0.044715 * x * x)
    if name in ("elu", "celu"):
        a = 1.0 if alpha is None else alpha
        return np.where(x > 0, 1.0, np.exp(np.minimum(x, 0.0) / a))
    if name == "mish":
        sp = _softplus(x)
        t = np.tanh(sp)
        return t + x * (1.0 - t * t) * _sigmoid(x)
    if name == "smooth_relu":
        a = SMOOTH_RELU_ALPHA if alpha is None else alpha
        r = np.maximum(x, 0.0)
        return a * r / (1.0 + a * r)
    raise AssertionError(name)


def _value_and_grad(layer, x):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    return y, tape.gradient(y, x)


def _close(actual, expected, rtol=1e-5, atol=1e-5):
    # atol: float32 rounds sech^2 of large arguments to 0 where the truth is ~1e-6.
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ---- the table -------------------------------------------------------------------------------

def test_table_has_every_name_and_the_backward_rules():
    """Adding an activation is its table entry plus its name in sat_tf.names."""
    assert sorted(activations.TABLE) == sorted(names.ACTIVATIONS)
    assert len(names.ACTIVATIONS) == len(set(names.ACTIVATIONS))
    rules = sorted(name for name, spec in activations.TABLE.items() if spec.backward_rule)
    assert rules == sorted(names.BACKWARD_RULES)


def test_table_shape_parameters():
    shaped = {name: spec.default_alpha for name, spec in activations.TABLE.items()
              if spec.default_alpha is not None}
    assert shaped == {"parametric_softplus": 10.0, "celu": 1.0, "smooth_relu": 400.0}
    assert [name for name, spec in activations.TABLE.items() if spec.learnable] == [
        "smooth_relu"]


# ---- values and derivatives ------------------------------------------------------------------

@pytest.mark.parametrize("name", activations.ACTIVATIONS)
def test_value_and_autodiff_match_closed_forms(name):
    y, dy = _value_and_grad(Activation(name), GRID.astype(np.float32))
    _close(y, _value(name, GRID))
    _close(dy, _slope(name, GRID))


@pytest.mark.parametrize("name", activations.ACTIVATIONS)
def test_derivative_function_matches_closed_forms(name):
    d = activations.derivative(name, tf.constant(GRID, tf.float32))
    _close(d, _slope(name, GRID))


@pytest.mark.parametrize("name,alpha", [("parametric_softplus", 3.0), ("celu", 2.0)])
def test_alpha_changes_the_shape(name, alpha):
    y, dy = _value_and_grad(Activation(name, alpha=alpha), GRID.astype(np.float32))
    _close(y, _value(name, GRID, alpha))
    _close(dy, _slope(name, GRID, alpha))
    _close(activations.derivative(name, tf.constant(GRID, tf.float32), alpha=alpha),
           _slope(name, GRID, alpha))


def test_swish_is_silu():
    assert Activation("swish").activation == "silu"
    assert Activation("Swish").activation == "silu"


def test_known_values():
    # A few textbook numbers, as a check on the NumPy truth itself.
    assert _value("silu", np.array(1.0)) == pytest.approx(0.7310585786)
    assert _value("gelu", np.array(1.0)) == pytest.approx(0.8413447461)
    assert _value("mish", np.array(1.0)) == pytest.approx(0.8650983883)
    assert _value("smooth_relu", np.array(1.0)) == pytest.approx(1.0 - math.log(401.0) / 400.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", activations.ACTIVATIONS)
def test_finite_up_to_1e4(name, dtype):
    x = tf.cast(tf.constant(np.concatenate([GRID, np.linspace(-1e4, 1e4, 101)])), dtype)
    layer = Activation(name, dtype=dtype)
    y, dy = _value_and_grad(layer, x)
    assert y.dtype == x.dtype and dy.dtype == x.dtype
    assert np.all(np.isfinite(tf.cast(y, tf.float32).numpy()))
    assert np.all(np.isfinite(tf.cast(dy, tf.float32).numpy()))
    d = activations.derivative(name, x)
    assert np.all(np.isfinite(tf.cast(d, tf.float32).numpy()))
    if name == "smooth_relu":
        with tf.GradientTape() as tape:
            y = layer(x)
        dbeta = tape.gradient(y, layer.beta)
        assert np.isfinite(dbeta.numpy())


# ---- Table 1: ReLU forward, another backward -------------------------------------------------

X = GRID[np.abs(GRID) <= 20].astype(np.float32)


def test_surgery_forward_is_relu_backward_is_parametric_softplus():
    layer = Activation("relu")
    with backward_rule("parametric_softplus"):
        y, dy = _value_and_grad(layer, X)
    np.testing.assert_array_equal(y.numpy(), np.maximum(X, 0.0))
    _close(dy, _sigmoid(10.0 * X.astype(np.float64)))
    # Outside the context the natural gradient is back.
    _, dy = _value_and_grad(layer, X)
    _close(dy, (X > 0).astype(np.float64))


def test_surgery_inside_tf_function_and_nested_natural_rule():
    layer = Activation("relu")
    x = tf.constant(X)

    @tf.function
    def grads():
        # The attacker's and the optimizer's gradient of the same layer, in one trace.
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            with backward_rule("parametric_softplus"):
                y_smooth = layer(x)
                with backward_rule(None):
                    y_natural = layer(x)
        return y_smooth, tape.gradient(y_smooth, x), tape.gradient(y_natural, x)

    y, d_smooth, d_natural = grads()
    np.testing.assert_array_equal(y.numpy(), np.maximum(X, 0.0))
    _close(d_smooth, _sigmoid(10.0 * X.astype(np.float64)))
    _close(d_natural, (X > 0).astype(np.float64))
    assert activations.current_backward_rule() is None


@pytest.mark.parametrize("rule", activations.BACKWARD_RULES)
def test_every_rule_gives_its_derivative(rule):
    with backward_rule(rule):
        y, dy = _value_and_grad(Activation("relu"), X)
    np.testing.assert_array_equal(y.numpy(), np.maximum(X, 0.0))
    _close(dy, _slope(rule, X.astype(np.float64)))


def test_surgery_in_bfloat16_is_finite_and_close():
    layer = Activation("relu", dtype="bfloat16")
    x = tf.cast(tf.constant(X), tf.bfloat16)
    with backward_rule("parametric_softplus"):
        y, dy = _value_and_grad(layer, x)
    assert dy.dtype == tf.bfloat16
    _close(tf.cast(dy, tf.float32), _sigmoid(10.0 * tf.cast(x, tf.float64).numpy()),
           rtol=1e-2, atol=1e-2)


# Multiples of 1/32 in [-4, 4): exact in bfloat16 (8 significant bits).
BF16_X = np.arange(-4.0, 4.0, 1.0 / 32.0)


@pytest.mark.parametrize("rule", activations.BACKWARD_RULES)
def test_bfloat16_backward_rules_are_computed_in_float32(rule):
    """The surrogate derivative for a bfloat16 input is f'(x) computed in float32 and rounded
    once to bfloat16: within half a bfloat16 unit (2**-9 relative) of the float64 truth.
    Computed in bfloat16 itself, sigmoid(10 x) (10 x rounded to 8 bits), 1 - t**2, x (1 - s)
    and the like are off by several units (e.g. silu'(-4) = -3.4e-4 becomes 0)."""
    x = tf.constant(BF16_X, tf.bfloat16)
    np.testing.assert_array_equal(tf.cast(x, tf.float64).numpy(), BF16_X)
    with backward_rule(rule):
        _, dy = _value_and_grad(Activation("relu", dtype="bfloat16"), x)
    assert dy.dtype == tf.bfloat16
    truth = _slope(rule, BF16_X)
    error = np.abs(tf.cast(dy, tf.float64).numpy() - truth)
    bound = 2.0**-8 * np.abs(truth) + 1e-6      # + float32's sigmoid(-38) = 0, not 3e-17
    worst = int(np.argmax(error / bound))
    assert np.all(error <= bound), (BF16_X[worst], truth[worst], error[worst])


def test_surgery_on_smooth_relu_keeps_the_true_beta_gradient():
    layer = Activation("smooth_relu")
    x = tf.constant(X)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        with backward_rule("parametric_softplus"):
            y_rule = layer(x)
        y_natural = layer(x)
    _close(tape.gradient(y_rule, x), _sigmoid(10.0 * X.astype(np.float64)))
    _close(tape.gradient(y_rule, layer.beta), tape.gradient(y_natural, layer.beta).numpy(),
           rtol=1e-5)


def test_unknown_backward_rule():
    with pytest.raises(ValueError, match="bogus.*parametric_softplus"):
        with backward_rule("bogus"):
            pass
    with pytest.raises(ValueError, match="smooth_relu"):
        with backward_rule("smooth_relu"):  # its derivative depends on a learnt weight
            pass


# ---- smooth_relu's weight --------------------------------------------------------------------

def test_smooth_relu_has_one_trainable_beta_per_layer():
    a, b = Activation("smooth_relu"), Activation("smooth_relu")
    x = tf.constant(X)
    a(x), b(x)
    for layer in (a, b):
        assert len(layer.trainable_weights) == 1
        assert len(layer.weights) == 1
        assert layer.trainable_weights[0].path.endswith("beta")
        assert float(layer.beta.numpy()) == 20.0
    assert a.beta is not b.beta
    for name in activations.ACTIVATIONS:
        if name != "smooth_relu":
            layer = Activation(name)
            layer(x)
            assert layer.weights == []


def test_smooth_relu_beta_gradient_matches_finite_difference():
    layer = Activation("smooth_relu")
    x = np.array([-1.0, 0.0, 1e-3, 0.01, 0.1, 1.0, 5.0])
    layer(tf.constant(x, tf.float32))
    layer.beta.assign(3.0)  # a small beta makes the dependence strong
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(layer(tf.constant(x, tf.float32)))
    dbeta = float(tape.gradient(y, layer.beta).numpy())

    def total(beta):
        return float(np.sum(_value("smooth_relu", x, alpha=beta * beta)))

    h = 1e-5
    fd = (total(3.0 + h) - total(3.0 - h)) / (2 * h)
    assert dbeta == pytest.approx(fd, rel=1e-4)
    assert float(np.sum(activations.beta_derivative("smooth_relu", x, 3.0))) == pytest.approx(
        fd, rel=1e-6)


# ---- errors and serialization ----------------------------------------------------------------

def test_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError) as e:
        Activation("leaky_relu")
    msg = str(e.value)
    assert "leaky_relu" in msg and "\n" not in msg
    for name in activations.ACTIVATIONS:
        assert name in msg


def test_alpha_only_where_it_means_something():
    with pytest.raises(UserError, match="'silu'.*parametric_softplus, celu") as e:
        Activation("silu", alpha=2.0)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="'smooth_relu'.*parametric_softplus, celu"):
        Activation("smooth_relu", alpha=2.0)   # its alpha is the learnt beta**2
    with pytest.raises(UserError, match="alpha"):
        Activation("celu", alpha=0.0)
    for fn in (activations.forward, activations.derivative):
        with pytest.raises(UserError, match="'relu'.*parametric_softplus, celu, smooth_relu"):
            fn("relu", tf.constant(X), alpha=2.0)


def test_smooth_relu_alpha_in_the_closed_forms():
    _close(activations.forward("smooth_relu", tf.constant(X), alpha=9.0),
           _value("smooth_relu", X.astype(np.float64), alpha=9.0))
    _close(activations.derivative("smooth_relu", tf.constant(X), alpha=9.0),
           _slope("smooth_relu", X.astype(np.float64), alpha=9.0))


@pytest.mark.parametrize("name,alpha", [("relu", None), ("parametric_softplus", 4.0),
                                        ("smooth_relu", None)])
def test_serialization_round_trip(name, alpha, tmp_path):
    layer = Activation(name, alpha=alpha, name="act")
    clone = Activation.from_config(layer.get_config())
    assert (clone.activation, clone.alpha, clone.name) == (name, alpha, "act")
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(revived, Activation) and revived.activation == name

    # Whole-model save / load keeps the learnt beta.
    inputs = keras.Input((len(X),))
    model = keras.Model(inputs, Activation(name, alpha=alpha, name="act")(inputs))
    if name == "smooth_relu":
        model.get_layer("act").beta.assign(7.0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = X[None, :]
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=0, atol=0)
    if name == "smooth_relu":
        assert float(loaded.get_layer("act").beta.numpy()) == 7.0


def test_silu_backward_reuses_the_forward_sigmoid_and_equals_the_closed_form():
    """The natural SiLU backward is s + y (1 - s) from the forward's own sigmoid: one Sigmoid
    kernel for forward and backward together (TensorFlow's own silu computes it twice), and
    the gradient is the closed-form derivative, also in bfloat16."""
    layer = activations.Activation("silu")
    x = tf.linspace(-12.0, 12.0, 4001)

    @tf.function
    def value_and_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return y, tape.gradient(y, x)

    y, g = value_and_grad(x)
    xs = x.numpy().astype(np.float64)
    sig = 1.0 / (1.0 + np.exp(-xs))
    np.testing.assert_allclose(y, xs * sig, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g, sig * (1.0 + xs * (1.0 - sig)), rtol=1e-5, atol=1e-6)
    graph = value_and_grad.get_concrete_function(x).graph
    ops_by_type = [op.type for op in graph.get_operations()]
    for fn in graph._functions.values():
        ops_by_type += [n.op for n in fn.definition.node_def]
    assert ops_by_type.count("Sigmoid") == 1, ops_by_type
    xb = tf.cast(x, tf.bfloat16)
    yb, gb = value_and_grad(xb)
    assert gb.dtype == tf.bfloat16
    np.testing.assert_allclose(tf.cast(gb, tf.float32), sig * (1.0 + xs * (1.0 - sig)),
                               rtol=2e-2, atol=2e-2)
