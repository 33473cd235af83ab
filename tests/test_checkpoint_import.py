"""Importing released weights (sat_tf.checkpoint_import, run/import_checkpoint.py).

The truth here is independent of the importer's table: the release's variables as the authors'
own graph code creates them (tests/data/sat_release/*.txt), the logits that graph computes from
known weights (tests/data/sat_release/reference_*.npz, tests/release_reference.py), and Keras'
own EfficientNet for Keras' files.
"""
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from sat_tf import checkpoint_import as ci
from sat_tf import models, rundir
from sat_tf.errors import UserError

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import release_reference as rr  # noqa: E402
from test_train_cli import _without_tensorflow  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "sat_release"
IMPORT = str(ROOT / "run" / "import_checkpoint.py")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
QUIET = dict(log=lambda line: None)

RESNET50 = ["resnet50.txt"]
SMOOTH = ["resnet50.txt", "resnet50_smoothrelu_betas.txt"]
RESNEXT = ["resnext50_32x4d.txt"]
B0 = ["efficientnet_b0.txt"]


def release(files):
    return [v for f in files for v in rr.read_variables(DATA / f)]


def write_checkpoint(prefix, variables, extra=()):
    """A TF1-style (name-based) checkpoint holding ``variables`` with the stand-in values,
    plus ``extra`` (name, value) pairs."""
    names = [n for n, _ in variables] + [n for n, _ in extra]
    tensors = [rr.value(n, s) for n, s in variables] + [tf.constant(v) for _, v in extra]
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names,
                      shape_and_slices=[""] * len(names), tensors=tensors)
    return str(prefix)


def _model(name, activation="silu", size=32, **kw):
    stem = "imagenet" if "res" in name else None
    spec = models.resolve(name, activation, 1000, size, "sat", stem, 0.9, 1e-5)
    return models.build_model(name, activation, 1000, size, "sat", stem, 0.9, 1e-5), spec


# ---------------------------------------------------------------------------------------------
# The table against the authors' variables

@pytest.mark.parametrize("files, source, name, activation, prefix", [
    (RESNET50, "sat-resnet", "resnet-50", "silu", ""),
    (SMOOTH, "sat-resnet", "resnet-50", "smooth_relu", ""),
    (RESNEXT, "sat-resnet", "resnext-50-32x4d", "gelu_tanh", ""),
    (B0, "sat-efficientnet", "efficientnet-b0", "silu", "efficientnet-b0"),
])
def test_the_table_reads_exactly_the_variables_the_authors_code_creates(files, source, name,
                                                                       activation, prefix):
    theirs = dict(release(files))
    model, spec = _model(name, activation)
    assignments = ci.mapping(source, model, spec, prefix=prefix)
    ours = {a.source_name: tuple(a.target.shape) for a in assignments}
    assert len(assignments) == len(model.weights) == len(theirs)
    assert set(ours) == set(theirs)
    for n, shape in theirs.items():
        assert ci._fits(shape, ours[n]), (n, shape, ours[n])
    # Every sat-tf weight once: the same variable object never appears twice.
    assert len({id(a.target) for a in assignments}) == len(assignments)


@pytest.mark.parametrize("name, variables, params", [
    # The authors' graph code, built (tests/data/sat_release/*.txt header): variables and
    # trainable parameters of the models whose lists are not stored here.
    ("resnet-101", 522, 44_549_160),
    ("resnext-50-32x8d", 267, 48_021_800),
    ("efficientnet-b3", 496, 12_233_232),
])
def test_other_release_models_have_the_authors_variable_and_parameter_counts(name, variables,
                                                                            params):
    model, spec = _model(name)
    source = "sat-efficientnet" if "efficient" in name else "sat-resnet"
    assignments = ci.mapping(source, model, spec, prefix="efficientnet-b3")
    assert len(assignments) == variables
    assert sum(int(np.prod(a.target.shape)) for a in assignments
               if a.target.trainable) == params


# ---------------------------------------------------------------------------------------------
# Logits against the authors' TF1 graph

