"""RandAugment / AutoAugment operations against PIL (which the reference imitates) and
closed-form geometry; the policies are deterministic per key and run inside tf.data."""
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from sat_tf.config import DataConfig
from sat_tf.data import augment, testing


@pytest.fixture(scope="module")
def photo():
    return testing.sample_photos()[0][100:164, 200:280].copy()        # 64x80 of china.jpg


def _ours(fn, image, *args):
    return fn(tf.constant(image), *args).numpy().astype(int)


@pytest.mark.parametrize("name,ours,pil", [
    ("equalize", augment.equalize, ImageOps.equalize),
    ("autocontrast", augment.autocontrast, ImageOps.autocontrast),
    ("invert", augment.invert, ImageOps.invert),
])
def test_pointwise_ops_equal_pil(photo, name, ours, pil):
    np.testing.assert_array_equal(_ours(ours, photo), np.asarray(pil(Image.fromarray(photo))))
    flat = np.full((8, 8, 3), 77, np.uint8)                   # degenerate: one level only
    np.testing.assert_array_equal(_ours(ours, flat), np.asarray(pil(Image.fromarray(flat))))


@pytest.mark.parametrize("bits", [1, 4, 7, 8])
def test_posterize_equals_pil(photo, bits):
    np.testing.assert_array_equal(_ours(augment.posterize, photo, bits),
                                  np.asarray(ImageOps.posterize(Image.fromarray(photo), bits)))


def test_posterize_zero_bits_is_black(photo):
    assert _ours(augment.posterize, photo, 0).max() == 0


@pytest.mark.parametrize("threshold", [0, 100, 128, 256])
def test_solarize_equals_pil(photo, threshold):
    np.testing.assert_array_equal(
        _ours(augment.solarize, photo, threshold),
        np.asarray(ImageOps.solarize(Image.fromarray(photo), threshold)))


def test_solarize_add(photo):
    x = photo.astype(int)
    expected = np.where(x < 128, np.minimum(x + 60, 255), x)
    np.testing.assert_array_equal(_ours(augment.solarize_add, photo, 60), expected)


@pytest.mark.parametrize("name,ours,pil,tolerance", [
    ("color", augment.color, ImageEnhance.Color, 1),            # grey level rounding
    ("contrast", augment.contrast, ImageEnhance.Contrast, 0),
    ("brightness", augment.brightness, ImageEnhance.Brightness, 0),
    ("sharpness", augment.sharpness, ImageEnhance.Sharpness, 0),
])
@pytest.mark.parametrize("factor", [0.1, 0.6, 1.0, 1.9])
def test_enhance_ops_equal_pil(photo, name, ours, pil, tolerance, factor):
    expected = np.asarray(pil(Image.fromarray(photo)).enhance(factor)).astype(int)
    assert np.abs(_ours(ours, photo, factor) - expected).max() <= tolerance


def test_rotate_quarter_turns_are_exact():
    image = np.arange(6 * 6 * 3, dtype=np.uint8).reshape(6, 6, 3)
    np.testing.assert_array_equal(_ours(augment.rotate, image, 90.0), np.rot90(image, k=-1))
    np.testing.assert_array_equal(_ours(augment.rotate, image, -90.0), np.rot90(image, k=1))
    np.testing.assert_array_equal(_ours(augment.rotate, image, 180.0), image[::-1, ::-1])


def test_translate_moves_content_and_fills_grey():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = _ours(augment.translate_x, image, 3.0)
    np.testing.assert_array_equal(out[:, 3:], image[:, :-3])
    assert (out[:, :3] == augment.FILL_VALUE).all()
    out = _ours(augment.translate_y, image, -2.0)
    np.testing.assert_array_equal(out[:-2], image[2:])
    assert (out[-2:] == augment.FILL_VALUE).all()


@pytest.mark.parametrize("op,axis", [(augment.shear_x, 1), (augment.shear_y, 0)])
def test_shear_by_one(op, axis):
    image = np.random.default_rng(1).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    out = _ours(op, image, 1.0)
    for y in range(6):
        for x in range(6):
            sy, sx = (y, x + y) if axis == 1 else (y + x, x)
            inside = sy < 6 and sx < 6
            expected = image[sy, sx] if inside else [augment.FILL_VALUE] * 3
            np.testing.assert_array_equal(out[y, x], expected)


def test_cutout_greys_a_square_around_a_random_centre():
    image = np.zeros((40, 40, 3), np.uint8)
    areas = set()
    for seed in range(6):
        out = _ours(augment.cutout, image, 5, tf.constant([seed, 1], tf.int64))
        grey = (out == augment.FILL_VALUE).all(axis=-1)
        rows, cols = np.flatnonzero(grey.any(axis=1)), np.flatnonzero(grey.any(axis=0))
        assert grey.sum() == rows.size * cols.size                 # one rectangle
        assert rows.size <= 10 and cols.size <= 10 and grey.sum() >= 25
        assert (out[~grey] == 0).all()
        areas.add((rows[0], cols[0]))
    assert len(areas) > 3


@tf.function
def _all_ops(image, level):
    key = tf.constant([3, 4], tf.int64)
    return [augment.apply_op(name, image, level, key, augment.RANDAUGMENT_HPARAMS)
            for name in augment.RANDAUGMENT_OPS]


@pytest.mark.parametrize("level", [0, 10])
def test_every_op_keeps_shape_and_dtype_in_a_graph(photo, level):
    outs = _all_ops(tf.constant(photo), level)
    assert len(outs) == 16
    for out in outs:
        assert out.shape == photo.shape and out.dtype == tf.uint8
    policy_ops = {name for sub in augment.AUTOAUGMENT_POLICY for name, _, _ in sub}
    assert len(augment.AUTOAUGMENT_POLICY) == 25 and policy_ops <= set(augment.RANDAUGMENT_OPS)
    with pytest.raises(ValueError, match="Invalid augmentation op 'Blur'"):
        augment.apply_op("Blur", tf.constant(photo), 5, tf.constant([0, 0]),
                         augment.RANDAUGMENT_HPARAMS)


@pytest.mark.parametrize("policy", ["randaugment", "autoaugment"])
def test_policies_deterministic_per_key_in_tf_data(photo, policy):
    cfg = DataConfig(dataset="imagenet", data_dir="unused", augment=policy)
    image = tf.constant(photo, tf.float32)
    keys = tf.data.Dataset.range(12).map(lambda i: tf.stack([tf.constant(9, tf.int64), i]))
    ds = keys.map(lambda k: augment.apply(image, k, cfg), num_parallel_calls=4)
    first, second = [x.numpy() for x in ds], [x.numpy() for x in ds]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.float32 and a.shape == photo.shape
        assert a.min() >= 0 and a.max() <= 255 and np.array_equal(a, np.round(a))
    assert len({a.tobytes() for a in first}) > 6              # keys pick different ops
    assert any(not np.array_equal(a, photo) for a in first)
    assert "tensorflow_addons" not in sys.modules


def test_randaugment_without_layers_is_identity(photo):
    out = augment.randaugment(tf.constant(photo, tf.float32), tf.constant([0, 0]), num_layers=0)
    np.testing.assert_array_equal(out.numpy(), photo)


def test_the_augmentation_table_covers_the_configs_names(photo):
    from sat_tf.config import AUGMENTATIONS, DataConfig
    assert tuple(augment.AUGMENTATIONS) == AUGMENTATIONS
    image = tf.constant(photo)
    none = augment.apply(image, tf.constant([1, 2]), DataConfig(augment="none"))
    np.testing.assert_array_equal(none.numpy(), photo)
