"""Strategies from RuntimeConfig on this CPU machine (conftest splits it into 2 logical CPUs)."""
import keras
import pytest
import tensorflow as tf

from sat_tf import distribute
from sat_tf.config import RuntimeConfig


@pytest.fixture(autouse=True)
def _float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_mirrored_uses_every_logical_cpu_without_gpus():
    strategy = distribute.strategy_from_config(RuntimeConfig(strategy="mirrored"))
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == 2
    assert distribute.per_replica_batch_size(32, strategy) == 16


def test_mirrored_with_explicit_devices():
    strategy = distribute.strategy_from_config(
        RuntimeConfig(strategy="mirrored", devices=("/cpu:1",)))
    assert strategy.num_replicas_in_sync == 1
    assert strategy.extended.worker_devices[0].endswith("CPU:1")


def test_num_gpus_zero_means_the_cpu():
    strategy = distribute.strategy_from_config(RuntimeConfig(strategy="mirrored", num_gpus=0))
    assert strategy.num_replicas_in_sync == 1


@pytest.mark.parametrize("name, cls", [("one_device", tf.distribute.OneDeviceStrategy),
                                       ("default", type(tf.distribute.get_strategy()))])
def test_single_replica_strategies(name, cls):
    strategy = distribute.strategy_from_config(RuntimeConfig(strategy=name))
    assert isinstance(strategy, cls)
    assert strategy.num_replicas_in_sync == 1
    assert distribute.per_replica_batch_size(33, strategy) == 33


def test_indivisible_global_batch_is_a_one_line_error():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with pytest.raises(ValueError) as e:
        distribute.per_replica_batch_size(33, strategy)
    msg = str(e.value)
    assert "\n" not in msg and "33" in msg and "2 replicas" in msg


def test_logical_cpus_already_split_is_a_noop_and_resplit_is_a_clear_error():
    # TensorFlow initialises its devices on first use: make sure it has (this test may run
    # alone, before any other TensorFlow work), with conftest's 2 logical CPUs.
    assert len(tf.config.list_logical_devices("CPU")) == 2
    distribute.split_cpu(2)  # conftest's split: nothing to do
    with pytest.raises(RuntimeError, match="already initialised"):
        distribute.split_cpu(3)
    assert len(tf.config.list_logical_devices("CPU")) == 2


def test_mixed_precision_policy_is_set():
    distribute.configure(RuntimeConfig(mixed_precision="mixed_bfloat16"))
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    distribute.configure(RuntimeConfig())
    assert keras.mixed_precision.global_policy().name == "float32"


@pytest.mark.parametrize("kw, match", [
    (dict(strategy="mirrored", tpu="my-tpu"), "needs strategy 'tpu'"),
    (dict(strategy="tpu"), "needs a TPU name"),
    (dict(strategy="default", num_gpus=2), "applies to strategy 'mirrored'"),
    (dict(strategy="mirrored", num_gpus=1, devices=("/gpu:0",)), "not both"),
    (dict(strategy="parameter_server"), "valid choices"),
    (dict(logical_cpus=0), "logical_cpus"),
])
def test_bad_runtime_configs_fail_before_any_work(kw, match):
    with pytest.raises(ValueError, match=match):
        distribute.strategy_from_config(RuntimeConfig(**kw))
