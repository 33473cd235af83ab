"""What a TPU needs, checked on CPU: XLA-compilable steps over static shapes, bfloat16 by
default on a TPU, batch sizes that fit any replica count, pod paths, and one listing of the
shards however many hosts build pipelines. (TPUStrategy itself cannot run here; it shares the
step under ``strategy.run`` tested with MirroredStrategy and MultiWorkerMirroredStrategy.)"""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from sat_tf import attacks, data, distribute, evaluation, training
from sat_tf.config import (AttackConfig, DataConfig, EvalConfig, Experiment, LoopConfig,
                           ModelConfig, RuntimeConfig, ScheduleConfig, TrainConfig)
from sat_tf.data import convert, testing, tfrecord


@pytest.fixture(autouse=True)
def _float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


# ---- XLA: the whole training and evaluation steps compile, over static shapes ----------------

def _experiment(tmp_path):
    return Experiment(
        model=ModelConfig(name="wrn-10-1", activation="silu", dropout_rate=0.3),
        data=DataConfig(dataset="synthetic", synthetic_image_size=16, synthetic_num_classes=4,
                        synthetic_train_examples=64, synthetic_eval_examples=16),
        train_attack=AttackConfig(epsilon=8.0, step_size=8.0, num_steps=1),
        eval_attack=AttackConfig(epsilon=8.0, step_size=4.0, num_steps=2, clean_start_prob=0.0),
        train=TrainConfig(global_batch_size=8, train_steps=2, ema_decay=0.99),
        schedule=ScheduleConfig(name="constant", warmup_epochs=0.0),
        loop=LoopConfig(steps_per_loop=1, summary_every_steps=1, checkpoint_every_steps=100),
        runtime=RuntimeConfig(strategy="one_device"), model_dir=str(tmp_path))


def test_whole_training_step_compiles_with_xla(tmp_path):
    """Attack, forward, loss, gradients, optimizer, EMA, metrics, example images and the
    random-stream shift: one XLA cluster, as a TPU compiles it."""
    trainer = training.Trainer(_experiment(tmp_path), log=lambda _: None)
    images, labels = next(iter(trainer._train_dataset(0)))
    step = tf.function(lambda x, y: trainer._replica_step(x, y, tf.constant(True)),
                       jit_compile=True)
    before = [np.array(w) for w in trainer.model.trainable_weights]
    step(images, labels)
    step(images, labels)
    assert int(trainer.step.numpy()) == 2
    assert any(not np.array_equal(b, np.array(w))
               for b, w in zip(before, trainer.model.trainable_weights))
    assert float(trainer._metrics["examples"].read_value()) == 16.0
    assert np.isfinite(float(trainer._metrics["loss"].read_value()))


def test_evaluation_step_compiles_with_xla(tmp_path):
    trainer = training.Trainer(_experiment(tmp_path), log=lambda _: None)
    ds = data.build_dataset(trainer.experiment.data, split="eval", batch_size=8,
                            image_size=16)
    images, labels, mask = next(iter(ds))
    counts = tf.function(lambda x, y, m: evaluation._batch_counts(
        trainer.model, x, y, m, [trainer.experiment.eval_attack], 2,
        tf.constant([1, 2], tf.int64), 1), jit_compile=True)
    n, top1, *_ = counts(images, labels, mask)
    assert float(n) == 8.0 and 0.0 <= float(top1) <= 8.0


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagenet"))
    testing.write_imagenet_tree(os.path.join(root, "raw"), num_classes=2, train_per_class=3,
                                validation_per_class=2, image_shape=(40, 48))
    out = os.path.join(root, "tfrecords")
    convert.convert_imagenet_tree(os.path.join(root, "raw"), out, train_shards=3,
                                  validation_shards=2, num_workers=1, progress=False)
    return out


@pytest.mark.parametrize("cfg", [
    lambda d: DataConfig(dataset="synthetic", synthetic_image_size=16),
    lambda d: DataConfig(dataset="imagenet", data_dir=d, shuffle_buffer=8),
    lambda d: DataConfig(dataset="imagenet", data_dir=d, shuffle_buffer=8,
                         augment="randaugment"),
], ids=["synthetic", "imagenet", "imagenet-randaugment"])
def test_every_pipeline_has_static_shapes(shards, cfg):
    for split in ("train", "eval"):
        ds = data.build_dataset(cfg(shards), split=split, batch_size=4, image_size=24)
        for spec in tf.nest.flatten(ds.element_spec):
            assert spec.shape.is_fully_defined(), (split, spec)