REFERENCES = {
    # case: (variable lists, extra training state in the checkpoint, import arguments)
    "r50-silu": (RESNET50, "tensorpack", dict(source="sat-resnet", activation="silu")),
    "r50-smoothrelu": (SMOOTH, "tensorpack", dict(source="sat-resnet")),
    "rx50-32x4d-gelu": (RESNEXT, "tensorpack", dict(source="sat-resnet", activation="gelu")),
    "b0": (B0, "tpu", dict(source="sat-efficientnet")),
    "b0-ema": (B0, "tpu-ema", dict(source="sat-efficientnet", use_ema=True)),
}


def _extra(kind, variables):
    """Training state a real checkpoint may hold beside the weights."""
    if kind == "tensorpack":
        return [("global_step", np.int64(5005)), ("learning_rate", np.float32(0.1)),
                ("EMA/xentropy-loss/EMA", np.float32(2.5)),
                (variables[0][0] + "/Momentum", rr.value(variables[0][0], variables[0][1]))]
    extra = [("global_step", np.int64(350000))]
    extra += [(variables[0][0] + "/RMSProp", rr.value(variables[0][0], variables[0][1]))]
    return extra


def _reference_checkpoint(tmp_path, case):
    files, kind, kwargs = REFERENCES[case]
    variables = release(files)
    extra = _extra(kind, variables)
    if kind == "tpu-ema":   # every weight and batch-norm statistic has its average too
        extra += [(n + rr.EMA_SUFFIX, rr.value(n + rr.EMA_SUFFIX, s)) for n, s in variables]
    return write_checkpoint(tmp_path / case / "model", variables, extra), dict(kwargs)


@pytest.mark.parametrize("case", list(REFERENCES))
def test_imported_logits_equal_the_authors_graph_on_real_photos(tmp_path, case):
    ref = np.load(DATA / f"reference_{case}.npz")
    images, logits = ref["images"].astype(np.float32), ref["logits"]
    checkpoint, kwargs = _reference_checkpoint(tmp_path, case)
    record = ci.import_checkpoint(checkpoint=checkpoint, model_dir=str(tmp_path / "run"),
                                  image_size=images.shape[1], **kwargs, **QUIET)
    model, exp, step = rundir.load_model(str(tmp_path / "run"))
    bgr = record["input_channels"] == "bgr"
    # The authors' graph took the array as BGR; the imported model takes RGB.
    ours = np.asarray(model(images[..., ::-1].copy() if bgr else images))
    scale = np.abs(logits).max()
    assert np.abs(ours - logits).max() <= 1e-5 * scale, np.abs(ours - logits).max() / scale
    assert (ours.argmax(1) == logits.argmax(1)).all()
    # The logits depend on the image (a mapping error would not hide in constant outputs).
    assert np.abs(logits[0] - logits[1]).max() > 0.1 * scale
    expected = ({"step counters and schedules": 2, "optimizer slots": 1,
                 "tensorpack's summary averages": 1} if bgr else
                {"step counters and schedules": 1, "optimizer slots": 1})
    if case == "b0-ema":
        expected["raw weights (their averages imported)"] = 311
    assert record["ignored"] == expected
    assert step == 0 and exp.model.name == record["model"]


def test_bgr_means_the_stem_kernel_sees_the_channels_reversed(tmp_path):
    """--input_channels=rgb takes the checkpoint as it is: the same logits on the array the
    authors' graph was fed; bgr (the default) on that array with its channels reversed."""
    ref = np.load(DATA / "reference_r50-silu.npz")
    images, logits = ref["images"].astype(np.float32), ref["logits"]
    checkpoint, kwargs = _reference_checkpoint(tmp_path, "r50-silu")
    ci.import_checkpoint(checkpoint=checkpoint, model_dir=str(tmp_path / "rgb"),
                         image_size=images.shape[1], input_channels="rgb", **kwargs, **QUIET)
    model, _, _ = rundir.load_model(str(tmp_path / "rgb"))
    scale = np.abs(logits).max()
    assert np.abs(np.asarray(model(images)) - logits).max() <= 1e-5 * scale
    assert np.abs(np.asarray(model(images[..., ::-1].copy())) - logits).max() > 0.05 * scale


# ---------------------------------------------------------------------------------------------
# Strictness

