"""The paper's experiments as presets: every one resolves, validates, builds its model, and
records the paper's numbers from DESIGN.md §5."""
import json
import math
import pathlib
import subprocess
import sys

import pytest

from sat_tf import experiments, names
from sat_tf.config import Experiment

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Ours, not the paper's: the smoke run and the quick start (tests/test_digits.py).
OWN_PRESETS = ("synthetic-smoke", "digits-relu", "digits-silu")
PAPER_PRESETS = [n for n in experiments.names() if n not in OWN_PRESETS]


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
        assert exp.evaluation_grid() == ((10, 20, 50), (4.0,))
        family, _ = names.model(exp.model.name)
        if family == "efficientnet":
            assert exp.optimizer.name == "rmsprop" and exp.model.activation == "silu"
            assert (exp.model.bn_momentum, exp.model.bn_epsilon) == (0.9, 1e-5)
            assert exp.train.ema_decay == (0.9999 if name.endswith("enhanced") else None)
        else:
            assert exp.optimizer.name == "sgd_nesterov" and exp.schedule.base_learning_rate == 0.1


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
        assert exp.evaluation_grid() == ((20,), (8.0,))


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

# Independent truth for every preset: each architecture's parameter count written out here from
# its published definition, checked against published counts below (and not against sat_tf).
_RESNET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
                  152: (3, 8, 36, 3)}
_EFFICIENTNET = {  # width, depth (DESIGN.md §5)
    "b0": (1.0, 1.0), "b1": (1.0, 1.1), "b2": (1.1, 1.2), "b3": (1.2, 1.4), "b4": (1.4, 1.8),
    "b5": (1.6, 2.2), "b6": (1.8, 2.6), "b7": (2.0, 3.1), "l1": (3.9, 3.7)}
