"""RandAugment and AutoAugment on core TensorFlow ops only (DESIGN.md §6).

The operations, their magnitude scales and the AutoAugment policy are those of the TPU
EfficientNet reference (``autoaugment.py``): magnitudes run 0..10 (``MAX_LEVEL``); geometric
operations use ``ImageProjectiveTransformV3`` with nearest-neighbour sampling and fill empty
pixels with grey 128. Two deliberate differences, both towards PIL, whose operations the
reference imitates: ``Contrast`` blends towards the true mean grey level, and ``Posterize``
with 0 bits gives black (the reference shifts a uint8 by 8).

Images are float32 ``[H, W, 3]`` in [0, 255] (rounded to integers, as the operations act on
uint8 pixels); randomness is stateless, drawn from a ``[2]`` integer ``key``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import tensorflow as tf

MAX_LEVEL = 10.0
FILL_VALUE = 128


class Hparams(NamedTuple):
    cutout_const: float
    translate_const: float


AUTOAUGMENT_HPARAMS = Hparams(cutout_const=100, translate_const=250)
RANDAUGMENT_HPARAMS = Hparams(cutout_const=40, translate_const=100)

RANDAUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                   "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
                   "TranslateX", "TranslateY", "Cutout", "SolarizeAdd")

# AutoAugment policy "v0" of the reference: 25 sub-policies of (op, probability, level).
AUTOAUGMENT_POLICY = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)),
    (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)),
    (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)),
    (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)),
    (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)),
    (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)),
    (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)),
    (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)),
    (("Rotate", 1.0, 7), ("TranslateY", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)),
    (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
    (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
    (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)


# --------------------------------------------------------------------------------------------
# Pixel operations on uint8 [H, W, 3] images.

def blend(image1, image2, factor):
    """``image1 + factor * (image2 - image1)``, clipped to [0, 255] (PIL ImageEnhance)."""
    image1, image2 = tf.cast(image1, tf.float32), tf.cast(image2, tf.float32)
    return tf.cast(tf.clip_by_value(image1 + factor * (image2 - image1), 0.0, 255.0), tf.uint8)


def _grey(image):
    r, g, b = tf.unstack(tf.cast(image, tf.float32), axis=-1)
    return (0.299 * r + 0.587 * g + 0.114 * b)[..., None]


def invert(image):
    return 255 - image


def solarize(image, threshold):
    """Pixels >= ``threshold`` are inverted."""
    return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image, addition, threshold=128):
    """Adds ``addition`` (clipped to [0, 255]) to pixels below ``threshold``."""
    added = tf.cast(tf.clip_by_value(tf.cast(image, tf.int32) + addition, 0, 255), tf.uint8)
    return tf.where(image < threshold, added, image)


def posterize(image, bits):
    """Keeps the ``bits`` high bits of every pixel (0 bits: black)."""
    step = 2 ** (8 - bits)
    return tf.cast(tf.cast(image, tf.int32) // step * step, tf.uint8)


def color(image, factor):
    return blend(tf.tile(_grey(image), [1, 1, 3]), image, factor)


def contrast(image, factor):
    mean = tf.round(tf.reduce_mean(_grey(image)))
    return blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image, factor):
    return blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
    """Blends with PIL's SMOOTH-filtered image (border pixels unfiltered)."""
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1],
                                    padding="VALID")[0]
    smooth = tf.cast(tf.clip_by_value(tf.round(smooth), 0.0, 255.0), tf.uint8)
    interior = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(interior, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
    return blend(degenerate, image, factor)


def autocontrast(image):
    """Stretches every channel to the full [0, 255] range (PIL ImageOps.autocontrast)."""
    x = tf.cast(image, tf.float32)
    lo = tf.reduce_min(x, axis=[0, 1])
    hi = tf.reduce_max(x, axis=[0, 1])
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
    offset = tf.where(hi > lo, -lo * scale, 0.0)
    return tf.cast(tf.clip_by_value(x * scale + offset, 0.0, 255.0), tf.uint8)


def equalize(image):
    """Histogram equalization of every channel (PIL ImageOps.equalize)."""
    pixels = tf.reshape(tf.cast(image, tf.int32), [-1, 3])
    offsets = tf.range(3) * 256
    hist = tf.reshape(tf.math.bincount(pixels + offsets, minlength=768, maxlength=768), [3, 256])
    # PIL: step = (pixels - count of the highest occupied level) // 255; 0 means unchanged.
    occupied_from_top = tf.cast(tf.reverse(hist, [1]) > 0, tf.int32)
    last = 255 - tf.argmax(occupied_from_top, axis=1, output_type=tf.int32)
    last_count = tf.gather(hist, last, batch_dims=1)
    step = (tf.reduce_sum(hist, axis=1) - last_count) // 255
    safe_step = tf.maximum(step, 1)[:, None]
    lut = (tf.cumsum(hist, axis=1, exclusive=True) + safe_step // 2) // safe_step
    lut = tf.where(step[:, None] > 0, tf.clip_by_value(lut, 0, 255), tf.range(256)[None])
    out = tf.gather(tf.reshape(lut, [-1]), pixels + offsets)
    return tf.cast(tf.reshape(out, tf.shape(image)), tf.uint8)


def transform(image, matrix):
    """Projective transform: output pixel (x, y) samples the input at ``matrix`` applied to it.

    ``matrix`` is ``[a0, a1, a2, b0, b1, b2, c0, c1]`` as in ``ImageProjectiveTransformV3``;
    nearest neighbour; outside pixels are grey 128.
    """
    matrix = tf.reshape(tf.cast(tf.stack(matrix), tf.float32), [1, 8])
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=matrix, output_shape=tf.shape(image)[:2],
        fill_value=float(FILL_VALUE), interpolation="NEAREST", fill_mode="CONSTANT")
    return out[0]


def rotate(image, degrees):
    """Rotates about the centre by ``degrees`` (clockwise on screen for positive degrees)."""
    radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    cos, sin = tf.cos(radians), tf.sin(radians)
    h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    return transform(image, [cos, sin, cx - cos * cx - sin * cy,
                             -sin, cos, cy + sin * cx - cos * cy, 0.0, 0.0])


def shear_x(image, level):
    return transform(image, [1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image, level):
    return transform(image, [1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0])


def translate_x(image, pixels):
    """Moves the content ``pixels`` to the right."""
    return transform(image, [1.0, 0.0, -pixels, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image, pixels):
    """Moves the content ``pixels`` down."""
    return transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, -pixels, 0.0, 0.0])


def cutout(image, pad_size, key):
    """Greys out the ``2*pad_size`` square (clipped to the image) around a random centre."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    cy = tf.random.stateless_uniform([], key, 0, h, dtype=tf.int32)
    cx = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(key, 1), 0, w,
                                     dtype=tf.int32)
    rows, cols = tf.range(h)[:, None], tf.range(w)[None, :]
    inside = ((rows >= cy - pad_size) & (rows < cy + pad_size)
              & (cols >= cx - pad_size) & (cols < cx + pad_size))
    return tf.where(inside[:, :, None], tf.constant(FILL_VALUE, tf.uint8), image)


# --------------------------------------------------------------------------------------------
# Levels (0..MAX_LEVEL) -> operation arguments, as in the reference.

def _signed(value, key):
    """``value`` with a random sign."""
    flip = tf.random.stateless_uniform([], key) < 0.5
    return tf.where(flip, -value, value)


def _enhance(level):
    return level / MAX_LEVEL * 1.8 + 0.1


def apply_op(name: str, image, level: float, key, hparams: Hparams):
    """Operation ``name`` at magnitude ``level`` on a uint8 image; ``key`` draws its random
    sign or place."""
    level = float(level)
    ops = {
        "AutoContrast": lambda: autocontrast(image),
        "Equalize": lambda: equalize(image),
        "Invert": lambda: invert(image),
        "Rotate": lambda: rotate(image, _signed(level / MAX_LEVEL * 30.0, key)),
        "Posterize": lambda: posterize(image, int(level / MAX_LEVEL * 4)),
        "Solarize": lambda: solarize(image, int(level / MAX_LEVEL * 256)),
        "SolarizeAdd": lambda: solarize_add(image, int(level / MAX_LEVEL * 110)),
        "Color": lambda: color(image, _enhance(level)),
        "Contrast": lambda: contrast(image, _enhance(level)),
        "Brightness": lambda: brightness(image, _enhance(level)),
        "Sharpness": lambda: sharpness(image, _enhance(level)),
        "ShearX": lambda: shear_x(image, _signed(level / MAX_LEVEL * 0.3, key)),
        "ShearY": lambda: shear_y(image, _signed(level / MAX_LEVEL * 0.3, key)),
        "TranslateX": lambda: translate_x(
            image, _signed(level / MAX_LEVEL * hparams.translate_const, key)),
        "TranslateY": lambda: translate_y(
            image, _signed(level / MAX_LEVEL * hparams.translate_const, key)),
        "Cutout": lambda: cutout(image, int(level / MAX_LEVEL * hparams.cutout_const), key),
    }
    if name not in ops:
        raise ValueError(f"Invalid augmentation op {name!r}; valid choices: {', '.join(ops)}.")
    return ops[name]()


# --------------------------------------------------------------------------------------------
# Policies on float32 [0, 255] images.

def _to_uint8(image):
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def randaugment(image, key, *, num_layers: int = 2, magnitude: float = 10.0):
    """RandAugment: ``num_layers`` operations drawn uniformly from ``RANDAUGMENT_OPS``, each
    at ``magnitude``."""
    out = _to_uint8(image)
    for layer in range(num_layers):
        layer_key = tf.random.experimental.stateless_fold_in(key, layer)
        choice = tf.random.stateless_uniform([], layer_key, 0, len(RANDAUGMENT_OPS), dtype=tf.int32)
        op_key = tf.random.experimental.stateless_fold_in(layer_key, 1)
        branches = [lambda name=name, x=out, k=op_key: apply_op(name, x, magnitude, k,
                                                                RANDAUGMENT_HPARAMS)
                    for name in RANDAUGMENT_OPS]
        out = tf.ensure_shape(tf.switch_case(choice, branches), image.shape)
    return tf.cast(out, tf.float32)


def autoaugment(image, key):
    """AutoAugment policy v0: one of 25 sub-policies, each applying two operations with their
    probabilities."""
    def sub_policy(ops, x):
        for i, (name, prob, level) in enumerate(ops):
            op_key = tf.random.experimental.stateless_fold_in(key, 10 + i)
            apply = tf.random.stateless_uniform(
                [], tf.random.experimental.stateless_fold_in(key, 20 + i)) < prob
            x = tf.cond(apply, lambda name=name, level=level, x=x, op_key=op_key: apply_op(
                name, x, level, op_key, AUTOAUGMENT_HPARAMS), lambda x=x: x)
        return x

    x = _to_uint8(image)
    choice = tf.random.stateless_uniform([], key, 0, len(AUTOAUGMENT_POLICY), dtype=tf.int32)
    branches = [lambda ops=ops: sub_policy(ops, x) for ops in AUTOAUGMENT_POLICY]
    return tf.cast(tf.ensure_shape(tf.switch_case(choice, branches), image.shape), tf.float32)


# Each augmentation of config.AUGMENTATIONS: (image, key, data config) -> image.
AUGMENTATIONS = {
    "none": lambda image, key, data: image,
    "randaugment": lambda image, key, data: randaugment(
        image, key, num_layers=data.randaugment_layers, magnitude=data.randaugment_magnitude),
    "autoaugment": lambda image, key, data: autoaugment(image, key),
}


def apply(image, key, data) -> tf.Tensor:
    """``data.augment`` (:data:`AUGMENTATIONS`) of one image."""
    return AUGMENTATIONS[data.augment](image, key, data)
