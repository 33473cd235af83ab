"""run/train.py as a user runs it: bad flags fail fast; a short mirrored run is preempted by
SIGTERM, saves, and the same command resumes it."""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "run" / "train.py")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")


def _run(args, timeout=60, env=ENV):
    start = time.time()
    proc = subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    return proc, time.time() - start


def _without_tensorflow(tmp_path):
    """ENV with a fake ``tensorflow`` package first on the path that fails to import: a
    command that succeeds under it never imported TensorFlow."""
    fake = tmp_path / "fake"
    (fake / "tensorflow").mkdir(parents=True)
    (fake / "tensorflow" / "__init__.py").write_text("raise ImportError('TF was imported')\n")
    path = os.pathsep.join(p for p in (str(fake), ENV.get("PYTHONPATH")) if p)
    return dict(ENV, PYTHONPATH=path)


@pytest.mark.parametrize("args, words", [
    (["--model=resnet-19"], ["Unknown model 'resnet-19'", "resnet-50"]),
    (["--activation=relu6"], ["Unknown activation 'relu6'", "silu"]),
    (["--dataset=mnist"], ["Invalid dataset 'mnist'", "cifar10"]),
    (["--attack_epsilon=-1"], ["attack epsilon -1.0"]),
    (["--train_batch_size=0"], ["global batch size 0"]),
    (["--train_batch_size=many"], ["--train_batch_size=many"]),
    (["--attacker_backward=sigmoid"], ["Unknown backward rule 'sigmoid'"]),
    (["--experiment=imagenet-resnet51-silu"], ["Unknown experiment", "imagenet-resnet50-silu"]),
    (["--strategy=mirrored", "--tpu=local"], ["needs strategy 'tpu'"]),
    (["--train_steps=5", "--train_epochs=2"], ["not both"]),
    (["--no_such_flag=1"], ["no_such_flag"]),
    (["--train_epochs=inf"], ["train_epochs inf", "finite"]),
    (["--warmup_epochs=inf"], ["warmup_epochs inf", "finite"]),
    (["--attack_epsilon=inf"], ["attack epsilon inf", "finite"]),
    (["--seed=-1"], ["seed -1"]),
    (["--momentum=5"], ["momentum 5.0", "[0, 1)"]),
    (["--set=optimizer.momentun=0.9"], ["'optimizer.momentun'", "momentum"]),
    (["--set=train.seed=x"], ["'x'", "train.seed", "int"]),
    (["--set=optimizer.momentum=5"], ["momentum 5.0", "[0, 1)"]),
    (["--set=momentum"], ["section.field=value"]),
    ("unwritable", ["cannot be created"]),
    ("no_model_dir", ["--model_dir is required"]),
])
def test_bad_flags_fail_fast_with_one_line_and_status_2(tmp_path, args, words):
    if args == "unwritable":
        blocker = tmp_path / "a_file"
        blocker.write_text("")
        args = [f"--model_dir={blocker / 'run'}"]
    elif args == "no_model_dir":
        args = []
    else:
        args = [*args, f"--model_dir={tmp_path / 'run'}"]
    # Fast because the checks run before TensorFlow is imported: under a fake TensorFlow
    # that cannot be imported, the same one-line message.
    proc, _ = _run(args, env=_without_tensorflow(tmp_path))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), proc.stderr
    for w in words:
        assert w in lines[0]
    assert proc.stdout == ""