_B0_BLOCKS = [  # repeats, kernel, stride, expansion, in, out; SE ratio 0.25 everywhere
    (1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


def _resnet_count(depth, classes, stem, groups=1, group_width=64, per_site=0):
    """ResNet v1.5 / ResNeXt as torchvision builds them (bias-free convs, BN gamma and beta, fc
    with bias), with ``per_site`` weights per activation call site (smooth_relu's beta)."""
    k = 7 if stem == "imagenet" else 3
    total, sites, inp = k * k * 3 * 64 + 2 * 64, 1, 64
    for stage, blocks in enumerate(_RESNET_LAYERS[depth]):
        planes = 64 * 2 ** stage
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            if depth >= 50:      # bottleneck: 1x1, grouped 3x3, 1x1 (x4); 3 activations
                width, out = planes * group_width // 64 * groups, planes * 4
                total += inp * width + 9 * width * width // groups + width * out
                total += 2 * (width + width + out)
                sites += 3
            else:                # basic: two 3x3; 2 activations
                out = planes
                total += 9 * inp * out + 9 * out * out + 2 * (out + out)
                sites += 2
            if stride != 1 or inp != out:
                total += inp * out + 2 * out
            inp = out
    return total + inp * classes + classes + per_site * sites


def _wrn_count(depth, k, classes, per_site=0):
    """Wide-ResNet as TRADES builds it: pre-activation blocks (2 activations), a 1x1 shortcut
    conv where the width changes, a final BN and activation."""
    total, sites, inp = 9 * 3 * 16, 1, 16
    for width in (16 * k, 32 * k, 64 * k):
        for _ in range((depth - 4) // 6):
            total += 2 * inp + 9 * inp * width + 2 * width + 9 * width * width
            total += inp * width if inp != width else 0
            sites += 2
            inp = width
    return total + 2 * inp + inp * classes + classes + per_site * sites


def _round_filters(filters, width):
    scaled = filters * width
    new = max(8, int(scaled + 4) // 8 * 8)
    return int(new + 8 if new < 0.9 * scaled else new)


def _efficientnet_count(variant, classes):
    """EfficientNet as the TPU builder makes it (MBConv blocks, SE width from the input)."""
    width, depth = _EFFICIENTNET[variant]
    stem = _round_filters(32, width)
    total = 27 * stem + 2 * stem
    for repeats, k, _, e, i, o in _B0_BLOCKS:
        i, o = _round_filters(i, width), _round_filters(o, width)
        for r in range(math.ceil(depth * repeats)):
            inp = i if r == 0 else o
            mid, se = inp * e, max(1, int(inp * 0.25))
            total += inp * mid + 2 * mid if e != 1 else 0
            total += k * k * mid + 2 * mid + (mid * se + se) + (se * mid + mid)
            total += mid * o + 2 * o
    head = _round_filters(1280, width)
    return total + o * head + 2 * head + head * classes + classes


def _reference_count(name, classes, activation, stem):
    per_site = 1 if activation == "smooth_relu" else 0
    family, args = names.model(name)
    if family == "efficientnet":
        assert per_site == 0
        return _efficientnet_count(args["variant"], classes)
    if family == "wrn":
        return _wrn_count(args["depth"], args["width"], classes, per_site)
    return _resnet_count(args["depth"], classes, stem, args.get("cardinality", 1),
                         args.get("bottleneck_width", 64), per_site)


def test_reference_counts_match_the_published_ones():
    """torchvision's ResNets / ResNeXts, TRADES' WRN-34-10 and CIFAR ResNet-18, the Keras
    EfficientNets' trainable parameters (B0, B7, L1: DESIGN.md §5)."""
    published = {
        ("resnet-18", 1000): 11_689_512, ("resnet-34", 1000): 21_797_672,
        ("resnet-101", 1000): 44_549_160, ("resnet-152", 1000): 60_192_808,
        ("resnext-50-32x4d", 1000): 25_028_904, ("resnext-101-32x8d", 1000): 88_791_336,
        ("wrn-34-10", 10): 46_160_474, ("wrn-28-10", 10): 36_479_194,
        ("efficientnet-b1", 1000): 7_794_184, ("efficientnet-b2", 1000): 9_109_994,
        ("efficientnet-b3", 1000): 12_233_232, ("efficientnet-b4", 1000): 19_341_616,
        ("efficientnet-b5", 1000): 30_389_784, ("efficientnet-b6", 1000): 43_040_704,
        **{(name, 1000): n for name, n in KNOWN_COUNTS.items()}}
    for (name, classes), n in published.items():
        assert _reference_count(name, classes, "relu", "imagenet") == n, name
    assert _reference_count("resnet-18", 10, "relu", "cifar") == 11_173_962   # kuangliu's
    # smooth_relu: one beta per activation call site.
    assert _reference_count("resnet-18", 10, "smooth_relu", "cifar") == 11_173_962 + 1 + 2 * 8
    assert _reference_count("resnet-50", 1000, "smooth_relu", "imagenet") == (
        25_557_032 + 1 + 3 * 16)
    assert _reference_count("wrn-34-10", 10, "smooth_relu", None) == 46_160_474 + 2 * 15 + 1


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_every_preset_resolves_its_model(name):
    from sat_tf import models, rundir
    exp = _resolved(name)
    num_classes, image_size = rundir.model_shape(exp)
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
    assert count == _reference_count(m.name, num_classes, m.activation, spec.stem), name


def test_efficientnet_presets_use_the_table_resolution():
    from sat_tf import rundir
    sizes = {v: rundir.model_shape(experiments.get(f"imagenet-efficientnet-{v}-sat"))[1]
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
            assert exp.optimizer.weight_decay_scope == "non_bn", name
        elif name.startswith("imagenet-"):
            assert exp.optimizer.weight_decay_scope == "kernels", name


def test_every_model_family_has_a_default_recipe():
    from sat_tf import families, recipes
    assert set(recipes.BY_FAMILY) == set(families.FAMILIES)
    assert recipes.for_model("efficientnet-b0").optimizer.name == "rmsprop"
    assert recipes.for_model("wrn-28-10").optimizer.name == "sgd_nesterov"
