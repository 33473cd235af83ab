"""Config and names: validation errors are one line and name the bad value; no TF import."""
import subprocess
import sys

import pytest

from sat_tf import experiments, names
from sat_tf.config import (DROPPED, MOVED, AttackConfig, Experiment, LoopConfig, OptimizerConfig,
                           ScheduleConfig, parse_override)
from sat_tf.errors import UserError


@pytest.mark.parametrize("path,value,words", [
    ("model.name", "resnet-51", ["'resnet-51'", "resnet-50", "efficientnet-l2"]),
    ("model.activation", "relu6", ["'relu6'", "silu", "smooth_relu"]),
    ("data.dataset", "mnist", ["'mnist'", "cifar10", "imagenet"]),
    ("train_attack.epsilon", -1.0, ["-1.0", ">= 0"]),
    ("train.global_batch_size", 0, ["0", "> 0"]),
    ("train.optimizer_backward", "tanh", ["'tanh'", "parametric_softplus"]),
    ("runtime.strategy", "horovod", ["'horovod'", "mirrored", "tpu"]),
    ("schedule.name", "poly", ["'poly'", "cosine"]),
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
    ("schedule.warmup_epochs", float("inf"), ["warmup_epochs inf", "finite"]),
    ("train.train_epochs", float("nan"), ["train_epochs nan", "> 0"]),
    ("train_attack.epsilon", float("inf"), ["attack epsilon inf", "finite number >= 0"]),
    ("evaluation.attack_steps", (10, 2**70), [str(2**70), "at most 2147483647"]),
    ("train.train_steps", 2**63, ["train_steps", "at most"]),
    ("train.seed", -1, ["seed -1", "[0, 4294967295]"]),
    ("train.seed", 2**40, ["seed", "[0, 4294967295]"]),
    ("data.seed", -3, ["data seed -3"]),
    ("evaluation.seed", -1, ["evaluation seed -1"]),
    ("optimizer.momentum", 5.0, ["momentum 5.0", "[0, 1)"]),
    ("optimizer.momentum", -0.1, ["momentum -0.1"]),
])
def test_meaningless_numbers_are_refused_naming_the_field(path, value, words):
    exp = experiments.get("synthetic-smoke").replace(**{path: value})
    with pytest.raises(ValueError) as err:
        exp.validate()
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_an_experiment_json_of_the_old_layout_reads_into_the_new_sections():
    """Before issue 11 the train section held the optimizer, schedule and loop fields."""
    old = {"train": {"optimizer": "rmsprop", "momentum": 0.8, "rmsprop_decay": 0.95,
                     "optimizer_epsilon": 0.01, "weight_decay": 3e-5,
                     "weight_decay_scope": "kernels", "lr_schedule": "cosine",
                     "base_learning_rate": 0.3, "warmup_epochs": 2.0,
                     "decay_boundaries": [10.0, 20.0], "decay_factor": 0.5,
                     "decay_epochs": 1.5, "decay_rate": 0.9, "steps_per_loop": 7,
                     "checkpoint_every_steps": 70, "max_checkpoints_to_keep": 2,
                     "summary_every_steps": 14, "summary_images": 1, "eval_every_steps": 35,
                     "eval_steps": 3, "eval_batch_size": 32, "resume_input": "skip",
                     "global_batch_size": 64, "seed": 9, "ema_decay": 0.99}}
    exp = Experiment.from_dict(old)
    assert exp.optimizer == OptimizerConfig(name="rmsprop", momentum=0.8, rmsprop_decay=0.95,
                                            epsilon=0.01, weight_decay=3e-5,
                                            weight_decay_scope="kernels")
    assert exp.schedule == ScheduleConfig(name="cosine", base_learning_rate=0.3,
                                          warmup_epochs=2.0, decay_boundaries=(10.0, 20.0),
                                          decay_factor=0.5, decay_epochs=1.5, decay_rate=0.9)
    assert exp.loop == LoopConfig(steps_per_loop=7, checkpoint_every_steps=70,
                                  max_checkpoints_to_keep=2, summary_every_steps=14,
                                  summary_images=1, eval_every_steps=35, eval_steps=3,
                                  eval_batch_size=32, resume_input="skip")
    assert (exp.train.global_batch_size, exp.train.seed, exp.train.ema_decay) == (64, 9, 0.99)
    # Every field that moved is covered, and lands on a field that exists.
    moved = {old_path.split(".")[1] for old_path, _ in MOVED}
    assert moved == set(old["train"]) - {"global_batch_size", "seed", "ema_decay"}
    assert Experiment.from_dict(exp.to_dict()) == exp


def test_the_old_evaluation_step_size_and_random_start_give_way_to_the_runs_attack():
    """They repeated eval_attack's, which every evaluation since issue 10 used instead."""
    exp = Experiment.from_dict({
        "eval_attack": {"epsilon": 16.0, "step_size": 4.0, "num_steps": 10,
                        "random_start": False},
        "evaluation": {"attack_steps": [10, 20], "attack_epsilons": [16.0],
                       "attack_step_size": 1.0, "random_start": True}})
    assert [(a.epsilon, a.num_steps, a.step_size, a.random_start)
            for a in exp.evaluation_attacks()] == [(16.0, 10, 4.0, False),
                                                  (16.0, 20, 4.0, False)]
    assert {old for old, _ in DROPPED} == {"evaluation.attack_step_size",
                                            "evaluation.random_start"}


@pytest.mark.parametrize("text, path, value", [
    ("optimizer.momentum=0.95", "optimizer.momentum", 0.95),
    ("train.ema_decay=none", "train.ema_decay", None),
    ("schedule.decay_boundaries=30,60,80", "schedule.decay_boundaries", (30.0, 60.0, 80.0)),
    ("train.adversarial=false", "train.adversarial", False),
    ("loop.eval_steps=5", "loop.eval_steps", 5),
    ("model.name=wrn-28-10", "model.name", "wrn-28-10"),
    ("evaluation.attack_modes=untargeted,targeted", "evaluation.attack_modes",
     ("untargeted", "targeted")),
])
def test_dotted_overrides_are_read_as_their_fields_type(text, path, value):
    assert parse_override(text) == (path, value)
    assert Experiment().replace(**{path: value}).validate() is not None


@pytest.mark.parametrize("text, words", [
    ("optimizer.momentun=0.9", ["'optimizer.momentun'", "momentum"]),
    ("train.seed=three", ["'three'", "train.seed", "int"]),
    ("train.adversarial=maybe", ["'maybe'", "bool"]),
    ("momentum", ["'momentum'", "section.field=value"]),
    ("train.seed.x=1", ["'train.seed.x'"]),
])
def test_bad_overrides_name_the_path_and_what_it_takes(text, words):
    with pytest.raises(UserError) as e:
        parse_override(text)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)
