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

Each activation is one entry of :data:`TABLE` (its closed forms and shape parameter), which
``forward``, ``derivative``, the layer and the backward rules all read. Adding one is that entry
plus its name in :data:`sat_tf.names.ACTIVATIONS`; a test checks that the two agree.

Everything here is pure Keras 3 (``keras.ops``), so it also runs under the JAX backend.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Callable

import keras
from keras import ops

from sat_tf.errors import UserError
from sat_tf.names import ACTIVATIONS, BACKWARD_RULES  # noqa: F401  (re-exported)
from sat_tf.names import activation as canonical_name
from sat_tf.names import backward_rule as canonical_backward


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
# The activations: closed forms (in the input's dtype) and the facts the layer needs.

@dataclasses.dataclass(frozen=True)
class Spec:
    """One activation: an entry of :data:`TABLE`.

    ``forward(x, alpha)`` is f(x) and ``derivative(x, alpha)`` is f'(x), in closed form and in
    x's dtype; ``alpha`` is the shape parameter (activations of one fixed shape ignore it).
    """

    forward: Callable
    derivative: Callable
    alpha: float | None = None       # a family of shapes: the default alpha, which the layer
                                     # lets the model builder override
    beta: float | None = None        # a learnt shape (alpha = beta**2, one beta per call site):
                                     # beta's initial value
    d_alpha: Callable | None = None  # a learnt shape: df/dalpha(x, alpha) in closed form
    # (x, alpha) -> (f(x), its gradient function): the forward pass and a backward pass that
    # reuses what the forward computed, where that takes fewer kernels than the framework's
    # own derivative (the natural backward only; a backward rule uses ``derivative``).
    with_gradient: Callable | None = None

    @property
    def learnable(self) -> bool:
        return self.beta is not None

    @property
    def default_alpha(self) -> float | None:
        """The alpha that :func:`forward` and :func:`derivative` use when given none."""
        return self.beta * self.beta if self.learnable else self.alpha

    @property
    def backward_rule(self) -> bool:
        """Whether a backward pass may be switched to this derivative: it is a function of x
        alone (a learnt shape's depends on its call site's beta)."""
        return not self.learnable


def _relu_derivative(x, _):
    return ops.cast(x > 0, x.dtype)


def _silu_derivative(x, _):
    s = ops.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _silu_with_gradient(x, _):
    """silu and its gradient from the forward pass's own sigmoid s and output y = x s:
    f' = s + y (1 - s). Two kernels forward and four backward, where TensorFlow's silu
    computes the sigmoid again and also differentiates its (constant) beta."""
    s = ops.sigmoid(x)
    y = x * s

    def grad(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        return upstream * (s + y * (1.0 - s))

    return y, grad


def _gelu_derivative(x, _):
    cdf = 0.5 * (1.0 + ops.erf(x / math.sqrt(2.0)))
    pdf = ops.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return cdf + x * pdf


def _gelu_tanh_derivative(x, _):
    t = ops.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x))
    du = math.sqrt(2.0 / math.pi) * (1.0 + 3.0 * 0.044715 * x * x)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du


def _celu(x, a):
    return a * ops.elu(x / a)


def _elu_derivative(x, _):
    return ops.where(x > 0, ops.ones_like(x), ops.exp(ops.minimum(x, ops.zeros_like(x))))


def _celu_derivative(x, a):
    return ops.where(x > 0, ops.ones_like(x), ops.exp(ops.minimum(x, ops.zeros_like(x)) / a))


def _mish_derivative(x, _):
    sp = ops.softplus(x)
    t = ops.tanh(sp)
    return t + x * (1.0 - t * t) * ops.sigmoid(x)


def smooth_relu(x, alpha):
    """x - log(alpha x + 1) / alpha for x >= 0, else 0 (written on relu(x): NaN-free)."""
    r = ops.relu(x)
    return r - ops.log1p(alpha * r) / alpha


def _smooth_relu_derivative(x, a):
    r = ops.relu(x)
    return ops.where(x > 0, a * r / (a * r + 1.0), ops.zeros_like(x))


def _smooth_relu_d_alpha(x, a):
    r = ops.relu(x)
    return ops.log1p(a * r) / (a * a) - r / (a * (a * r + 1.0))


TABLE: dict[str, Spec] = {
    "relu": Spec(lambda x, _: ops.relu(x), _relu_derivative),
    "softplus": Spec(lambda x, _: ops.softplus(x), lambda x, _: ops.sigmoid(x)),
    "parametric_softplus": Spec(lambda x, a: ops.softplus(a * x) / a,
                                lambda x, a: ops.sigmoid(a * x), alpha=10.0),
    "silu": Spec(lambda x, _: ops.silu(x), _silu_derivative,
                 with_gradient=_silu_with_gradient),
    "gelu": Spec(lambda x, _: ops.gelu(x, approximate=False), _gelu_derivative),
    "gelu_tanh": Spec(lambda x, _: ops.gelu(x, approximate=True), _gelu_tanh_derivative),
    "elu": Spec(lambda x, _: ops.elu(x), _elu_derivative),
    "celu": Spec(_celu, _celu_derivative, alpha=1.0),
    "mish": Spec(lambda x, _: x * ops.tanh(ops.softplus(x)), _mish_derivative),
    "smooth_relu": Spec(smooth_relu, _smooth_relu_derivative, beta=20.0,
                        d_alpha=_smooth_relu_d_alpha),
}