@pytest.fixture(scope="module")
def b0_variables():
    return release(B0)


def _import_b0(tmp_path, variables, extra=(), **kwargs):
    checkpoint = write_checkpoint(tmp_path / "ckpt" / "model", variables, extra)
    return ci.import_checkpoint("sat-efficientnet", checkpoint, str(tmp_path / "run"),
                                image_size=32, **kwargs, **QUIET)


def test_a_missing_variable_is_named_and_nothing_is_written(tmp_path, b0_variables):
    dropped = "efficientnet-b0/blocks_7/se/conv2d_1/bias"
    with pytest.raises(ci.MismatchError, match=r"1 variables missing \(" + dropped):
        _import_b0(tmp_path, [v for v in b0_variables if v[0] != dropped])
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if "importing" in p.name]


def test_a_variable_of_another_shape_is_named(tmp_path, b0_variables):
    bad = "efficientnet-b0/blocks_3/depthwise_conv2d/depthwise_kernel"
    variables = [(n, (3, 3, 144, 1) if n == bad else s) for n, s in b0_variables]
    with pytest.raises(ci.MismatchError) as e:
        _import_b0(tmp_path, variables)
    assert f"1 of another shape ({bad} [3, 3, 144, 1], expected [5, 5, 144, 1])" in str(e.value)
    assert "\n" not in str(e.value)


def test_left_over_variables_are_named_but_training_state_is_not(tmp_path, b0_variables):
    extra = [("efficientnet-b0/blocks_99/conv2d/kernel", np.zeros([1, 1, 8, 8], np.float32)),
             ("global_step", np.int64(3))]
    with pytest.raises(ci.MismatchError, match=r"1 left over \(efficientnet-b0/blocks_99/"):
        _import_b0(tmp_path, b0_variables, extra)
    record = _import_b0(tmp_path, b0_variables, [
        ("global_step", np.int64(3)),
        ("efficientnet-b0/head/dense/kernel/RMSProp", np.zeros([1280, 1000], np.float32)),
        ("efficientnet-b0/head/dense/kernel/RMSProp_1", np.zeros([1280, 1000], np.float32))])
    assert record["ignored"] == {"step counters and schedules": 1, "optimizer slots": 2}
    assert record["variables_read"] == 311 and record["reshaped"] == 196
    saved = json.loads((tmp_path / "run" / ci.IMPORT_FILE).read_text())
    assert saved["model"] == "efficientnet-b0" and saved["weights"] == "raw"


def test_ema_shadows_raw_by_default_averages_on_request(tmp_path, b0_variables):
    shadows = [(n + rr.EMA_SUFFIX, rr.value(n + rr.EMA_SUFFIX, s)) for n, s in b0_variables]
    checkpoint = write_checkpoint(tmp_path / "both" / "model", b0_variables, shadows)
    notes = []
    raw = ci.import_checkpoint("sat-efficientnet", checkpoint, str(tmp_path / "raw"),
                               image_size=32, log=notes.append)
    assert raw["weights"] == "raw" and raw["ignored"] == {"unchosen moving averages": 311}
    assert any("--use_ema imports the averages" in n for n in notes)
    ema = ci.import_checkpoint("sat-efficientnet", checkpoint, str(tmp_path / "ema"),
                               image_size=32, use_ema=True, **QUIET)
    assert ema["weights"] == "ema"
    assert ema["ignored"] == {"raw weights (their averages imported)": 311}
    name = "efficientnet-b0/head/conv2d/kernel"
    for run, wanted in (("raw", name), ("ema", name + rr.EMA_SUFFIX)):
        model, _, _ = rundir.load_model(str(tmp_path / run))
        np.testing.assert_array_equal(model.get_layer("head_conv").kernel.numpy(),
                                      rr.value(wanted, (1, 1, 320, 1280)))
    # Only the averages: they are what there is; raw weights asked for: refused.
    only = write_checkpoint(tmp_path / "only" / "model", [], shadows)
    assert ci.import_checkpoint("sat-efficientnet", only, str(tmp_path / "auto"),
                                image_size=32, **QUIET)["weights"] == "ema"
    with pytest.raises(ci.MismatchError, match="only the moving averages"):
        ci.import_checkpoint("sat-efficientnet", only, str(tmp_path / "no"), image_size=32,
                             use_ema=False, **QUIET)
    with pytest.raises(ci.MismatchError, match="holds no moving averages"):
        _import_b0(tmp_path, b0_variables, use_ema=True)


