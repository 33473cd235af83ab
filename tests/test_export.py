"""SavedModel export: the loaded model gives the Keras model's logits and input gradients, the
encoded-image signature applies the evaluation preprocessing, metadata is recorded, bad inputs
fail clearly (non-finite pixels, decompression bombs, unsupported formats), empty batches give
empty results, a failed write leaves nothing partial behind, and TensorFlow's own
saved_model_cli can show and run it."""
import hashlib
import io
import json
import os
import pathlib
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from sat_tf import activations, attacks, data, evaluation, export, loading, rundir
from sat_tf.config import AttackConfig, DataConfig, Experiment, ModelConfig

SIZE = 16
CLASSES = 5
CLI = str(pathlib.Path(sys.executable).parent / "saved_model_cli")
EXPORT = str(pathlib.Path(__file__).resolve().parent.parent / "run" / "export.py")


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


# ---- empty batches, non-finite pixels ------------------------------------------------------

EMPTY_BATCHES = """
import sys, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
a = loaded.signatures["serving_default"](images=tf.zeros([0, 16, 16, 3]))
b = loaded.signatures["serving_encoded"](image_bytes=tf.constant([], tf.string))
print([tuple(out[k].shape) for out in (a, b) for k in ("logits", "probabilities", "classes")])
"""


def test_empty_batches_give_empty_results(exported):
    """Batches of 0 images (pixels, or an empty list of encoded images) give [0, classes]
    logits, also with oneDNN's kernels (TF_ENABLE_ONEDNN_OPTS=1, the default on many CPUs),
    whose batch norm fails on an empty batch ("Incompatible shapes: [6] vs. [0,16,16,3]")."""
    _, path, served = exported
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="1")
    onednn = subprocess.Popen([sys.executable, "-c", EMPTY_BATCHES, path], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    want = [(0, CLASSES), (0, CLASSES), (0,)] * 2
    sigs = served.loaded.signatures
    a = sigs["serving_default"](images=tf.zeros([0, SIZE, SIZE, 3]))
    b = sigs["serving_encoded"](image_bytes=tf.constant([], tf.string))
    assert [tuple(out[k].shape) for out in (a, b)
            for k in ("logits", "probabilities", "classes")] == want
    assert tuple(served(tf.zeros([0, SIZE, SIZE, 3])).shape) == (0, CLASSES)
    out, err = onednn.communicate(timeout=180)
    assert onednn.returncode == 0, err[-3000:]
    assert out.strip() == str(want)


def test_non_finite_pixels_are_refused(exported):
    """NaN and +-inf would give NaN logits silently: refused with one clear message. Finite
    values outside [0, 255] reach the model unchanged, as with the Keras model (the documented
    choice: plots.loss_landscape evaluates exports beyond [0, 255])."""
    model, _, served = exported
    sig = served.loaded.signatures["serving_default"]
    for value in (np.nan, np.inf, -np.inf):
        x = pixels(2).numpy()
        x[1, 3, 4, 2] = value
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"pixels must be finite values in \[0, 255\]"):
            sig(images=x)
        with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or infinite"):
            served(tf.constant(x))
    x = pixels(2).numpy()
    x[0, :4] = -30.0
    x[1, :4] = 300.0
    np.testing.assert_allclose(sig(images=x)["logits"].numpy(),
                               model(x, training=False).numpy(), rtol=1e-5, atol=1e-5)
    checks = served.metadata["input_checks"]
    assert "NaN or infinite" in checks["serving_default"]
    assert "outside [0, 255] reach the model unchanged" in checks["serving_default"]


# ---- decompression bombs and unsupported formats -------------------------------------------