def _alpha(name: str, alpha: float | None) -> float | None:
    """``alpha``, or ``name``'s default; a UserError if ``name`` has no shape parameter."""
    default = TABLE[name].default_alpha
    if alpha is None:
        return default
    if default is None:
        shaped = ", ".join(n for n, spec in TABLE.items() if spec.default_alpha is not None)
        raise UserError(f"alpha={alpha!r} was given for activation {name!r}, which has no "
                        f"shape parameter; activations with one: {shaped}.")
    return alpha


def forward(name: str, x, *, alpha: float | None = None):
    """f(x); a learnt shape (smooth_relu) at its initial beta unless ``alpha`` is given."""
    name = canonical_name(name)
    return TABLE[name].forward(x, _alpha(name, alpha))


def derivative(name: str, x, *, alpha: float | None = None):
    """f'(x) in closed form (relu'(0) = 0, as TensorFlow defines it)."""
    name = canonical_name(name)
    return TABLE[name].derivative(x, _alpha(name, alpha))


def beta_derivative(name: str, x, beta):
    """d/dbeta of f(x) with the learnt shape alpha = beta**2, in closed form."""
    return 2.0 * beta * TABLE[canonical_name(name)].d_alpha(x, beta * beta)


# --------------------------------------------------------------------------------------------
# Backward surgery.

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


def learnt_with_backward(name: str, rule: str):
    """f(x) of a learnt shape, alpha = beta**2, with dy/dx = ``derivative(rule, x)`` and the
    true dy/dbeta.

    beta is an explicit input (a tensor, not the layer's variable), so that no variable is
    read inside the custom-gradient function.
    """
    spec = TABLE[name]

    @ops.custom_gradient
    def fn(x, beta):
        y = spec.forward(x, beta * beta)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            dx = upstream * _surrogate(rule, x, upstream.dtype)
            up32 = ops.cast(upstream, "float32")
            x32, beta32 = ops.cast(x, "float32"), ops.cast(beta, "float32")
            dbeta = ops.sum(up32 * beta_derivative(name, x32, beta32))
            return dx, ops.cast(dbeta, beta.dtype)

        return y, grad

    return fn


def _natural(spec: Spec, alpha):
    """f(x) with the true derivative, computed by ``spec.with_gradient``."""

    @ops.custom_gradient
    def fn(x):
        return spec.with_gradient(x, alpha)

    return fn


def _surrogate(rule, x, dtype):
    # The surrogate derivative is evaluated in float32 for bfloat16 / float16 inputs.
    return ops.cast(derivative(rule, ops.cast(x, "float32")), dtype)


# --------------------------------------------------------------------------------------------
# The layer.

@keras.saving.register_keras_serializable(package="sat_tf")
class Activation(keras.layers.Layer):
    """An activation call site: forward ``activation``; backward from the active rule.

    An activation with a learnt shape (smooth_relu: alpha = beta**2, beta initialised to 20)
    owns one learnable scalar ``beta``, so every call site is its own layer with its own
    weight. ``alpha`` overrides the default shape of a family (parametric_softplus: 10,
    celu: 1).
    """

    def __init__(self, activation: str = "relu", alpha: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.activation = canonical_name(activation)
        if alpha is not None and TABLE[self.activation].alpha is None:
            takers = ", ".join(n for n, spec in TABLE.items() if spec.alpha is not None)
            raise UserError(f"alpha={alpha!r} was given for activation {self.activation!r}; "
                            f"activations that take alpha: {takers}.")
        if alpha is not None and not alpha > 0:
            raise UserError(f"alpha must be positive, got {alpha!r}.")
        self.alpha = alpha
        self.beta = None

    def build(self, input_shape):
        spec = TABLE[self.activation]
        if spec.learnable:
            self.beta = self.add_weight(
                name="beta",
                shape=(),
                initializer=keras.initializers.Constant(spec.beta),
                trainable=True,
            )

    def _forward(self, x):
        return forward(self.activation, x, alpha=self.alpha)

    def call(self, x):
        rule = current_backward_rule()
        spec = TABLE[self.activation]
        if spec.learnable:
            beta = ops.cast(ops.convert_to_tensor(self.beta), x.dtype)
            if rule is None:
                return spec.forward(x, beta * beta)
            return learnt_with_backward(self.activation, rule)(x, beta)
        if rule is None:
            if spec.with_gradient is not None:
                return _natural(spec, _alpha(self.activation, self.alpha))(x)
            return self._forward(x)
        return with_backward(self._forward, rule)(x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"activation": self.activation, "alpha": self.alpha})
        return config