def test_dotted_overrides_and_the_tpu_codes_flag_names_reach_the_run(tmp_path):
    """--set reaches any field by its path; --iterations_per_loop and --moving_average_decay
    are the TPU code's names of --steps_per_loop and --ema_decay."""
    model_dir = tmp_path / "run"
    proc, _ = _run(["--dataset=synthetic", "--model=wrn-10-1", "--train_batch_size=8",
                    "--train_steps=2", "--iterations_per_loop=2", "--moving_average_decay=0.5",
                    "--eval_steps=1", "--set=optimizer.momentum=0.95",
                    "--set=data.synthetic_image_size=16", "--set=data.synthetic_eval_examples=8",
                    "--set=schedule.decay_boundaries=1,2", "--set=train.label_smoothing=0",
                    f"--model_dir={model_dir}"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    stored = json.loads((model_dir / "experiment.json").read_text())
    assert stored["optimizer"]["momentum"] == 0.95
    assert stored["schedule"]["decay_boundaries"] == [1.0, 2.0]
    assert stored["train"]["label_smoothing"] == 0.0 and stored["train"]["ema_decay"] == 0.5
    assert stored["loop"]["steps_per_loop"] == 2 and stored["model"]["image_size"] == 16
    assert "completed at step 2/2" in proc.stdout


def test_help_explains_the_flags():
    proc, _ = _run(["--help"])
    for flag in ("--model:", "--activation:", "--attack_epsilon:", "--attacker_backward:",
                 "--optimizer_backward:", "--steps_per_loop:", "--logical_cpus:",
                 "--experiment:", "--tpu:", "jit_compile:", "--moving_average_decay:",
                 "--iterations_per_loop:", "--set:"):
        assert flag in proc.stdout, flag


STEPS = 100    # ~0.1 s a step: SIGTERM lands seconds before the end, wherever it lands


def _command(model_dir):
    return [sys.executable, TRAIN, "--dataset=synthetic", "--model=wrn-10-1",
            "--activation=silu", "--image_size=16", "--num_classes=4", "--train_batch_size=8",
            f"--train_steps={STEPS}", "--steps_per_loop=2", "--summary_every_steps=2",
            "--eval_steps=2", "--eval_batch_size=8", "--eval_attack_steps=1",
            "--strategy=mirrored", "--logical_cpus=2", f"--model_dir={model_dir}"]


def test_mirrored_cli_run_is_preempted_by_sigterm_and_the_same_command_resumes(tmp_path):
    """SIGTERM, sent once step 2 is reported, stops the run before its next step wherever
    the signal lands (also inside a graph loop): it saves a checkpoint at that step N, says
    so and exits 0; the same command resumes from N and completes. N depends on when the
    signal arrives, so it is read from the output."""
    cmd = _command(tmp_path / "run")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV)
    lines, sent = [], False
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith(f"step 2/{STEPS}") and not sent:
                proc.send_signal(signal.SIGTERM)
                sent = True
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "\n".join(lines)
    assert rc == 0, out
    assert "over 2 replica(s)" in out
    stopped = re.findall(r"^SIGTERM at step (\d+): checkpoint saved", out, re.M)
    assert len(stopped) == 1, out
    n = int(stopped[0])
    assert 2 <= n <= STEPS and f"preempted at step {n}/{STEPS}" in out, out
    reported = [int(m) for m in re.findall(rf"^step (\d+)/{STEPS} ", out, re.M)]
    assert reported[0] == 2 and max(reported) == n, reported      # no step after the stop
    assert (tmp_path / "run" / f"ckpt-{n}.index").exists()
    assert (tmp_path / "run" / "experiment.json").exists()

    second = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"(step {n})" in second.stdout and "Restored" in second.stdout, second.stdout
    resumed = [int(m) for m in re.findall(rf"^step (\d+)/{STEPS} ", second.stdout, re.M)]
    assert resumed == [k for k in range(n + 1, STEPS + 1) if k % 2 == 0], second.stdout
    assert f"completed at step {STEPS}/{STEPS}; eval clean top-1" in second.stdout
    assert (tmp_path / "run" / f"ckpt-{STEPS}.index").exists()


def test_missing_data_is_one_line_and_status_1(tmp_path):
    """Input that is only found wanting at run time (no shards in --data_dir) still ends in one
    line naming it, with status 1, not a traceback."""
    empty = tmp_path / "imagenet"
    empty.mkdir()
    proc, _ = _run(["--dataset=imagenet", f"--data_dir={empty}", "--model=resnet-18",
                    "--image_size=32", "--train_steps=2", f"--model_dir={tmp_path / 'run'}"],
                   timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: No TFRecord files match") and str(empty) in last
