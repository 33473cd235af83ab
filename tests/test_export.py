"""SavedModel export: the loaded model gives the Keras model's logits and input gradients, the
encoded-image signature applies the evaluation preprocessing, metadata is recorded, bad inputs
fail clearly, and TensorFlow's own saved_model_cli can show and run it."""
import io
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from sat_tf import activations, attacks, data, evaluation, export
from sat_tf.config import AttackConfig, DataConfig

SIZE = 16
CLASSES = 5
CLI = str(pathlib.Path(sys.executable).parent / "saved_model_cli")


def tiny_model():
    """Conv + batch norm (non-trivial moving statistics) + smooth_relu (a layer with a weight)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(2 / 255.0, offset=-1)(inp)
    x = keras.layers.Conv2D(6, 3, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = activations.Activation("smooth_relu")(x)
    x = keras.layers.Conv2D(6, 3, strides=2)(x)
    x = activations.Activation("silu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(CLASSES)(x))
    bn = model.layers[3]
    bn.moving_mean.assign(np.linspace(-0.2, 0.2, 6).astype(np.float32))
    bn.moving_variance.assign(np.linspace(0.5, 2.0, 6).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model()
    path = str(tmp_path_factory.mktemp("export") / "model")
    export.export_saved_model(model, path, metadata={"model": "tiny", "activation": "silu",
                                                     "step": 7, "weights": "ema"})
    return model, path, export.load(path)


def pixels(n, seed=0, size=SIZE):
    return tf.random.stateless_uniform([n, size, size, 3], [seed, 1], 0.0, 255.0)


def test_logits_probabilities_classes(exported):
    model, _, served = exported
    x = pixels(4)
    out = served.loaded.signatures["serving_default"](images=x)
    want = model(x, training=False).numpy()
    np.testing.assert_allclose(out["logits"].numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["probabilities"].numpy(),
                               np.exp(want) / np.exp(want).sum(-1, keepdims=True), atol=1e-6)
    np.testing.assert_array_equal(out["classes"].numpy(), want.argmax(-1))
    assert out["classes"].dtype == tf.int32


def test_metadata_signature_and_asset(exported):
    _, path, served = exported
    meta = served.metadata
    assert (meta["model"], meta["activation"], meta["step"], meta["weights"]) == \
        ("tiny", "silu", 7, "ema")
    assert (meta["image_size"], meta["num_classes"]) == (SIZE, CLASSES)
    assert "centre crop" in meta["preprocessing"]["serving_encoded"]
    with open(os.path.join(path, "assets", export.METADATA_ASSET)) as f:
        assert json.load(f) == meta


def encode(array, fmt):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_encoded_png_is_centre_cropped(exported):
    """A 48x64 PNG: the crop is 16/(16+32) x 48 = 16 pixels, centred at rows 16..32 and
    columns 24..40; at 16x16 the bicubic resize is the identity."""
    model, _, served = exported
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(2)]
    images.append(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    out = served.loaded.signatures["serving_encoded"](
        image_bytes=tf.constant([encode(a, "PNG") for a in images]))
    crops = np.stack([images[0][16:32, 24:40], images[1][16:32, 24:40], images[2][16:32, 16:32]])
    want = model(crops.astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(out["logits"].numpy(), want, rtol=1e-4, atol=1e-4)


def test_encoded_jpeg_matches_the_eval_pipeline(exported):
    """A large JPEG goes through sat_tf.data.imagenet.preprocess_eval exactly."""
    model, _, served = exported
    from sat_tf.data import imagenet
    rng = np.random.default_rng(1)
    smooth = np.kron(rng.integers(0, 256, (12, 10, 3)), np.ones((10, 10, 1))).astype(np.uint8)
    jpeg = encode(smooth, "JPEG")
    out = served.loaded.signatures["serving_encoded"](image_bytes=tf.constant([jpeg]))
    want = model(imagenet.preprocess_eval(tf.constant(jpeg), SIZE)[None], training=False)
    np.testing.assert_allclose(out["logits"].numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
    # Independently: Pillow decodes; the 120x100 image's centre crop is int(16/48 * 100) = 33
    # pixels from row (120-33+1)//2 = 44 and column (100-33+1)//2 = 34; bicubic to 16x16.
    # (Pillow's and TensorFlow's JPEG decoders differ by ~2 levels; a crop one pixel off by
    # more than 7.)
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float32)
    crop = tf.image.resize(decoded[None, 44:77, 34:67], [SIZE, SIZE], method="bicubic")[0]
    ours = export.decode_and_preprocess(tf.constant(jpeg), SIZE).numpy()
    assert np.mean(np.abs(ours - np.clip(crop.numpy(), 0, 255))) < 3.0
    assert ours.min() >= 0.0 and ours.max() <= 255.0


def test_gradients_and_attacks_through_the_loaded_model(exported):
    model, _, served = exported
    x = pixels(6, seed=2)
    y = tf.constant([0, 1, 2, 3, 4, 0])
    for fn in (model, served):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                y, fn(x) if fn is served else fn(x, training=False)))
        grad = tape.gradient(loss, x).numpy()
        if fn is model:
            want = grad
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-7)
    assert np.abs(grad).sum() > 0
    cfg = AttackConfig(epsilon=8.0, step_size=2.0, num_steps=5, random_start=True,
                       clean_start_prob=0.0)
    adv_keras = attacks.pgd(model, x, y, cfg, seed=[3, 4]).numpy()
    adv_saved = attacks.pgd(served, x, y, cfg, seed=[3, 4]).numpy()
    # Identical up to sign flips of gradients that are ~0 (float round-off).
    assert np.mean(np.abs(adv_keras - adv_saved) < 1e-3) > 0.99


def test_evaluate_gives_the_same_numbers(exported):
    model, _, served = exported
    cfg = DataConfig(synthetic_image_size=SIZE, synthetic_num_classes=CLASSES,
                     synthetic_eval_examples=40)
    ds = data.build_dataset(cfg, split="eval", batch_size=16)
    attack = [AttackConfig(epsilon=2.0, step_size=1.0, num_steps=3, random_start=True,
                           clean_start_prob=0.0)]
    a = evaluation.evaluate(model, ds, attack, seed=5)
    b = evaluation.evaluate(served, ds, attack, seed=5)
    for key in ("examples", "clean_correct", "robust_correct"):
        assert a[key] == b[key], key


def test_bad_inputs_fail_clearly(exported):
    _, _, served = exported
    with pytest.raises(ValueError, match=r"Invalid input dtype float64.*float32 pixels"):
        served(tf.zeros([1, SIZE, SIZE, 3], tf.float64))
    with pytest.raises(ValueError,
                       match=r"Invalid input shape \[1, 8, 8, 3\].*\[batch, 16, 16, 3\]"):
        served(tf.zeros([1, 8, 8, 3]))
    sig = served.loaded.signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"expected shape \[\?,16,16,3\]"):
        sig(images=tf.zeros([1, 8, 8, 3]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a float tensor"):
        sig(images=tf.zeros([1, SIZE, SIZE, 3], tf.float64))
    with pytest.raises(ValueError, match="No SavedModel"):
        export.load(str(pathlib.Path(served.export_dir).parent / "missing"))


def test_export_refuses_a_non_empty_folder(exported, tmp_path):
    (tmp_path / "x").write_text("taken")
    with pytest.raises(ValueError, match="not empty"):
        export.export_saved_model(exported[0], str(tmp_path))


def start_cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def finish(proc):
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return out


def test_saved_model_cli_show_and_run(exported, tmp_path):
    """TensorFlow's own tool, in subprocesses (run in parallel): lists the signatures and runs
    the pixel signature (the encoded-image one is checked in-process above)."""
    model, path, _ = exported
    x = pixels(3, seed=9).numpy()
    np.save(tmp_path / "x.npy", x)
    run = lambda sig, inputs, out: start_cli(
        "run", "--dir", path, "--tag_set", "serve", "--signature_def", sig, "--inputs", inputs,
        "--outdir", str(tmp_path / out))
    procs = [start_cli("show", "--dir", path, "--all"),
             run("serving_default", f"images={tmp_path / 'x.npy'}", "pixels")]
    shown, _ = [finish(p) for p in procs]

    for name in ("serving_default", "serving_encoded", "metadata"):
        assert f"signature_def['{name}']" in shown
    assert "shape: (-1, 16, 16, 3)" in shown and "inputs['image_bytes']" in shown

    logits = np.load(tmp_path / "pixels" / "logits.npy")
    np.testing.assert_allclose(logits, model(x, training=False).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.load(tmp_path / "pixels" / "classes.npy"), logits.argmax(-1))
