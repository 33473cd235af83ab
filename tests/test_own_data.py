"""A researcher's own dataset end to end (issue: real data): scikit-learn's real handwritten
digits written as a 10-class folder of 32x32 PNGs, converted, then trained, evaluated and
exported with no flag beyond the paths (plus a short length, to keep the suite fast).

Independent truths: the tree's own class count and image counts, the original pixels (a
whole-image evaluation must reproduce them; the ImageNet centre crop cannot), the shard file a
corruption was written into, and the epsilon the run trained with.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from sat_tf import cli, data as data_lib, rundir, training
from sat_tf.config import DataConfig, Experiment, ModelConfig, ScheduleConfig, TrainConfig
from sat_tf.data import testing

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN = ROOT / "run"
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
TRAIN_PER_CLASS, VAL_PER_CLASS = 20, 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    truth = testing.write_digits_tree(str(root / "raw"), image_size=32,
                                      train_per_class=TRAIN_PER_CLASS,
                                      validation_per_class=VAL_PER_CLASS)
    out = str(root / "tfrecords")
    result = subprocess.run([sys.executable, str(RUN / "make_tfrecords.py"),
                             f"--input={root / 'raw'}", f"--output_dir={out}", "--noprogress"],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return str(root / "raw"), out, truth


def test_conversion_records_what_training_reads(folder):
    _, out, truth = folder
    with open(os.path.join(out, "conversion.json")) as f:
        manifest = json.load(f)
    assert manifest["dataset"] == "images" and manifest["num_classes"] == 10
    assert manifest["label_base"] == 1
    assert manifest["image_size"]["median_short_side"] == 32
    # A small folder gets one shard per split, not ImageNet's 1024 + 128.
    assert sorted(os.listdir(out)) == sorted(["conversion.json", "label_map.txt",
                                              "train-00000-of-00001",
                                              "validation-00000-of-00001"])
    info = data_lib.info(DataConfig(dataset="images", data_dir=out))
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (
        10, len(truth["train"]), len(truth["validation"]))
    assert (info.image_size, info.preprocessing, info.label_base) == (32, "resize", 1)
    # --dataset=imagenet on the same folder reads the same facts (ImageNet's defaults only
    # stand for a folder without a record).
    assert data_lib.info(DataConfig(dataset="imagenet", data_dir=out)).num_classes == 10
    bare = data_lib.info(DataConfig(dataset="imagenet", data_dir=os.path.dirname(out)))
    assert (bare.num_classes, bare.num_train_examples, bare.preprocessing) == (
        1000, 1_281_167, "imagenet")


def test_the_run_gets_the_datas_head_schedule_and_records_them(folder, tmp_path):
    _, out, truth = folder
    exp = Experiment(model=ModelConfig(name="wrn-10-1"),
                     data=DataConfig(dataset="images", data_dir=out),
                     train=TrainConfig(global_batch_size=50, train_epochs=2),
                     schedule=ScheduleConfig(warmup_epochs=0.0),
                     model_dir=str(tmp_path))
    resolved = rundir.resolve_experiment(exp)
    assert (resolved.model.num_classes, resolved.model.image_size) == (10, 32)
    assert resolved.data.num_train_examples == len(truth["train"]) == 200
    assert resolved.data.preprocessing == "resize"
    trainer = training.Trainer(exp, strategy=tf.distribute.get_strategy(), log=lambda _: None)
    assert trainer.steps_per_epoch == 4 and trainer.total_steps == 8   # 200 images / 50
    assert trainer.model.output_shape == (None, 10)
    # Any head at least as wide as the data's labels; a narrower one is refused, by name.
    assert rundir.model_shape(exp.replace(**{"model.num_classes": 12}))[0] == 12
    with pytest.raises(ValueError, match="num_classes 5 is smaller than the 10 classes .*"
                                         "conversion.json"):
        rundir.model_shape(exp.replace(**{"model.num_classes": 5}))


def _eval_images(data_dir, preprocessing):
    ds = data_lib.build_dataset(DataConfig(dataset="images", data_dir=data_dir,
                                           preprocessing=preprocessing),
                                split="eval", batch_size=64, image_size=32)
    images, labels, mask = next(iter(ds))
    return images.numpy()[mask.numpy() > 0], labels.numpy()[mask.numpy() > 0]


def test_whole_image_evaluation_keeps_the_image_the_centre_crop_does_not(folder):
    raw, out, truth = folder
    # The original pixels of every validation image, by (class, sorted pixel sum): the
    # converter shuffles the order.
    originals = sorted(
        np.asarray(Image.open(os.path.join(raw, "validation", c, f)).convert("RGB"), np.float32)
        .sum() for f, c in truth["validation"].items())
    whole, labels = _eval_images(out, "resize")
    crop, _ = _eval_images(out, "imagenet")
    assert sorted(np.bincount(labels, minlength=10)) == [VAL_PER_CLASS] * 10
    # JPEG (quality 100) of the converter: within a grey level per pixel on average.
    got = sorted(image.sum() for image in whole)
    assert np.allclose(got, originals, rtol=0.01)
    cropped = sorted(image.sum() for image in crop)
    assert not np.allclose(cropped, originals, rtol=0.05)


def test_labels_on_disk_may_start_at_zero(tmp_path):
    jpeg = tf.io.encode_jpeg(tf.fill([8, 8, 3], tf.constant(90, tf.uint8))).numpy()
    with tf.io.TFRecordWriter(str(tmp_path / "validation-00000-of-00001")) as w:
        for label in (0, 1):
            w.write(_raw_example(jpeg, label))
    cfg = DataConfig(dataset="images", data_dir=str(tmp_path), num_classes=2,
                     num_train_examples=2, num_eval_examples=2, label_base=0)
    _, labels, mask = next(iter(data_lib.build_dataset(cfg, split="eval", batch_size=2,
                                                       image_size=8)))
    assert labels.numpy().tolist() == [0, 1]
    # Read as 1-based, label 0 is a bad record, named like a corrupt one.
    one_based = DataConfig(dataset="images", data_dir=str(tmp_path), label_base=1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="Corrupt record .*record 0 of"):
        list(data_lib.build_dataset(one_based, split="eval", batch_size=2, image_size=8))


def _raw_example(jpeg, label):
    """A record whose label is stored as given (another tool's 0-based labels)."""
    feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg])),
               "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(
                   value=[label]))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_a_folder_without_metadata_asks_for_its_class_count(tmp_path):
    exp = Experiment(model=ModelConfig(name="wrn-10-1"),
                     data=DataConfig(dataset="images", data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="give --num_classes"):
        rundir.model_shape(exp)
    assert rundir.model_shape(exp.replace(**{"model.num_classes": 7,
                                               "model.image_size": 32})) == (7, 32)


def test_a_run_that_cannot_fit_stops_before_it_starts(tmp_path):
    exp = Experiment(model=ModelConfig(name="efficientnet-l1", activation="silu", image_size=600),
                     train=TrainConfig(global_batch_size=4096), model_dir=str(tmp_path))
    with pytest.raises(ValueError) as err:
        training.Trainer(exp, strategy=tf.distribute.get_strategy(), log=lambda _: None)
    message = str(err.value)
    assert "\n" not in message and "TiB of memory per replica" in message
    assert "GiB available" in message and "--train_batch_size" in message
    assert not os.listdir(tmp_path)          # nothing written, no model built


def test_tensorflow_errors_become_their_meaningful_line():
    message = ("Graph execution error:\n\nDetected at node Assert defined at (most recent call "
               "last):\n  File \"/x/train.py\", line 3, in <module>\n\nassertion failed: "
               "[Corrupt record or undecodable image: record 4 of /d/train-00000-of-00001]\n"
               "\t [[{{node Assert}}]]\n\t [[IteratorGetNext]] [Op:__inference_loop_123]")
    assert cli.tf_error_line(message) == ("Corrupt record or undecodable image: record 4 of "
                                          "/d/train-00000-of-00001")
    assert cli.tf_error_line("Graph execution error:\n\nSomething else broke\n") == (
        "Something else broke")


def _run(script, *args, status=0, timeout=600):
    proc = subprocess.run([sys.executable, str(RUN / script), *args], capture_output=True,
                          text=True, env=ENV, timeout=timeout)
    assert proc.returncode == status, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc.stdout, proc.stderr


def _corrupt_copy(src, dst, split):
    """``dst``: ``src`` with the first record of ``split``'s shard holding a broken image."""
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    shard = os.path.join(dst, f"{split}-00000-of-00001")
    records = [r.numpy() for r in tf.data.TFRecordDataset(shard)]
    with tf.io.TFRecordWriter(shard) as w:
        w.write(_raw_example(b"\xff\xd8\xff\xe0 not a jpeg", 1))
        for r in records[1:]:
            w.write(r)
    return shard


def test_own_folder_trains_evaluates_and_exports_with_only_paths(folder, tmp_path):
    _, out, truth = folder
    model_dir, export_dir = str(tmp_path / "run"), str(tmp_path / "export")
    stdout, _ = _run("train.py", f"--data_dir={out}", f"--model_dir={model_dir}",
                     "--model=wrn-10-1", "--train_batch_size=50", "--train_steps=4",
                     "--attack_epsilon=16", "--steps_per_loop=2", "--eval_attack_steps=2")
    assert "Training wrn-10-1 (relu) on images: 4 steps of 50 images" in stdout
    assert "(4.0 steps per epoch)" in stdout
    with open(os.path.join(model_dir, "experiment.json")) as f:
        recorded = Experiment.from_dict(json.load(f))
    assert (recorded.model.num_classes, recorded.model.image_size) == (10, 32)
    assert recorded.data.preprocessing == "resize"
    # Step sizes keep their ratio to epsilon: training PGD-1 step 16, evaluation step 4.
    assert (recorded.train_attack.step_size, recorded.eval_attack.step_size) == (16.0, 4.0)

    report_path = str(tmp_path / "report.json")
    stdout, _ = _run("eval.py", f"--model_dir={model_dir}", f"--report={report_path}",
                     "--attack_steps=2", "--sanity_epsilon=0")
    assert f"on images: {len(truth['validation'])} examples" in stdout
    with open(report_path) as f:
        report = json.load(f)
    protocol = report["protocol"]
    assert protocol["attack_epsilons"] == [16.0] and protocol["attack_step_size"] == 4.0
    assert protocol["given_by_flags"] == ["attack_steps", "sanity_epsilon"]
    assert report["data"]["examples_in_split"] == len(truth["validation"])
    assert report["data"]["complete"]

    _run("export.py", f"--model_dir={model_dir}", f"--export_dir={export_dir}")
    with open(os.path.join(export_dir, "assets", "sat_tf_export.json")) as f:
        meta = json.load(f)
    assert meta["data_preprocessing"] == "resize" and meta["num_classes"] == 10
    assert "whole image" in meta["preprocessing"]["serving_encoded"]

    # A corrupt shard is named, in one line, by training and by evaluation; evaluation can
    # skip it instead.
    broken = str(tmp_path / "broken")
    shard = _corrupt_copy(out, broken, "train")
    _, err = _run("train.py", f"--data_dir={broken}", f"--model_dir={tmp_path / 'run2'}",
                  "--model=wrn-10-1", "--train_batch_size=50", "--train_steps=8", status=1)
    lines = [line for line in err.splitlines() if line.startswith("train.py:")]
    assert lines == [f"train.py: error: Corrupt record or undecodable image: record 0 of "
                     f"{shard}"], err[-2000:]
    shard = _corrupt_copy(out, str(tmp_path / "broken-eval"), "validation")
    args = [f"--model_dir={model_dir}", f"--data_dir={tmp_path / 'broken-eval'}",
            "--attack_steps=1", "--sanity_epsilon=0", f"--report={tmp_path / 'r2.json'}"]
    _, err = _run("eval.py", *args, status=1)
    assert f"eval.py: error: Corrupt record or undecodable image: record 0 of {shard}" in err
    stdout, err = _run("eval.py", *args, "--skip_corrupt")
    assert f"skipped corrupt record 0 of {shard}" in err
    assert f"on images: {len(truth['validation'])} examples" in stdout


def test_a_resolved_run_does_not_read_the_record_again(folder, monkeypatch):
    """Every host pipeline of a pod builds from the resolved experiment: no further reads of
    conversion.json (a round trip each on a bucket)."""
    _, out, _ = folder
    exp = rundir.resolve_experiment(Experiment(
        model=ModelConfig(name="wrn-10-1"), data=DataConfig(dataset="images", data_dir=out)))

    def read(data_dir):
        raise AssertionError(f"conversion.json of {data_dir} read again")

    monkeypatch.setattr(data_lib, "read_metadata", read)
    assert rundir.model_shape(exp) == (10, 32)
    facts = data_lib.info(exp.data)
    assert (facts.num_classes, facts.num_eval_examples, facts.preprocessing) == (10, 50, "resize")
