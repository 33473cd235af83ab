"""Smooth activations, and a separately choosable backward rule (the paper's Table 1).

Every activation in a sat-tf model is an :class:`Activation` layer. Its forward function is
fixed when the model is built (``Activation("relu")``). Its *backward* function is normally the
true derivative of the forward function, but code that computes gradients can ask for another
one while it traces the model::

    with activations.backward_rule("parametric_softplus"):
        logits = model(images, training=False)     # forward is still ReLU ...
    grads = tape.gradient(loss, images)            # ... the gradient uses sigmoid(10 x)

The rule is read when the layer is *called* (at trace time inside a ``tf.function``), so the
attack and the weight update of the same model, in the same step, can each enter their own
rule. Models never look at attacks; attacks and the trainer only enter this context.

Everything here is pure Keras 3 (``keras.ops``), so it also runs under the JAX backend.
"""
from __future__ import annotations

import contextlib
import math
import threading

import keras
from keras import ops

from sat_tf.names import ACTIVATIONS, BACKWARD_RULES  # noqa: F401  (re-exported)
from sat_tf.names import activation as canonical_name
from sat_tf.names import backward_rule as canonical_backward

PARAMETRIC_SOFTPLUS_ALPHA = 10.0
SMOOTH_RELU_BETA_INIT = 20.0
CELU_ALPHA = 1.0


# --------------------------------------------------------------------------------------------
# The backward-rule context.

_state = threading.local()