def test_the_model_is_read_from_the_checkpoint_and_contradictions_refused(tmp_path):
    smooth = write_checkpoint(tmp_path / "s" / "model", release(SMOOTH))
    record = ci.import_checkpoint("sat-resnet", smooth, str(tmp_path / "run"), image_size=32,
                                  **QUIET)
    assert (record["model"], record["activation"]) == ("resnet-50", "smooth_relu")
    model, _, _ = rundir.load_model(str(tmp_path / "run"))
    assert model.get_layer("stage4_block3_out").beta.numpy() == pytest.approx(
        rr.value("group3/block2/smoothrelu_beta", (1,))[0])
    with pytest.raises(ci.MismatchError, match="has SmoothReLU betas"):
        ci.import_checkpoint("sat-resnet", smooth, str(tmp_path / "x"), activation="silu",
                             **QUIET)
    with pytest.raises(ci.MismatchError, match="holds a resnet-50, not a resnet-101"):
        ci.import_checkpoint("sat-resnet", smooth, str(tmp_path / "x"), model="resnet-101",
                             **QUIET)
    with pytest.raises(ci.MismatchError, match="not a SAT EfficientNet checkpoint"):
        ci.import_checkpoint("sat-efficientnet", smooth, str(tmp_path / "x"), **QUIET)
    b0 = write_checkpoint(tmp_path / "b" / "model", release(B0))
    with pytest.raises(ci.MismatchError, match="not a SAT ResNet checkpoint"):
        ci.import_checkpoint("sat-resnet", b0, str(tmp_path / "x"), activation="silu", **QUIET)
    with pytest.raises(UserError, match="--activation is required"):
        ci.import_checkpoint("sat-resnet", write_checkpoint(tmp_path / "r" / "model",
                                                            release(RESNET50)),
                             str(tmp_path / "x"), **QUIET)
    assert not (tmp_path / "x").exists()


def test_the_release_names_and_numbers_reach_the_run(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "r" / "model", release(RESNEXT))
    ci.import_checkpoint("sat-resnet", checkpoint, str(tmp_path / "run"), activation="silu",
                         **QUIET)
    exp = rundir.read_experiment(str(tmp_path / "run"))
    assert exp.model.name == "resnext-50-32x4d" and exp.model.stem == "imagenet"
    assert (exp.model.image_size, exp.model.bn_epsilon, exp.model.normalization) == (
        224, 1e-5, "sat")
    assert exp.paper["clean"] == 71.1 and exp.paper["robust"] == 43.3
    assert (exp.eval_attack.epsilon, exp.eval_attack.step_size) == (4.0, 1.0)
    assert exp.train.ema_decay is None and exp.data.dataset == "imagenet"
    assert ci.release_activation("gelu") == "gelu_tanh"
    assert ci.release_activation("smoothrelu") == "smooth_relu"


def test_a_killed_imports_scratch_folder_is_cleared_by_the_next(tmp_path, b0_variables):
    # What an import killed while writing leaves: its scratch folder, named by its process.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f"run.importing-{dead}" / "ckpt-0_temp").mkdir(parents=True)
    alive = tmp_path / f"run.importing-{os.getppid()}"     # another import still writing
    alive.mkdir()
    _import_b0(tmp_path, b0_variables)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", "run", alive.name])


