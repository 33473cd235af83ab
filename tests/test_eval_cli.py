"""run/eval.py and run/export.py end to end on a tiny real training run: bad flags fail fast
without TensorFlow; the checkpoint (one device) and its SavedModel (a 2-replica
MirroredStrategy) give the same numbers; the report is complete; --noema loads the raw
weights."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from sat_tf import export, loading, reports, robustness, rundir, training
from sat_tf.config import (AttackConfig, DataConfig, EvalConfig, Experiment, LoopConfig,
                           ModelConfig, ScheduleConfig, TrainConfig)

ROOT = pathlib.Path(__file__).resolve().parent.parent
EVAL = str(ROOT / "run" / "eval.py")
EXPORT = str(ROOT / "run" / "export.py")
EVAL_EXAMPLES = 40


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A wrn-10-1 (78k parameters) trained 6 SAT steps on 16x16 synthetic data, with EMA."""
    model_dir = str(tmp_path_factory.mktemp("run"))
    exp = Experiment(
        name="cli-test",
        model=ModelConfig(name="wrn-10-1", activation="silu", image_size=16),
        data=DataConfig(synthetic_image_size=16, synthetic_train_examples=256,
                        synthetic_eval_examples=EVAL_EXAMPLES),
        train_attack=AttackConfig(epsilon=4.0, step_size=4.0, num_steps=1),
        eval_attack=AttackConfig(epsilon=4.0, step_size=1.0, num_steps=1, clean_start_prob=0.0),
        train=TrainConfig(global_batch_size=32, train_steps=6, train_epochs=None,
                          ema_decay=0.5),
        schedule=ScheduleConfig(warmup_epochs=0.0, base_learning_rate=0.4),
        loop=LoopConfig(steps_per_loop=3, eval_steps=1, eval_batch_size=8, summary_images=0),
        evaluation=EvalConfig(attack_steps=(1, 3), attack_epsilons=(8.0,),
                              global_batch_size=16),
        paper={"source": "test", "clean": 50.0, "robust": 25.0, "robust_attack": "PGD-3"},
        model_dir=model_dir)
    training.Trainer(exp, strategy=tf.distribute.get_strategy(), log=lambda _: None).train()
    return model_dir