def current_backward_rule() -> str | None:
    """The backward rule the innermost :func:`backward_rule` context asked for (or None)."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def backward_rule(name: str | None):
    """Within this context, activation layers *called* use ``name``'s derivative backward.

    ``None`` (or "natural") restores the true derivative, also inside an outer context.
    """
    rule = canonical_backward(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(rule)
    try:
        yield rule
    finally:
        stack.pop()


# --------------------------------------------------------------------------------------------
# Forward functions and their derivatives (closed forms, in the input's dtype).

def _gelu_tanh_inner(x):
    return math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)


def forward(name: str, x, *, alpha: float | None = None):
    """f(x) for an activation of fixed shape (not smooth_relu, which owns a weight)."""
    name = canonical_name(name)
    if name == "relu":
        return ops.relu(x)
    if name == "softplus":
        return ops.softplus(x)
    if name == "parametric_softplus":
        a = PARAMETRIC_SOFTPLUS_ALPHA if alpha is None else alpha
        return ops.softplus(a * x) / a
    if name == "silu":
        return ops.silu(x)
    if name == "gelu":
        return ops.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return ops.gelu(x, approximate=True)
    if name == "elu":
        return ops.elu(x)
    if name == "celu":
        a = CELU_ALPHA if alpha is None else alpha
        return a * ops.elu(x / a)
    if name == "mish":
        return x * ops.tanh(ops.softplus(x))
    if name == "smooth_relu":
        a = (SMOOTH_RELU_BETA_INIT**2) if alpha is None else alpha
        return smooth_relu(x, a)
    raise AssertionError(name)


def smooth_relu(x, alpha):
    """x - log(alpha x + 1) / alpha for x >= 0, else 0 (written on relu(x): NaN-free)."""
    r = ops.relu(x)
    return r - ops.log1p(alpha * r) / alpha


def derivative(name: str, x, *, alpha: float | None = None):
    """f'(x) in closed form (relu'(0) = 0, as TensorFlow defines it)."""
    name = canonical_name(name)
    zero = ops.zeros_like(x)
    if name == "relu":
        return ops.cast(x > 0, x.dtype)
    if name == "softplus":
        return ops.sigmoid(x)
    if name == "parametric_softplus":
        a = PARAMETRIC_SOFTPLUS_ALPHA if alpha is None else alpha
        return ops.sigmoid(a * x)
    if name == "silu":
        s = ops.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    if name == "gelu":
        cdf = 0.5 * (1.0 + ops.erf(x / math.sqrt(2.0)))
        pdf = ops.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        return cdf + x * pdf
    if name == "gelu_tanh":
        t = ops.tanh(_gelu_tanh_inner(x))
        du = math.sqrt(2.0 / math.pi) * (1.0 + 3.0 * 0.044715 * x * x)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    if name == "elu":
        return ops.where(x > 0, ops.ones_like(x), ops.exp(ops.minimum(x, zero)))
    if name == "celu":
        a = CELU_ALPHA if alpha is None else alpha
        return ops.where(x > 0, ops.ones_like(x), ops.exp(ops.minimum(x, zero) / a))
    if name == "mish":
        sp = ops.softplus(x)
        t = ops.tanh(sp)
        return t + x * (1.0 - t * t) * ops.sigmoid(x)
    if name == "smooth_relu":
        a = (SMOOTH_RELU_BETA_INIT**2) if alpha is None else alpha
        r = ops.relu(x)
        return ops.where(x > 0, a * r / (a * r + 1.0), zero)
    raise AssertionError(name)


def smooth_relu_dbeta(x, beta):
    """d/dbeta of smooth_relu(x, beta**2) (alpha = beta**2), in closed form."""
    a = beta * beta
    r = ops.relu(x)
    d_alpha = ops.log1p(a * r) / (a * a) - r / (a * (a * r + 1.0))
    return 2.0 * beta * d_alpha


def with_backward(forward_fn, rule: str):
    """Wraps y = forward_fn(x) so that dy/dx is ``derivative(rule, x)`` instead."""

    @ops.custom_gradient
    def fn(x):
        y = forward_fn(x)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return upstream * _surrogate(rule, x, upstream.dtype)

        return y, grad

    return fn


def smooth_relu_with_backward(rule: str):
    """smooth_relu(x, beta**2) with dy/dx = ``derivative(rule, x)`` and the true dy/dbeta.

    beta is an explicit input (a tensor, not the layer's variable), so that no variable is
    read inside the custom-gradient function.
    """

    @ops.custom_gradient
    def fn(x, beta):
        y = smooth_relu(x, beta * beta)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            dx = upstream * _surrogate(rule, x, upstream.dtype)
            up32 = ops.cast(upstream, "float32")
            x32, beta32 = ops.cast(x, "float32"), ops.cast(beta, "float32")
            dbeta = ops.sum(up32 * smooth_relu_dbeta(x32, beta32))
            return dx, ops.cast(dbeta, beta.dtype)

        return y, grad

    return fn


def _surrogate(rule, x, dtype):
    # The surrogate derivative is evaluated in float32 for bfloat16 / float16 inputs.
    return ops.cast(derivative(rule, ops.cast(x, "float32")), dtype)


# --------------------------------------------------------------------------------------------
# The layer.

@keras.saving.register_keras_serializable(package="sat_tf")
class Activation(keras.layers.Layer):
    """An activation call site: forward ``activation``; backward from the active rule.

    ``smooth_relu`` owns one learnable scalar ``beta`` (alpha = beta**2, beta initialised to 20),
    so every call site is its own layer with its own weight. ``alpha`` overrides the shape
    parameter of parametric_softplus (default 10) and celu (default 1).
    """

    def __init__(self, activation: str = "relu", alpha: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.activation = canonical_name(activation)
        if alpha is not None and self.activation not in ("parametric_softplus", "celu"):
            raise ValueError(
                f"alpha={alpha!r} was given for activation {self.activation!r}; only "
                "parametric_softplus and celu take alpha.")
        if alpha is not None and not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}.")
        self.alpha = alpha
        self.beta = None

    def build(self, input_shape):
        if self.activation == "smooth_relu":
            self.beta = self.add_weight(
                name="beta",
                shape=(),
                initializer=keras.initializers.Constant(SMOOTH_RELU_BETA_INIT),
                trainable=True,
            )

    def _forward(self, x):
        return forward(self.activation, x, alpha=self.alpha)

    def call(self, x):
        rule = current_backward_rule()
        if self.activation == "smooth_relu":
            beta = ops.cast(ops.convert_to_tensor(self.beta), x.dtype)
            if rule is None:
                return smooth_relu(x, beta * beta)
            return smooth_relu_with_backward(rule)(x, beta)
        if rule is None:
            return self._forward(x)
        return with_backward(self._forward, rule)(x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"activation": self.activation, "alpha": self.alpha})
        return config


def get(name: str, **kwargs) -> Activation:
    """A new activation layer by name (a ValueError lists the valid names)."""
    return Activation(name, **kwargs)