def huge_png(width, height):
    """A 1-bit greyscale PNG of zero pixels, compressed row by row (never held whole): deflate
    packs the rows ~1000:1, so 20000 x 20000 pixels (1.2 GB as RGB) take ~50 KB."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    z = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)      # filter byte + packed bits
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def jpeg_claiming(width, height):
    """A 16x16 JPEG whose frame header (SOF0) claims width x height."""
    jpeg = bytearray(encode(np.full((16, 16, 3), 128, np.uint8), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")   # marker, length (2), precision (1), height (2), width (2)
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(jpeg)


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_rss_growth(fn):
    """(bytes by which the peak resident memory exceeded the starting RSS while ``fn`` ran,
    the exception it raised): resets the peak (VmHWM) through /proc/self/clear_refs first."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to measure peak memory")
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    try:
        fn()
        error = None
    except Exception as e:  # noqa: BLE001 - returned to the test
        error = e
    return (_status_kib("VmHWM") - before) * 1024, error


def test_decompression_bomb_is_refused_before_decoding(exported):
    """A ~50 KB PNG declaring 20000 x 20000 pixels (1.2 GB decoded as RGB) is refused from its
    header: the peak memory of the request grows by far less than the decoded image. So is a
    JPEG whose header claims the same size."""
    _, _, served = exported
    sig = served.loaded.signatures["serving_encoded"]
    bomb = huge_png(20000, 20000)
    assert len(bomb) < 64 * 1024
    small = encode(np.zeros((48, 64, 3), np.uint8), "PNG")
    sig(image_bytes=tf.constant([small]))       # warm up: first-call allocations don't count
    growth, error = peak_rss_growth(lambda: sig(image_bytes=tf.constant([small, bomb])))
    assert isinstance(error, tf.errors.InvalidArgumentError), error
    assert re.search(r"serving_encoded: the image is 20000x20000 pixels \(width x height\), "
                     r"more than the bound of 16777216 pixels", error.message), error.message
    print(f"peak RSS growth refusing the 20000x20000 PNG ({len(bomb)} bytes): "
          f"{growth / 2**20:.1f} MiB")
    assert growth < 100 * 2**20, growth      # decoding it would take > 1200 MiB
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"the image is 30000x20000 pixels"):
        sig(image_bytes=tf.constant([jpeg_claiming(30000, 20000)]))
    meta = served.metadata
    assert meta["max_encoded_pixels"] == export.MAX_ENCODED_PIXELS == 4096 * 4096
    assert meta["encoded_formats"] == ["JPEG", "PNG"]


def test_the_pixel_bound_is_exact_and_other_formats_are_refused(exported):
    """A 64x48 image (3072 pixels) passes a bound of 3072 and fails one of 3071; the size is
    read from the header of both formats. GIF and BMP are refused by name: a GIF's decoded size
    is not in a fixed header (all frames are decoded), so it cannot be bounded first."""
    _, _, served = exported
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG"):
        data = tf.constant(encode(image, fmt))
        np.testing.assert_array_equal(export.encoded_image_size(data).numpy(), [48, 64])
        np.testing.assert_array_equal(export.decode_and_preprocess(data, SIZE, 3072).numpy(),
                                      export.decode_and_preprocess(data, SIZE).numpy())
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"the image is 64x48 pixels .* bound of 3071 pixels"):
            export.decode_and_preprocess(data, SIZE, 3071)
    sig = served.loaded.signatures["serving_encoded"]
    for fmt in ("GIF", "BMP"):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match="serving_encoded accepts JPEG and PNG images only"):
            sig(image_bytes=tf.constant([encode(image, fmt)]))
    for junk in (b"", b"\x89PNG", b"not an image at all, but long enough to read a header"):
        with pytest.raises(tf.errors.InvalidArgumentError, match="JPEG and PNG images only"):
            sig(image_bytes=tf.constant([junk]))


# ---- writing: all or nothing ---------------------------------------------------------------

