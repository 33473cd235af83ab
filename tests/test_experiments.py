"""The paper's experiments as presets: every one resolves, validates, builds its model, and
records the paper's numbers from DESIGN.md §5."""
import json
import pathlib
import subprocess
import sys

import pytest

from sat_tf import experiments, names
from sat_tf.config import Experiment

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAPER_PRESETS = [n for n in experiments.names() if n != "synthetic-smoke"]


def _resolved(name: str) -> Experiment:
    exp = experiments.get(name)
    if exp.data.dataset == "imagenet":   # ImageNet presets need the user's TFRecord folder
        exp = exp.replace(**{"data.data_dir": "/data/imagenet"})
    return exp


@pytest.mark.parametrize("name", experiments.names())
def test_every_preset_validates_and_round_trips(name):
    exp = _resolved(name).validate()
    assert exp.name == name and exp.description
    again = Experiment.from_dict(json.loads(json.dumps(exp.to_dict())))
    assert again == exp


def test_imagenet_presets_need_a_data_dir():
    with pytest.raises(ValueError, match="data_dir"):
        experiments.get("imagenet-resnet50-silu").validate()


def test_every_experiment_of_the_paper_is_there():
    expected = set()
    for act in ("relu", "parametric-softplus", "softplus", "smooth-relu", "elu", "gelu", "silu"):
        expected.add(f"imagenet-resnet50-{act}")
        expected.add(f"cifar10-resnet18-{act}")
        expected.add(f"cifar10-wrn34-10-{act}")
    for which in ("attacker", "optimizer", "both"):
        expected.add(f"imagenet-resnet50-relu-smooth-backward-{which}")
    for stem in ("resnet101", "resnet152", "resnext50-32x4d", "resnext50-32x8d",
                 "resnet50-299", "resnet50-380", "resnext152-32x8d-380"):
        expected |= {f"imagenet-{stem}-relu", f"imagenet-{stem}-silu"}
    for v in ("b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "l1"):
        expected.add(f"imagenet-efficientnet-{v}-sat")
    expected.add("imagenet-efficientnet-l1-sat-enhanced")
    assert set(PAPER_PRESETS) == expected


# The paper's numbers, transcribed independently from DESIGN.md §5 (clean, robust).
DESIGN_NUMBERS = {
    "imagenet-resnet50-relu": (68.8, 33.0),
    "imagenet-resnet50-parametric-softplus": (68.8, 38.7),
    "imagenet-resnet50-softplus": (68.4, 40.0),
    "imagenet-resnet50-smooth-relu": (69.4, 40.3),
    "imagenet-resnet50-elu": (69.2, 41.7),
    "imagenet-resnet50-gelu": (69.9, 41.6),
    "imagenet-resnet50-silu": (69.7, 42.3),
    "imagenet-resnet50-relu-smooth-backward-attacker": (68.3, 34.5),
    "imagenet-resnet50-relu-smooth-backward-optimizer": (69.4, 35.8),
    "imagenet-resnet50-relu-smooth-backward-both": (68.9, 36.9),
    "imagenet-resnet101-silu": (72.9, 46.4),
    "imagenet-resnet152-silu": (74.0, 47.3),
    "imagenet-resnext50-32x4d-silu": (71.1, 43.3),
    "imagenet-resnext50-32x8d-silu": (73.3, 46.3),
    "imagenet-resnet50-299-silu": (70.7, 44.6),
    "imagenet-resnet50-380-silu": (71.6, 44.9),
    "imagenet-resnext152-32x8d-380-silu": (78.0, 53.0),
    "imagenet-efficientnet-b0-sat": (65.2, None),
    "imagenet-efficientnet-b7-sat": (79.8, None),
    "imagenet-efficientnet-l1-sat": (80.7, None),
    "imagenet-efficientnet-l1-sat-enhanced": (82.2, 58.6),
}


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_numbers(name):
    paper = experiments.get(name).paper
    clean, robust = DESIGN_NUMBERS.get(name, (None, None))
    assert (paper["clean"], paper["robust"]) == (clean, robust)
    assert (paper["robust_attack"] is None) == (robust is None)
    if name.startswith("cifar10-"):
        assert "ours" in paper["protocol"] and paper["source"] is None


def test_imagenet_protocol():
    for name in PAPER_PRESETS:
        exp = experiments.get(name)
        if exp.data.dataset != "imagenet":
            continue
        t, e = exp.train_attack, exp.eval_attack
        assert (t.epsilon, t.step_size, t.num_steps, t.random_start, t.clean_start_prob) == \
            (4.0, 4.0, 1, True, 0.2), name
        assert (e.epsilon, e.step_size, e.random_start, e.clean_start_prob) == (4.0, 1.0, True, 0.0)
        assert exp.evaluation.attack_steps == (10, 20, 50)
        assert exp.evaluation.attack_epsilons == (4.0,) and exp.evaluation.attack_step_size == 1.0
        family, _ = names.model(exp.model.name)
        if family == "efficientnet":
            assert exp.train.optimizer == "rmsprop" and exp.model.activation == "silu"
            assert (exp.model.bn_momentum, exp.model.bn_epsilon) == (0.9, 1e-5)
            assert exp.train.ema_decay == (0.9999 if name.endswith("enhanced") else None)
        else:
            assert exp.train.optimizer == "sgd_nesterov" and exp.train.base_learning_rate == 0.1


def test_table1_backward_rules():
    def rules(which):
        exp = experiments.get(f"imagenet-resnet50-relu-smooth-backward-{which}")
        assert exp.model.activation == "relu"
        return exp.train_attack.backward, exp.train.optimizer_backward

    assert rules("attacker") == ("parametric_softplus", None)
    assert rules("optimizer") == (None, "parametric_softplus")
    assert rules("both") == ("parametric_softplus", "parametric_softplus")
    assert experiments.get("imagenet-resnet50-relu").train_attack.backward is None


def test_cifar10_protocol():
    for name in PAPER_PRESETS:
        exp = experiments.get(name)
        if exp.data.dataset != "cifar10":
            continue
        t, e = exp.train_attack, exp.eval_attack
        assert (t.epsilon, t.step_size, t.num_steps, t.clean_start_prob) == (8.0, 2.0, 10, 0.0)
        assert (e.epsilon, e.step_size, e.num_steps) == (8.0, 2.0, 20)
        assert exp.evaluation.attack_steps == (20,) and exp.evaluation.attack_epsilons == (8.0,)


def test_scaling_image_sizes():
    assert experiments.get("imagenet-resnet50-299-silu").model.image_size == 299
    exp = experiments.get("imagenet-resnext152-32x8d-380-relu")
    assert (exp.model.name, exp.model.image_size) == ("resnext-152-32x8d", 380)


def test_cli_list_and_show():
    out = subprocess.run([sys.executable, str(ROOT / "run/experiments.py"), "list"],
                         capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == len(experiments.names()) + 1
    silu = next(line for line in lines if line.startswith("imagenet-resnet50-silu "))
    assert "69.7 / 42.3" in silu
    out = subprocess.run(
        [sys.executable, str(ROOT / "run/experiments.py"), "show", "cifar10-wrn34-10-silu"],
        capture_output=True, text=True, check=True).stdout
    shown = json.loads(out)
    assert Experiment.from_dict(shown) == experiments.get("cifar10-wrn34-10-silu")
    bad = subprocess.run([sys.executable, str(ROOT / "run/experiments.py"), "show", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Unknown experiment 'nope'" in bad.stderr


# ---- every preset's model ------------------------------------------------------------------
# Building all 17 distinct architectures takes ~75 s on 2 CPU cores (EfficientNet-L1 alone
# ~20 s), so every preset's model is resolved and counted in closed form (sat_tf.models'
# count_params, which the model tests pin to built models), and one architecture per block
# type is built here and its trainable parameters compared with the closed form.

KNOWN_COUNTS = {  # DESIGN.md §5, 1000 classes
    "resnet-50": 25_557_032, "efficientnet-b0": 5_288_548, "efficientnet-b7": 66_347_960,
    "efficientnet-l1": 272_630_564,
}


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_every_preset_resolves_its_model(name):
    from sat_tf import models, training
    exp = _resolved(name)
    num_classes, image_size = training.model_shape(exp)
    m = exp.model
    spec = models.resolve(m.name, m.activation, num_classes, image_size=image_size,
                          normalization=m.normalization, stem=m.stem, bn_momentum=m.bn_momentum,
                          bn_epsilon=m.bn_epsilon, dropout_rate=m.dropout_rate,
                          drop_connect_rate=m.drop_connect_rate)
    if exp.data.dataset == "imagenet":
        assert num_classes == 1000 and spec.stem in (None, "imagenet")
        assert image_size == spec.image_size
        if spec.family != "efficientnet":
            assert image_size == m.image_size in (224, 299, 380)
    else:
        assert (num_classes, image_size) == (10, 32) and spec.family in ("resnet", "wrn")
        assert spec.stem in (None, "cifar")
    count = models.count_params(m.name, num_classes, m.activation, image_size=image_size,
                                stem=m.stem)
    if m.name in KNOWN_COUNTS and m.activation != "smooth_relu":
        assert count == KNOWN_COUNTS[m.name]


def test_efficientnet_presets_use_the_table_resolution():
    from sat_tf import training
    sizes = {v: training.model_shape(experiments.get(f"imagenet-efficientnet-{v}-sat"))[1]
             for v in ("b0", "b3", "b7", "l1")}
    assert sizes == {"b0": 224, "b3": 300, "b7": 600, "l1": 600}


@pytest.mark.parametrize("name,activation", [
    ("resnet-50", "silu"), ("resnext-50-32x4d", "gelu"), ("resnet-18", "smooth_relu"),
    ("wrn-34-10", "elu"), ("efficientnet-b0", "silu")])
def test_one_architecture_per_block_type_builds(name, activation):
    import keras
    import numpy as np
    from sat_tf import models
    model = models.build_model(name, activation=activation, num_classes=10, image_size=32)
    built = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert built == models.count_params(name, 10, activation, image_size=32)
    assert model.output_shape == (None, 10)
    keras.backend.clear_session()


def test_cli_results_beside_the_paper(tmp_path):
    from sat_tf import reports
    attack = {"config": {"epsilon": 4.0, "step_size": 1.0, "num_steps": 10, "random_start": True,
                         "clean_start_prob": 0.0, "mode": "untargeted", "backward": None},
              "restarts": 1, "correct": 300, "accuracy": 0.3, "adversarial_correct": 300,
              "adversarial_accuracy": 0.3}
    result = {"examples": 1000, "batches": 10, "clean_top1": 0.694, "clean_top5": 0.9,
              "clean_correct": 694, "attacks": [attack], "diagnostic_attacks": [],
              "robust": 0.3, "robust_correct": 300, "zero_gradient_fraction": 0.0,
              "nonfinite_gradient_fraction": 0.0, "seconds": 2.0}
    report = reports.build_report(
        result, model={"name": "resnet-50", "activation": "silu",
                       "experiment_name": "imagenet-resnet50-silu"},
        data={"dataset": "imagenet"}, protocol={},
        paper=experiments.get("imagenet-resnet50-silu").paper)
    reports.write_json(report, str(tmp_path / "r.json"))
    out = subprocess.run([sys.executable, str(ROOT / "run/experiments.py"), "results",
                          str(tmp_path / "r.json")], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[1].split() == ["imagenet-resnet50-silu", "69.4", "30.0", "worst", "to", "PGD-10",
                              "69.7", "42.3", "pass"]


def test_gelu_presets_use_the_releases_tanh_approximation():
    """The SAT release's ResNet "gelu" is the tanh approximation (DESIGN.md §4)."""
    for name in ("imagenet-resnet50-gelu", "cifar10-resnet18-gelu", "cifar10-wrn34-10-gelu"):
        assert experiments.get(name).model.activation == "gelu_tanh"


def test_recipes_decay_what_the_release_decays():
    """ResNet presets: conv/dense kernels only (tensorpack's ".*/W"); EfficientNet presets:
    every non-batch-norm weight (the TPU code)."""
    for name in experiments.names():
        exp = experiments.get(name)
        if exp.model.name.startswith("efficientnet"):
            assert exp.train.weight_decay_scope == "non_bn", name
        elif name.startswith("imagenet-"):
            assert exp.train.weight_decay_scope == "kernels", name
