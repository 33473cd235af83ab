"""Config and names: validation errors are one line and name the bad value; no TF import."""
import subprocess
import sys

import pytest

from sat_tf import experiments, names
from sat_tf.config import AttackConfig, Experiment


@pytest.mark.parametrize("path,value,words", [
    ("model.name", "resnet-51", ["'resnet-51'", "resnet-50", "efficientnet-l2"]),
    ("model.activation", "relu6", ["'relu6'", "silu", "smooth_relu"]),
    ("data.dataset", "mnist", ["'mnist'", "cifar10", "imagenet"]),
    ("train_attack.epsilon", -1.0, ["-1.0", ">= 0"]),
    ("train.global_batch_size", 0, ["0", "> 0"]),
    ("train.optimizer_backward", "tanh", ["'tanh'", "parametric_softplus"]),
    ("runtime.strategy", "horovod", ["'horovod'", "mirrored", "tpu"]),
    ("train.lr_schedule", "poly", ["'poly'", "cosine"]),
])
def test_bad_values_give_one_line_errors_naming_value_and_choices(path, value, words):
    exp = experiments.get("synthetic-smoke").replace(**{path: value})
    with pytest.raises(ValueError) as err:
        exp.validate()
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_unknown_field_is_an_error():
    with pytest.raises(ValueError, match="model has"):
        Experiment().replace(**{"model.depth": 50})


def test_round_trip_through_dict():
    exp = experiments.get("synthetic-smoke").replace(**{"model.activation": "gelu"})
    again = Experiment.from_dict(exp.to_dict())
    assert again == exp
    with pytest.raises(ValueError, match="Unknown AttackConfig field"):
        Experiment.from_dict({"train_attack": {"epsilon": 4, "radius": 3}})


def test_model_names_parse():
    assert names.model("resnet-50") == ("resnet", {"depth": 50})
    assert names.model("ResNeXt-101-32x8d") == (
        "resnext", {"depth": 101, "cardinality": 32, "bottleneck_width": 8})
    assert names.model("wrn-34-10") == ("wrn", {"depth": 34, "width": 10})
    assert names.model("efficientnet-l1") == ("efficientnet", {"variant": "l1"})
    for bad in ("resnet-51", "wrn-33-10", "resnext-50-16x4d", "efficientnet-b9", "vgg16"):
        with pytest.raises(ValueError):
            names.model(bad)


def test_activation_names_and_backward_rules():
    assert names.activation("swish") == "silu"
    assert names.backward_rule("natural") is None and names.backward_rule(None) is None
    assert "smooth_relu" not in names.BACKWARD_RULES
    with pytest.raises(ValueError, match="valid backward rules"):
        names.backward_rule("smooth_relu")


def test_attack_defaults_follow_the_paper():
    a = AttackConfig()
    assert (a.epsilon, a.step_size, a.num_steps, a.clean_start_prob) == (4.0, 4.0, 1, 0.2)
    e = Experiment().eval_attack
    assert (e.epsilon, e.step_size, e.clean_start_prob) == (4.0, 1.0, 0.0)


def test_config_and_presets_import_without_tensorflow():
    code = ("import sys, sat_tf.config, sat_tf.names, sat_tf.experiments, sat_tf.data;"
            "sat_tf.experiments.get('synthetic-smoke').validate();"
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("path,value,words", [
    ("train.train_epochs", float("inf"), ["train_epochs inf", "finite number > 0"]),
    ("train.warmup_epochs", float("inf"), ["warmup_epochs inf", "finite"]),
    ("train.train_epochs", float("nan"), ["train_epochs nan", "> 0"]),
    ("train_attack.epsilon", float("inf"), ["attack epsilon inf", "finite number >= 0"]),
    ("evaluation.attack_steps", (10, 2**70), [str(2**70), "at most 2147483647"]),
    ("train.train_steps", 2**63, ["train_steps", "at most"]),
    ("train.seed", -1, ["seed -1", "[0, 4294967295]"]),
    ("train.seed", 2**40, ["seed", "[0, 4294967295]"]),
    ("data.seed", -3, ["data seed -3"]),
    ("evaluation.seed", -1, ["evaluation seed -1"]),
    ("train.momentum", 5.0, ["momentum 5.0", "[0, 1)"]),
    ("train.momentum", -0.1, ["momentum -0.1"]),
])
def test_meaningless_numbers_are_refused_naming_the_field(path, value, words):
    exp = experiments.get("synthetic-smoke").replace(**{path: value})
    with pytest.raises(ValueError) as err:
        exp.validate()
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