def test_a_failed_write_leaves_no_run_directory(tmp_path, b0_variables, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(tf.train.CheckpointManager, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        _import_b0(tmp_path, b0_variables)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ---------------------------------------------------------------------------------------------
# Keras' EfficientNet files

def _keras_b0(variance, size=64, classes=1000):
    """keras.applications.EfficientNetB0 with random batch-norm statistics, a larger classifier
    (logits of order one) and the given Normalization values."""
    rng = np.random.default_rng(0)
    m = keras.applications.EfficientNetB0(weights=None, classes=classes, input_shape=(size, size, 3),
                                          classifier_activation=None)
    for layer in m.layers:
        if isinstance(layer, keras.layers.Normalization):
            layer.weights[0].assign(ci.IMAGENET_MEAN)
            layer.weights[1].assign(variance)
            layer.finalize_state()
        elif isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape
            for w, v in zip(layer.weights, (rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c),
                                            rng.normal(0, 0.1, c), rng.uniform(0.5, 1.5, c))):
                w.assign(v)
    dense = m.get_layer("predictions")
    dense.kernel.assign(dense.kernel * 20.0)
    return m


def _save_legacy_h5(model, path):
    import h5py
    from keras.src.legacy.saving import legacy_h5_format
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


@pytest.mark.parametrize("variance, fmt", [
    (ci.IMAGENET_STD, "h5"),                    # as Keras publishes its ImageNet files
    (ci.IMAGENET_STD, "weights.h5"),
    (tuple(s * s for s in ci.IMAGENET_STD), "weights.h5"),   # a true variance
])
def test_keras_efficientnet_weights_give_keras_logits(tmp_path, variance, fmt, monkeypatch):
    published = variance == ci.IMAGENET_STD
    size = 224 if published else 64    # Keras' ImageNet model with its head is 224 x 224 only
    keras_model = _keras_b0(variance, size=size)
    path = str(tmp_path / f"b0.{fmt}")
    if fmt == "h5":
        _save_legacy_h5(keras_model, path)
    else:
        keras_model.save_weights(path)
    record = ci.import_checkpoint("keras-efficientnet", path, str(tmp_path / "run"),
                                  model="efficientnet-b0", image_size=size, **QUIET)
    assert record["normalization"] == "imagenet"
    assert record["keras_normalization"]["keras_imagenet_rescaling"] == published
    assert (record["bn_epsilon"], record["bn_momentum"]) == (1e-3, 0.99)
    x = np.random.default_rng(1).uniform(0, 255, (3, size, size, 3)).astype(np.float32)
    if published:
        # What Keras computes for its ImageNet weights: EfficientNetB0(weights="imagenet"),
        # with its download replaced by this file (its extra Rescaling layer included).
        from keras.src.applications import efficientnet
        legacy = str(tmp_path / "efficientnetb0.h5")
        _save_legacy_h5(keras_model, legacy)
        monkeypatch.setattr(efficientnet.file_utils, "get_file", lambda *a, **k: legacy)
        keras_model = keras.applications.EfficientNetB0(
            weights="imagenet", classifier_activation=None)
        assert sum(isinstance(layer, keras.layers.Rescaling) for layer in keras_model.layers) == 2
    expected = np.asarray(keras_model(x))
    model, _, _ = rundir.load_model(str(tmp_path / "run"))
    ours = np.asarray(model(x))
    assert np.abs(expected).max() > 1.0
    assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max()


def test_keras_files_that_do_not_fit_fail_in_one_line(tmp_path):
    keras_model = _keras_b0(ci.IMAGENET_STD, size=32, classes=10)
    path = str(tmp_path / "b0.weights.h5")
    keras_model.save_weights(path)
    with pytest.raises(ci.MismatchError) as e:
        ci.import_checkpoint("keras-efficientnet", path, str(tmp_path / "r"),
                             model="efficientnet-b0", image_size=32, **QUIET)
    assert "EfficientNetB0 with 1000 classes" in str(e.value) and "\n" not in str(e.value)
    record = ci.import_checkpoint("keras-efficientnet", path, str(tmp_path / "r"),
                                  model="efficientnet-b0", image_size=32, num_classes=10, **QUIET)
    assert record["num_classes"] == 10
    with pytest.raises(ci.MismatchError, match="EfficientNetB1"):
        ci.import_checkpoint("keras-efficientnet", path, str(tmp_path / "r1"),
                             model="efficientnet-b1", image_size=32, num_classes=10, **QUIET)


def test_keras_normalisation_is_read_as_keras_applies_it():
    assert ci.keras_normalization(ci.IMAGENET_MEAN, ci.IMAGENET_STD)[0] == "imagenet"
    assert ci.keras_normalization((0.5,) * 3, (0.25,) * 3)[0] == "sat"
    with pytest.raises(ci.MismatchError, match=r"mean \[0.0, 0.0, 0.0\], std \[1.0, 1.0, 1.0\]"):
        ci.keras_normalization((0.0,) * 3, (1.0,) * 3)   # a never-adapted layer


# ---------------------------------------------------------------------------------------------
# Fine-tuning from another run's weights

def _small_run(tmp_path, name, num_classes=10, ema_decay=None, seed=0):
    from sat_tf import experiments
    keras.utils.set_random_seed(seed)
    exp = experiments.get("synthetic-smoke")
    exp = exp.replace(**{"model.name": "wrn-10-1", "model.num_classes": num_classes,
                         "model_dir": str(tmp_path / name), "train.ema_decay": ema_decay})
    model = rundir.build_model(exp)
    ci._write_run(str(tmp_path / name), model, exp, {"test": True})
    keras.utils.set_random_seed(0)
    return model, exp


def test_warm_start_copies_every_weight_and_refreshes_the_classifier_only(tmp_path):
    source, exp = _small_run(tmp_path, "source")
    target = rundir.build_model(exp)
    info = rundir.warm_start(target, str(tmp_path / "source"), **QUIET)
    for a, b in zip(source.weights, target.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not info["classifier_reinitialised"]
    other = rundir.build_model(exp.replace(**{"model.num_classes": 17}))
    head = other.get_layer("logits").kernel.numpy()
    info = rundir.warm_start(other, str(tmp_path / "source"), **QUIET)
    assert info["classifier_reinitialised"] and info["weights"] == len(other.weights) - 2
    np.testing.assert_array_equal(other.get_layer("logits").kernel.numpy(), head)
    wider = rundir.build_model(exp.replace(**{"model.name": "wrn-10-2"}))
    with pytest.raises(rundir.RunDirError, match="of another shape") as e:
        rundir.warm_start(wider, str(tmp_path / "source"), **QUIET)
    assert "\n" not in str(e.value)


def test_warm_start_takes_the_sources_averages_and_restarts_this_runs(tmp_path):
    """A source that kept an EMA gives its averages; a new run with an EMA starts its averages
    from the weights it was given (not from its random initialisation)."""
    from sat_tf import ema as ema_lib
    from sat_tf import training
    source, exp = _small_run(tmp_path, "source", seed=1)
    exp = exp.replace(**{"train.ema_decay": 0.99, "model_dir": str(tmp_path / "source")})
    rundir.write_experiment(str(tmp_path / "source"), exp)
    averages = ema_lib.ExponentialMovingAverage(source, 0.99)
    for a in averages.averages:
        a.assign(a + 1.0)
    for path in tf.io.gfile.glob(str(tmp_path / "source" / "ckpt-*")):
        tf.io.gfile.remove(path)
    tf.train.Checkpoint(model=source, step=tf.Variable(7, dtype=tf.int64),
                        ema=averages).save(str(tmp_path / "source" / "ckpt"))
    target = rundir.build_model(exp)
    info = rundir.warm_start(target, str(tmp_path / "source"), **QUIET)
    assert info["step"] == 7
    trained = source.trainable_weights[0].numpy()
    np.testing.assert_allclose(target.trainable_weights[0].numpy(), trained + 1.0)

    run = exp.replace(**{"model_dir": str(tmp_path / "ft"), "train.train_steps": 1,
                         "train.init_from": str(tmp_path / "source")})
    trainer = training.Trainer(run, **QUIET)
    for avg, w in zip(trainer.ema.averages, trainer.ema._targets.value):
        np.testing.assert_array_equal(avg.numpy(), np.asarray(w))
    np.testing.assert_allclose(trainer.model.trainable_weights[0].numpy(), trained + 1.0)


def test_the_l1_scope_and_variants_are_read_from_the_names():
    names = {"efficientnet-bL1/stem/conv2d/kernel" + rr.EMA_SUFFIX: (3, 3, 3, 128),
             "efficientnet-bL1/head/dense/kernel" + rr.EMA_SUFFIX: (4992, 1000)}
    reader = ci.Reader(names, None, "checkpoint 'l1'")
    plan = ci.plan_sat_efficientnet(reader, activation=None, model=None, image_size=None,
                                    use_ema=None)
    assert (plan.model, plan.scope, plan.weights, plan.image_size) == (
        "efficientnet-l1", "efficientnet-bL1", "ema", 600)
    assert ci._fits((1, 1, 1, 1, 32), (32,)) and ci._fits((1,), ())
    assert not ci._fits((3, 3, 1, 64), (3, 3, 64, 1)) and not ci._fits((1, 3, 5), (3, 1, 5))


def test_stray_averages_and_a_cut_data_file_are_refused(tmp_path, b0_variables):
    stray = "efficientnet-b0/blocks_99/conv2d/kernel" + rr.EMA_SUFFIX
    with pytest.raises(ci.MismatchError, match="1 left over .efficientnet-b0/blocks_99/"):
        _import_b0(tmp_path, b0_variables, [(stray, np.zeros([1], np.float32))])
    checkpoint = write_checkpoint(tmp_path / "cut" / "model", b0_variables)
    data = checkpoint + ".data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with pytest.raises(ci.MismatchError, match="is its .data file complete") as e:
        ci.import_checkpoint("sat-efficientnet", checkpoint, str(tmp_path / "run"),
                             image_size=32, **QUIET)
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_a_bucket_folder_is_written_whole_and_never_over_a_run(tmp_path, b0_variables):
    checkpoint = write_checkpoint(tmp_path / "ckpt" / "model", b0_variables)
    bucket = "ram://import-test/run"
    ci.import_checkpoint("sat-efficientnet", checkpoint, bucket, image_size=32, **QUIET)
    model, exp, step = rundir.load_model(bucket)
    assert exp.model.name == "efficientnet-b0" and step == 0
    with pytest.raises(UserError, match="exists and is not empty"):
        ci.import_checkpoint("sat-efficientnet", checkpoint, bucket, image_size=32, **QUIET)


def test_train_cli_fine_tunes_from_an_imported_run(tmp_path):
    source, exp = _small_run(tmp_path, "source", num_classes=10, seed=1)
    fresh = rundir.build_model(exp)      # what train.py's seed 0 starts from without the source
    # Fine-tuning with another head: the synthetic data's 5 classes.
    cmd = [sys.executable, str(ROOT / "run" / "train.py"), f"--init_from={tmp_path / 'source'}",
           "--dataset=synthetic", "--num_classes=5", "--train_steps=1", "--train_batch_size=8",
           "--eval_steps=1", "--eval_batch_size=8", "--eval_attack_steps=1",
           f"--model_dir={tmp_path / 'ft'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Initialised" in proc.stdout and "fresh initialisation" in proc.stdout
    ft = rundir.read_experiment(str(tmp_path / "ft"))
    assert ft.model.name == exp.model.name and ft.model.num_classes == 5
    assert ft.train.init_from == str(tmp_path / "source")
    tuned, _, step = rundir.load_model(str(tmp_path / "ft"))
    assert step == 1
    # One step of a small learning rate moves the weights a little from the source's.
    a = source.get_layer("stem_conv").kernel.numpy()
    b = tuned.get_layer("stem_conv").kernel.numpy()
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
    assert np.abs(fresh.get_layer("stem_conv").kernel.numpy() - b).max() > np.abs(a).max()


# ---------------------------------------------------------------------------------------------
# The command line

@pytest.mark.parametrize("args, words", [
    ([], ["--source is required"]),
    (["--source=tensorpack"], ["Invalid source 'tensorpack'", "sat-resnet, sat-efficientnet"]),
    (["--source=sat-resnet"], ["--checkpoint is required"]),
    (["--source=sat-resnet", "--checkpoint=CKPT.index"], ["without .index"]),
    (["--source=sat-resnet", "--checkpoint=nowhere/model"], ["not found", "nowhere/model.index"]),
    (["--source=sat-resnet", "--checkpoint=CKPT", "--activation=swishy"],
     ["Invalid activation 'swishy'", "smoothrelu"]),
    (["--source=sat-resnet", "--checkpoint=CKPT", "--use_ema"], ["sat-efficientnet only"]),
    (["--source=sat-efficientnet", "--checkpoint=CKPT", "--input_channels=bgr"],
     ["sat-resnet only"]),
    (["--source=sat-resnet", "--checkpoint=CKPT", "--input_channels=bgra"],
     ["Invalid input_channels 'bgra'", "bgr, rgb"]),
    (["--source=sat-resnet", "--checkpoint=CKPT", "--model=efficientnet-b0"],
     ["for sat-resnet"]),
    (["--source=keras-efficientnet", "--checkpoint=W.h5"], ["--model is required",
                                                            "efficientnet-b7"]),
    (["--source=keras-efficientnet", "--checkpoint=W.h5", "--model=efficientnet-l1"],
     ["Invalid model 'efficientnet-l1' for keras-efficientnet"]),
    (["--source=keras-efficientnet", "--checkpoint=CKPT", "--model=efficientnet-b0"],
     ["Invalid Keras weights file"]),
    (["--source=sat-resnet", "--checkpoint=CKPT", "--model_dir=TAKEN"], ["not empty"]),
    (["--source=sat-efficientnet", "--checkpoint=CKPT", "--activation=relu"],
     ["Invalid activation 'relu' for sat-efficientnet", "silu"]),
])
def test_bad_flags_fail_fast_in_one_line_without_tensorflow(tmp_path, args, words):
    (tmp_path / "ckpt.index").write_text("")
    (tmp_path / "w.h5").write_text("")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    subs = {"CKPT": str(tmp_path / "ckpt"), "W.h5": str(tmp_path / "w.h5"),
            "TAKEN": str(tmp_path / "taken"), "nowhere": str(tmp_path / "nowhere")}
    args = [a for a in args]
    for k, v in subs.items():
        args = [a.replace(k, v) for a in args]
    if not any(a.startswith("--model_dir") for a in args) and args:
        args.append(f"--model_dir={tmp_path / 'new'}")
    proc = subprocess.run([sys.executable, IMPORT, *args], capture_output=True, text=True,
                          env=_without_tensorflow(tmp_path), timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("import_checkpoint.py: error: "), lines
    for w in words:
        assert w in lines[0]


def test_cli_imports_and_eval_and_export_use_the_run(tmp_path):
    """The README's route on a Keras file: import, evaluate, export; a mismatch is one line
    with status 1."""
    keras_model = _keras_b0(ci.IMAGENET_STD, size=32)
    keras_model.save_weights(str(tmp_path / "b0.weights.h5"))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, IMPORT, "--source=keras-efficientnet",
                           "--model=efficientnet-b0", f"--checkpoint={tmp_path / 'b0.weights.h5'}",
                           "--image_size=32", f"--model_dir={run}"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Imported 311 variables" in proc.stdout
    proc = subprocess.run([sys.executable, str(ROOT / "run" / "eval.py"), f"--model_dir={run}",
                           "--dataset=synthetic", "--max_batches=1", "--eval_batch_size=4",
                           "--attack_steps=1", "--sanity_epsilon=0", f"--report={tmp_path / 'r.json'}"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model"]["name"] == "efficientnet-b0" and report["model"]["step"] == 0
    from sat_tf import export, loading
    export.export_run(loading.resolve(model_dir=str(run)), str(tmp_path / "export"))
    served = tf.saved_model.load(str(tmp_path / "export"))
    x = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    model, _, _ = rundir.load_model(str(run))
    np.testing.assert_allclose(served.signatures["serving_default"](images=x)["logits"].numpy(),
                               np.asarray(model(x)), rtol=1e-5, atol=1e-5)
    # A checkpoint that is not the source's: one line, status 1, nothing written.
    other = write_checkpoint(tmp_path / "other" / "model",
                             [("conv0/W", (7, 7, 3, 64)), ("linear/W", (2048, 10))])
    proc = subprocess.run([sys.executable, IMPORT, "--source=sat-efficientnet",
                           f"--checkpoint={other}", f"--model_dir={tmp_path / 'b1'}"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "import_checkpoint.py: error: checkpoint "), proc.stderr
    assert "is not a SAT EfficientNet checkpoint" in proc.stderr
    assert not (tmp_path / "b1").exists()
