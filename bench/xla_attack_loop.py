"""Why a PGD step costs more under XLA on the CPU: a plain Keras ResNet, no sat-tf code.

    python bench/xla_attack_loop.py                          # Keras on TensorFlow (tf.while_loop)
    KERAS_BACKEND=jax python bench/xla_attack_loop.py        # the same on JAX (lax.fori_loop)

Times one L-infinity PGD step (inference-mode batch norm, the input gradient, sign step,
projection), XLA-compiled, written two ways: inside a ``--steps``-trip graph loop, and
unrolled in Python. It also compiles both with XLA's HLO dump on and counts, in each optimized
module, the convolutions whose kernel is not in the HWIO order that XLA:CPU's Eigen convolution
requires (``dim_labels=..._01oi->...``: the input-gradient convolutions, whose kernel has its
feature dimensions swapped). XLA:CPU's ConvCanonicalization pass rewrites such convolutions to
the canonical form only in the entry computation, so inside a loop body they stay on XLA's
generic loop nest. ``--model=resnet18`` (3x3 convolutions, the README's case) or ``resnet50``
(keras.applications; mostly 1x1 convolutions, where the effect is smaller or reversed).
"""
from __future__ import annotations

import glob
import os
import re
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "resnet18", ["resnet18", "resnet50"], "Plain Keras network.")
flags.DEFINE_integer("image_size", 32, "Image size.")
flags.DEFINE_integer("batch_size", 16, "Batch size.")
flags.DEFINE_integer("steps", 1, "PGD steps (loop trips / unrolled copies).")
flags.DEFINE_integer("repeats", 5, "Timed rounds (the fastest is kept).")


def _resnet18(keras, size):
    """CIFAR-style ResNet-18 (post-activation basic blocks) in plain Keras layers."""
    L = keras.layers
    inp = keras.Input((size, size, 3))
    h = L.ReLU()(L.BatchNormalization()(L.Conv2D(64, 3, padding="same", use_bias=False)(inp)))
    for stage, filters in enumerate([64, 128, 256, 512]):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            r = L.Conv2D(filters, 3, stride, padding="same", use_bias=False)(h)
            r = L.ReLU()(L.BatchNormalization()(r))
            r = L.BatchNormalization()(L.Conv2D(filters, 3, padding="same", use_bias=False)(r))
            if stride != 1 or h.shape[-1] != filters:
                h = L.BatchNormalization()(L.Conv2D(filters, 1, stride, use_bias=False)(h))
            h = L.ReLU()(L.Add()([h, r]))
    return keras.Model(inp, L.Dense(10)(L.GlobalAveragePooling2D()(h)))


def _functions(keras, model, x0, y0, k):
    """(loop, unrolled, run) for the backend: run(f) computes f and waits for it."""
    import numpy as np
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        x, y = tf.constant(x0), tf.constant(y0)

        def step(a):
            with tf.GradientTape() as tape:
                tape.watch(a)
                loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    y, model(a, training=False)))
            return tf.clip_by_value(a + 4.0 * tf.sign(tape.gradient(loss, a)), x - 4, x + 4)

        def loop():
            return tf.while_loop(lambda i, _: i < k, lambda i, a: (i + 1, step(a)), (0, x),
                                 maximum_iterations=k)[1]

        def unrolled():
            a = x
            for _ in range(k):
                a = step(a)
            return a
        return (tf.function(loop, jit_compile=True), tf.function(unrolled, jit_compile=True),
                lambda f: f().numpy())
    import jax
    import jax.numpy as jnp
    # Arguments, not captured constants: XLA would fold a constant network at compile time.
    args = ([v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables], jnp.asarray(x0), jnp.asarray(y0))

    def step(trainable, fixed, x, y, a):
        def loss(a):
            logits, _ = model.stateless_call(trainable, fixed, a, training=False)
            return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
        return jnp.clip(a + 4.0 * jnp.sign(jax.grad(loss)(a)), x - 4, x + 4)

    def loop(trainable, fixed, x, y):
        return jax.lax.fori_loop(0, k, lambda i, a: step(trainable, fixed, x, y, a), x)

    def unrolled(trainable, fixed, x, y):
        a = x
        for _ in range(k):
            a = step(trainable, fixed, x, y, a)
        return a
    return jax.jit(loop), jax.jit(unrolled), lambda f: np.asarray(f(*args))


def _conv_layouts(dump_dir):
    """{module file: (canonical HWIO-kernel convolutions, others)} of the optimized HLO."""
    out = {}
    for path in glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")):
        labels = re.findall(r" convolution\(.*?dim_labels=([^,\s]+)", open(path).read())
        if labels:
            hwio = sum(lab.split("_")[1].startswith("01io") for lab in labels)
            out[os.path.basename(path)] = (hwio, len(labels) - hwio)
    return out


def main(argv):
    del argv
    dump = tempfile.mkdtemp(prefix="xla_dump_")
    # XLA reads its flags once, when the backend loads: set them before importing Keras.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={dump} --xla_dump_hlo_as_text").strip()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    size, b, k = FLAGS.image_size, FLAGS.batch_size, FLAGS.steps
    model = _resnet18(keras, size) if FLAGS.model == "resnet18" else \
        keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classes=10,
                                    classifier_activation=None)
    rng = np.random.default_rng(0)
    x0 = rng.uniform(0, 255, (b, size, size, 3)).astype("float32")
    y0 = rng.integers(0, 10, (b,)).astype("int32")
    loop, unrolled, run = _functions(keras, model, x0, y0, k)
    layouts = {}
    for name, f in (("loop", loop), ("unrolled", unrolled)):
        seen = set(_conv_layouts(dump))
        run(f)
        new = {m: c for m, c in _conv_layouts(dump).items() if m not in seen}
        layouts[name] = max(new.values(), key=sum) if new else (0, 0)
    best = {"loop": float("inf"), "unrolled": float("inf")}
    for _ in range(FLAGS.repeats):
        for name, f in (("loop", loop), ("unrolled", unrolled)):
            t0 = time.perf_counter()
            run(f)
            best[name] = min(best[name], time.perf_counter() - t0)
    print(f"\nPlain Keras {FLAGS.model}, {size}x{size}, batch {b}, PGD-{k} under XLA, Keras "
          f"{keras.__version__} on {keras.backend.backend()}; best of {FLAGS.repeats}.\n")
    print("| written as | ms | convolutions, HWIO kernel | other kernel order |")
    print("|---|---:|---:|---:|")
    for name in ("loop", "unrolled"):
        hwio, other = layouts[name]
        print(f"| {name} | {1e3 * best[name]:.0f} | {hwio} | {other} |")
    print(f"\nloop ÷ unrolled: {best['loop'] / best['unrolled']:.2f}")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    app.run(main)