def tree(path):
    """{relative path: sha256} of every file under ``path``."""
    root = pathlib.Path(path)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_failed_write_leaves_nothing_and_keeps_the_previous_export(exported, tmp_path,
                                                                   monkeypatch):
    """The SavedModel writer fails after writing most of the export (a full disk, simulated):
    the error names the folder and the OS reason, no partial or hidden folder remains, and a
    previous export being overwritten is byte for byte unchanged; so when the final rename
    fails. A successful overwrite replaces it; a folder that is not an export is never
    overwritten."""
    model, path, _ = exported
    previous = tmp_path / "previous"
    shutil.copytree(path, previous)
    before = tree(previous)
    real_save = tf.saved_model.save

    def full_disk(obj, export_dir, signatures=None, options=None):
        real_save(obj, export_dir, signatures=signatures, options=options)
        raise tf.errors.ResourceExhaustedError(
            None, None, f"{export_dir}/saved_model.pb.tmp1234; No space left on device")

    monkeypatch.setattr(tf.saved_model, "save", full_disk)
    for target, overwrite in ((tmp_path / "new", False), (previous, True)):
        with pytest.raises(export.ExportError) as e:
            export.export_saved_model(model, str(target), overwrite=overwrite)
        kept = ", the previous export is unchanged" if overwrite else ""
        assert str(e.value) == (f"Could not write the export to {str(target)!r}: No space left "
                                f"on device; nothing was left behind{kept}.")
        assert sorted(os.listdir(tmp_path)) == ["previous"]
        assert tree(previous) == before
    monkeypatch.setattr(tf.saved_model, "save", real_save)

    real_rename = tf.io.gfile.rename

    def rename(src, dst, overwrite=False):
        if src.endswith(os.sep + "export"):
            raise PermissionError(13, "Permission denied", dst)
        return real_rename(src, dst, overwrite=overwrite)

    monkeypatch.setattr(tf.io.gfile, "rename", rename)
    with pytest.raises(export.ExportError, match=r"Permission denied; nothing was left behind, "
                                                 "the previous export is unchanged"):
        export.export_saved_model(model, str(previous), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["previous"] and tree(previous) == before
    monkeypatch.setattr(tf.io.gfile, "rename", real_rename)

    with pytest.raises(ValueError, match="not empty; choose a new one, or overwrite"):
        export.export_saved_model(model, str(previous))
    export.export_saved_model(model, str(previous), overwrite=True, metadata={"model": "again"})
    assert sorted(os.listdir(tmp_path)) == ["previous"]
    assert export.load(str(previous)).metadata["model"] == "again"

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "experiment.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no sat_tf export"):
        export.export_saved_model(model, str(tmp_path / "run"), overwrite=True)
    assert os.listdir(tmp_path / "run") == ["experiment.json"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run's folder without training: experiment.json and a step-3 checkpoint of
    an untrained wrn-10-1 (78k parameters) at 16x16."""
    model_dir = tmp_path_factory.mktemp("run")
    exp = Experiment(name="export-test",
                     model=ModelConfig(name="wrn-10-1", activation="silu", image_size=16),
                     data=DataConfig(synthetic_image_size=16), model_dir=str(model_dir))
    (model_dir / rundir.EXPERIMENT_FILE).write_text(json.dumps(exp.to_dict()))
    checkpoint = tf.train.Checkpoint(model=rundir.build_model(exp),
                                     step=tf.Variable(3, dtype=tf.int64))
    tf.train.CheckpointManager(checkpoint, str(model_dir), 1,
                               checkpoint_name=rundir.CHECKPOINT_PREFIX).save(3)
    return str(model_dir)


def test_export_run_records_where_the_model_came_from(run_dir, tmp_path):
    """The library call behind run/export.py: the run's latest checkpoint, with its experiment
    and its evaluation preprocessing (synthetic data: the whole image) in the metadata, and one
    summary line; exporting again with overwrite replaces it."""
    source = loading.resolve(model_dir=run_dir)
    target = str(tmp_path / "export")
    first = export.export_run(source, target)
    ckpt = os.path.join(run_dir, "ckpt-3")
    assert first.summary() == (
        f"Exported wrn-10-1 (silu, step 3, raw weights, 16x16, 10 classes) from {ckpt} to "
        f"{target}; signatures: serving_default, serving_encoded, metadata.")
    meta = export.load(target).metadata
    assert (meta["model"], meta["activation"], meta["step"], meta["weights"], meta["checkpoint"],
            meta["experiment_name"], meta["data_preprocessing"]) == (
        "wrn-10-1", "silu", 3, "raw", ckpt, "export-test", "resize")
    assert Experiment.from_dict(meta["experiment"]) == source.experiment
    again = export.export_run(source, target, overwrite=True)
    assert again.replaced and not first.replaced
    assert f"to {target} (replacing the previous export); signatures" in again.summary()


def test_the_export_folder_rules_hold_without_tensorflow(exported, tmp_path):
    """run/export.py checks a local --export_dir before TensorFlow is imported: the same
    answers and messages as the check sat_tf.export makes with TensorFlow's file system."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    folders = [tmp_path / "absent", tmp_path / "empty", tmp_path / "file", tmp_path / "other",
               pathlib.Path(exported[1])]

    def outcome(check, path, overwrite):
        try:
            return check(str(path), overwrite)
        except ValueError as e:
            return str(e)

    outcomes = [outcome(export.check_export_dir, p, o) for p in folders for o in (False, True)]
    assert outcomes == [outcome(loading.check_export_dir, p, o)
                        for p in folders for o in (False, True)]
    assert outcomes[:4] == [False, False, False, False] and outcomes[-1] is True
    assert "is a file" in outcomes[4] and "holds no sat_tf export" in outcomes[7]
    assert loading.check_export_dir("gs://bucket/export") is False   # left to sat_tf.export