def start(script, *args, env=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    return subprocess.Popen([sys.executable, script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(proc, status=0):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == status, err[-3000:]
    return out, err


# ---- bad flags -----------------------------------------------------------------------------

def test_bad_flags_fail_fast_without_tensorflow(run_dir, tmp_path):
    """A fake `tensorflow` package that cannot be imported proves the checks run before TF."""
    fake = tmp_path / "fake"
    (fake / "tensorflow").mkdir(parents=True)
    (fake / "tensorflow" / "__init__.py").write_text("raise ImportError('TF was imported')\n")
    env = {"PYTHONPATH": str(fake)}
    cases = [
        (EVAL, [], "Give exactly one of --model_dir"),
        (EVAL, [f"--model_dir={run_dir}", f"--saved_model={run_dir}"], "Give exactly one"),
        (EVAL, [f"--model_dir={tmp_path / 'nope'}"], "does not exist"),
        (EVAL, [f"--model_dir={tmp_path}"], "holds no experiment.json"),
        (EVAL, [f"--saved_model={run_dir}"], "No SavedModel"),
        (EVAL, [f"--model_dir={run_dir}", "--attack_epsilon=-1"], "Invalid attack epsilon -1.0"),
        (EVAL, [f"--model_dir={run_dir}", "--attack_steps=ten"], "Invalid --attack_steps 'ten'"),
        (EVAL, [f"--model_dir={run_dir}", "--attack_mode=sideways"],
         "Invalid attack mode 'sideways'; valid choices: untargeted, targeted"),
        (EVAL, [f"--model_dir={run_dir}", "--attack_restarts=0"], "Invalid attack restarts 0"),
        (EVAL, [f"--model_dir={run_dir}", "--attacks=pgd,fab-t"],
         "Invalid attack 'fab-t'; valid choices: pgd, apgd-ce, apgd-t, square, autoattack"),
        (EVAL, [f"--model_dir={run_dir}", "--square_queries=0"], "Invalid Square queries 0"),
        (EVAL, [f"--model_dir={run_dir}", "--apgd_targets=0"],
         "Invalid APGD-T target classes 0"),
        (EVAL, [f"--model_dir={run_dir}", "--eval_batch_size=0"], "Invalid eval batch size 0"),
        (EVAL, [f"--model_dir={run_dir}", "--dataset=mnist"], "Invalid dataset 'mnist'"),
        (EVAL, [f"--model_dir={run_dir}", "--strategy=warp"], "Invalid strategy 'warp'"),
        (EVAL, [f"--model_dir={run_dir}", f"--checkpoint={run_dir}/ckpt-999"], "not found"),
        (EVAL, [f"--model_dir={run_dir}", "--attack_stepz=3"], "Unknown command line flag"),
        (EVAL, [f"--model_dir={run_dir}", "--attack_steps=99999999999999999999"],
         "at most 2147483647"),
        (EVAL, [f"--model_dir={run_dir}", "--attack_epsilon=inf"], "finite number >= 0"),
        (EVAL, [f"--model_dir={run_dir}", "--seed=-1"], "Invalid evaluation seed -1"),
        (EVAL, [f"--model_dir={run_dir}", f"--report={tmp_path}"], "it is a folder"),
        (EVAL, [f"--model_dir={run_dir}", f"--report={tmp_path}/no/such/r.json"],
         "does not exist"),
        (EXPORT, [f"--model_dir={run_dir}"], "--export_dir is required"),
        (EXPORT, [f"--model_dir={run_dir}", f"--export_dir={run_dir}"], "not empty"),
    ]
    procs = [(start(script, *args, env=env), message) for script, args, message in cases]
    for proc, message in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (message, err)
        assert err.count("\n") == 1 and message in err, (message, err)
        assert err.startswith(("eval.py: error: ", "export.py: error: "))


# ---- end to end ----------------------------------------------------------------------------

def reports_equal(a, b):
    assert a["examples"] == b["examples"] == EVAL_EXAMPLES
    assert a["clean_correct"] == b["clean_correct"]
    for x, y in zip(a["attacks"] + a["diagnostic_attacks"], b["attacks"] + b["diagnostic_attacks"]):
        assert x["name"] == y["name"]
        # The loaded graph may round differently in the last bit; a PGD sign can flip on a
        # gradient that is ~0. Allow one example.
        assert abs(x["correct"] - y["correct"]) <= 1, (x, y)
    assert abs(a["robust_correct"] - b["robust_correct"]) <= 1


def test_checkpoint_export_and_saved_model_give_the_same_report(run_dir, tmp_path):
    """Without random starts PGD is deterministic, so the checkpoint on one device and its
    export on a 2-replica MirroredStrategy must agree example for example."""
    export_dir = str(tmp_path / "export")
    common = ["--norandom_start", "--attack_epsilon=8", "--seed=7"]
    ckpt_report, saved_report = str(tmp_path / "ckpt.json"), str(tmp_path / "saved.json")
    ckpt = start(EVAL, f"--model_dir={run_dir}", f"--report={ckpt_report}", *common)
    out, _ = finish(start(EXPORT, f"--model_dir={run_dir}", f"--export_dir={export_dir}"))
    assert "Exported wrn-10-1 (silu, step 6, ema weights, 16x16, 10 classes)" in out
    saved = start(EVAL, f"--saved_model={export_dir}", f"--report={saved_report}",
                  "--strategy=mirrored", "--logical_cpus=2", *common)
    ckpt_out, ckpt_err = finish(ckpt)
    saved_out, _ = finish(saved)

    a, b = (json.load(open(p)) for p in (ckpt_report, saved_report))
    reports_equal(a, b)
    assert (a["model"]["source"], b["model"]["source"]) == ("checkpoint", "saved_model")
    assert (a["protocol"]["replicas"], b["protocol"]["replicas"]) == (1, 2)
    for r in (a, b):
        assert (r["model"]["name"], r["model"]["activation"], r["model"]["step"],
                r["model"]["weights"]) == ("wrn-10-1", "silu", 6, "ema")
        assert r["data"]["complete"] and r["data"]["examples_in_split"] == EVAL_EXAMPLES
        # The run's protocol (steps 1, 3) with its own evaluation attack's step size (1) and
        # the flag's epsilon, which replaces the run's (4 and 8).
        assert [(x["config"]["num_steps"], x["config"]["epsilon"], x["config"]["step_size"])
                for x in r["attacks"]] == [(1, 8.0, 1.0), (3, 8.0, 1.0)]
        assert not any(x["config"]["random_start"] for x in r["attacks"])
        assert [d["config"]["epsilon"] for d in r["diagnostic_attacks"]] == [64.0]
        assert r["paper"]["clean"] == 50.0     # the run's paper numbers travel with it
        assert {c["name"] for c in r["sanity_checks"]} >= {
            "robust_le_clean", "monotone_in_steps", "monotone_in_epsilon", "large_epsilon",
            "gradient_masking", "targeted_weaker"}
    assert "robust (worst of 2)" in ckpt_out and "sanity:" in ckpt_out
    assert f"{EVAL_EXAMPLES}/{EVAL_EXAMPLES} 100.0%" in ckpt_err     # the progress bar
    assert b["model"]["path"] == export_dir and "saved_model" in saved_out


def test_evaluate_in_process(run_dir):
    """The library call behind run/eval.py: the run's protocol with its own attack's step size,
    the given values named, one line logged, the report's default place in the run."""
    protocol = robustness.ProtocolOverrides(attack_steps=(2,), random_start=False,
                                            sanity_epsilon=0.0)
    request = robustness.EvalRequest(loading.resolve(model_dir=run_dir), protocol=protocol)
    lines = []
    report = robustness.evaluate(request, log=lines.append)
    assert lines == [f"Evaluating wrn-10-1 (silu, checkpoint {run_dir}, step 6, ema weights) on "
                     f"synthetic: {EVAL_EXAMPLES} examples, 2 attacks x 1 restarts, 1 replica(s)."]
    assert report["format"] == reports.FORMAT and report["examples"] == EVAL_EXAMPLES
    assert [(a["config"]["num_steps"], a["config"]["epsilon"], a["config"]["step_size"])
            for a in report["attacks"]] == [(2, 4.0, 1.0), (2, 8.0, 1.0)]
    assert report["diagnostic_attacks"] == []
    assert report["protocol"]["defaults"] == "the run's evaluation attack and protocol"
    assert report["protocol"]["given_by_flags"] == ["attack_steps", "random_start",
                                                    "sanity_epsilon"]
    assert report["protocol"]["global_batch_size"] == 16     # the run's, not the default 128
    assert report["model"]["source"] == "checkpoint" and report["paper"]["clean"] == 50.0
    assert request.report_path(report["model"]["step"]) == os.path.join(
        run_dir, "eval_report_step6.json")


def test_autoattack_from_the_command_line(run_dir, tmp_path):
    """--attacks: one row per attack and the worst case; AutoAttack's rows after each stage
    (non-increasing, ending at its own count); each row's passes per example."""
    path = str(tmp_path / "aa.json")
    out, _ = finish(start(EVAL, f"--model_dir={run_dir}", f"--report={path}",
                          "--attacks=pgd,apgd-ce,square,autoattack", "--attack_steps=2",
                          "--attack_epsilon=8", "--square_queries=10", "--apgd_targets=2",
                          "--sanity_epsilon=0"))
    r = json.load(open(path))
    rows = {a["name"]: a for a in r["attacks"]}
    assert list(rows) == ["PGD-2 eps 8 step 1 untargeted", "APGD-CE-2 eps 8", "Square-10 eps 8",
                          "AutoAttack eps 8 (APGD-2, 2 targets, Square-10)"]
    assert r["protocol"]["attacks"] == ["pgd", "apgd-ce", "square", "autoattack"]
    assert r["protocol"]["given_by_flags"] == ["apgd_targets", "attack_epsilons",
                                               "attack_steps", "attacks", "sanity_epsilon",
                                               "square_queries"]
    assert r["protocol"]["apgd_targets"] == 2
    aa = rows["AutoAttack eps 8 (APGD-2, 2 targets, Square-10)"]
    stages = [s["correct"] for s in aa["stages"]]
    assert [s["stage"] for s in aa["stages"]] == ["apgd-ce", "apgd-t", "square"]
    assert r["clean_correct"] >= stages[0] >= stages[1] >= stages[2] >= aa["correct"]
    assert r["robust_correct"] <= min(a["correct"] for a in r["attacks"])
    # Passes over the split: PGD-2 2 + 2 on every example; APGD-CE-2 and Square one clean
    # forward for all, then 3 + 3 (APGD) or 1..10 forward (Square) on the clean-correct ones.
    n, clean = r["examples"], r["clean_correct"]
    total = lambda name, key: rows[name][f"{key}_passes_per_example"] * n
    assert (total("PGD-2 eps 8 step 1 untargeted", "forward"),
            total("PGD-2 eps 8 step 1 untargeted", "backward")) == (2 * n, 2 * n)
    assert total("APGD-CE-2 eps 8", "forward") == pytest.approx(n + 3 * clean)
    assert total("APGD-CE-2 eps 8", "backward") == pytest.approx(3 * clean)
    assert n + clean - 1e-6 <= total("Square-10 eps 8", "forward") <= n + 10 * clean + 1e-6
    assert total("Square-10 eps 8", "backward") == 0.0
    # AutoAttack: APGD-CE's 3 backward passes on each clean-correct example, then APGD-T's 3
    # per target (1 or 2) on each survivor.
    back = aa["backward_passes_per_example"] * n
    assert 3 * clean + 3 * stages[0] - 1e-6 <= back <= 3 * clean + 6 * stages[0] + 1e-6
    for line in ("AutoAttack eps 8 (APGD-2, 2 targets, Square-10) x1", "  after apgd-t",
                 "  after square", "robust (worst of 4)", "passes/example fwd+bwd"):
        assert line in out, out


def test_noema_loads_the_raw_weights(run_dir):
    ema_source = loading.resolve(model_dir=run_dir)
    ema = loading.load(ema_source)
    raw = loading.load(loading.resolve(model_dir=run_dir, use_ema=False))
    assert (ema.weights, raw.weights) == ("ema", "raw")
    assert ema.step == raw.step == 6
    assert ema.experiment == ema_source.experiment and ema.checkpoint.endswith("ckpt-6")
    assert ema.describe() == {
        "name": "wrn-10-1", "activation": "silu", "step": 6, "weights": "ema",
        "checkpoint": ema.checkpoint, "experiment_name": "cli-test", "image_size": 16,
        "num_classes": 10, "source": "checkpoint", "path": run_dir}
    diffs = [np.abs(a - b).max() for a, b in zip(ema.model.get_weights(), raw.model.get_weights())]
    assert max(diffs) > 1e-4


def test_file_names_agree_with_the_writers():
    assert loading.EXPERIMENT_FILE == rundir.EXPERIMENT_FILE
    assert loading.EXPORT_METADATA == f"assets/{export.METADATA_ASSET}"