# ---- precision, batch sizes, pod paths --------------------------------------------------------

def test_tpu_trains_in_bfloat16_by_default_and_refuses_float16():
    assert RuntimeConfig(tpu="local").precision_policy() == "mixed_bfloat16"
    assert RuntimeConfig().precision_policy() == "float32"
    assert RuntimeConfig(tpu="local", mixed_precision="none").precision_policy() == "float32"
    with pytest.raises(ValueError, match="mixed_float16.*valid choices: auto, mixed_bfloat16"):
        RuntimeConfig(tpu="local", mixed_precision="mixed_float16").validate()
    distribute.configure(RuntimeConfig(strategy="default"))
    assert keras.mixed_precision.global_policy().name == "float32"


@pytest.mark.parametrize("replicas, expected", [(1, 128), (2, 128), (8, 128), (3, 129),
                                                (6, 132), (256, 256)])
def test_default_eval_batch_fits_any_replica_count(replicas, expected):
    class Fake:
        num_replicas_in_sync = replicas
    assert distribute.eval_batch_size(None, Fake()) == expected
    assert distribute.eval_batch_size(None, Fake()) % replicas == 0


def test_explicit_eval_batch_must_divide():
    class Fake:
        num_replicas_in_sync = 8
    assert distribute.eval_batch_size(64, Fake()) == 64
    with pytest.raises(ValueError, match="eval batch size 100 is not divisible by the 8"):
        distribute.eval_batch_size(100, Fake())


def _imagenet(model_dir, data_dir, tpu):
    return Experiment(data=DataConfig(dataset="imagenet", data_dir=data_dir),
                      runtime=RuntimeConfig(tpu=tpu), model_dir=model_dir)


def test_a_named_tpu_needs_bucket_paths():
    _imagenet("gs://b/run", "gs://b/imagenet", "my-pod").validate()
    _imagenet("/tmp/run", "/data/imagenet", "local").validate()     # a single TPU VM
    with pytest.raises(ValueError, match="model_dir '/tmp/run' for TPU 'my-pod'.*gs://"):
        _imagenet("/tmp/run", "gs://b/imagenet", "my-pod").validate()
    with pytest.raises(ValueError, match="data_dir '/data/imagenet' for TPU 'my-pod'.*gs://"):
        _imagenet("gs://b/run", "/data/imagenet", "my-pod").validate()
    cifar = Experiment(data=DataConfig(dataset="cifar10"), runtime=RuntimeConfig(tpu="my-pod"),
                       model_dir="gs://b/run")
    with pytest.raises(ValueError, match="data_dir None.*TFDS prepares it"):
        cifar.validate()


def test_hosts_list_and_stat_the_shards_once(shards, monkeypatch):
    """On a pod the client builds one pipeline per host: inside remembered_listings the
    folder is listed once and each shard statted once; outside, nothing is remembered."""
    calls = {"glob": 0, "stat": 0}
    glob, stat = tf.io.gfile.glob, tf.io.gfile.stat

    def counting_glob(pattern):
        calls["glob"] += 1
        return glob(pattern)

    def counting_stat(path):
        calls["stat"] += 1
        return stat(path)

    monkeypatch.setattr(tf.io.gfile, "glob", counting_glob)
    monkeypatch.setattr(tf.io.gfile, "stat", counting_stat)
    cfg = DataConfig(dataset="imagenet", data_dir=shards, shuffle_buffer=8)

    def build_for_hosts():
        for host in range(4):
            ctx = tf.distribute.InputContext(num_input_pipelines=4, input_pipeline_id=host,
                                             num_replicas_in_sync=4)
            data.build_dataset(cfg, split="eval", batch_size=2, image_size=16,
                               input_context=ctx)

    with data.remembered_listings():
        build_for_hosts()
    assert calls == {"glob": 1, "stat": 2}, calls       # 2 validation shards
    calls.update(glob=0, stat=0)
    build_for_hosts()
    assert calls["glob"] == 4, calls