def start_export(*args, file_size_limit=None):
    """run/export.py in a subprocess; ``file_size_limit`` (bytes) makes every write beyond it
    fail with EFBIG ("File too large"), as a full disk would, with SIGXFSZ ignored."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, EXPORT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=limit if file_size_limit else None)


def test_export_cli_write_failure_and_overwrite(run_dir, exported, tmp_path):
    """run/export.py --overwrite over a previous export, in a subprocess whose files are capped
    between the size of the weights (~320 KB), which are written, and of saved_model.pb
    (~370 KB), which fails partway. One
    line names the folder and the OS reason, exit 1, no folder is left (hidden or not) and the
    previous export is byte for byte unchanged. In parallel: a non-empty folder without
    --overwrite, or one that is not an export even with it, is refused before TensorFlow is
    imported (exit 2) and left alone. (A successful overwrite: the in-process test above.)"""
    previous = tmp_path / "previous"
    shutil.copytree(exported[1], previous)
    before = tree(previous)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    model_dir = f"--model_dir={run_dir}"
    # A cap between the size of the weights and of saved_model.pb, which are written in that
    # order: the weights are written, saved_model.pb fails partway.
    weights = (previous / "variables" / "variables.data-00000-of-00001").stat().st_size
    graph = (previous / "saved_model.pb").stat().st_size
    assert weights < graph
    procs = [start_export(model_dir, f"--export_dir={previous}", "--overwrite",
                          file_size_limit=(weights + graph) // 2),
             start_export(model_dir, f"--export_dir={other}"),
             start_export(model_dir, f"--export_dir={other}", "--overwrite")]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]

    _, err, status = results[0]
    assert status == 1, err[-3000:]
    # (TensorFlow's C++ start-up lines may come first.)
    assert "Traceback" not in err and err.count("export.py: error:") == 1, err[-3000:]
    assert err.endswith(f"\nexport.py: error: Could not write the export to {str(previous)!r}: "
                        "File too large; nothing was left behind, the previous export is "
                        "unchanged.\n"), err[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["other", "previous"]
    assert tree(previous) == before

    for (_, err, status), message in zip(results[1:], ("is not empty; choose a new one, or "
                                                       "overwrite it", "holds no sat_tf export")):
        assert status == 2 and err.count("\n") == 1 and message in err, err
    assert os.listdir(other) == ["notes.txt"]
