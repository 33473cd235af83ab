"""The run directory under faults: one trainer at a time, only the same run resumes, damaged
checkpoints are skipped by name, and a final evaluation cut short is run again."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from sat_tf import rundir, training
from test_training import _silent, experiment, no_bn_net


def _train(model_dir, log=_silent, **kw):
    kw.setdefault("strategy", "one_device")
    kw.setdefault("checkpoint_every_steps", 2)
    trainer = training.Trainer(experiment(model_dir, **kw), model_fn=no_bn_net, log=log)
    return trainer, trainer.train()


# ---- one trainer per directory ---------------------------------------------------------------

def test_a_second_trainer_is_refused_naming_the_holder(tmp_path):
    with rundir.RunLock(str(tmp_path)):
        with pytest.raises(rundir.RunDirError) as e:
            _train(tmp_path, train_steps=2)
    message = str(e.value)
    assert "\n" not in message and "in use by another trainer" in message
    assert f"pid {os.getpid()}" in message
    _, result = _train(tmp_path, train_steps=2)      # released: trains
    assert result["status"] == "completed"


def test_a_crashed_holder_leaves_no_stale_lock(tmp_path):
    """A process that took the lock and died (kill -9: no clean-up code runs)."""
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        from sat_tf import rundir
        rundir.RunLock({str(tmp_path)!r}).__enter__()
        os.kill(os.getpid(), 9)
    """)
    proc = subprocess.run([sys.executable, "-c", code], timeout=120)
    assert proc.returncode == -9
    assert os.path.exists(tmp_path / rundir.LOCK_FILE)
    with rundir.RunLock(str(tmp_path)):
        pass


def test_a_stale_bucket_lock_is_taken_over(tmp_path, monkeypatch):
    lock = rundir.RunLock(str(tmp_path))
    lock.remote = True                    # the bucket protocol, on a local folder
    with open(lock.path, "w") as f:
        f.write("pid 1 on elsewhere, refreshed 1000\n")    # refreshed in 1970
    lock.__enter__()
    assert "refreshed" in open(lock.path).read() and lock.holder in open(lock.path).read()
    other = rundir.RunLock(str(tmp_path))
    other.remote, other.holder = True, "pid 2 on another"
    with pytest.raises(rundir.RunDirError, match=r"in use by another trainer \(pid \d+ on"):
        other.__enter__()
    lock.release()
    assert not os.path.exists(lock.path)


# ---- only the same run resumes ---------------------------------------------------------------

def test_another_run_in_the_directory_is_refused_naming_the_fields(tmp_path):
    _train(tmp_path, train_steps=2)
    stored = open(tmp_path / "experiment.json").read()
    with pytest.raises(rundir.RunDirError) as e:
        _train(tmp_path, train_steps=4, global_batch_size=32, seed=3)
    message = str(e.value)
    assert "\n" not in message
    assert "train.global_batch_size (stored 16, given 32)" in message
    assert "train.seed (stored 0, given 3)" in message
    assert "train_steps" not in message                  # a longer run may resume
    assert open(tmp_path / "experiment.json").read() == stored   # not overwritten
    _, result = _train(tmp_path, train_steps=4)           # the same run, longer: resumes
    assert result["status"] == "completed" and result["step"] == 4


def test_may_change_covers_only_what_a_resume_may_change():
    a = experiment("/tmp/x")
    b = experiment("/tmp/y", train_steps=60, steps_per_loop=1, eval_every_steps=3)
    b.runtime.strategy, b.data.data_dir = "one_device", "/elsewhere"
    assert rundir.differences(a, b) == []
    c = experiment("/tmp/x", base_learning_rate=0.1, label_smoothing=0.0)
    c.train_attack.epsilon = 2.0
    c.model.activation = "silu"
    paths = [d.split(" ")[0] for d in rundir.differences(a, c)]
    assert paths == ["model.activation", "schedule.base_learning_rate", "train.label_smoothing",
                     "train_attack.epsilon"]


# ---- damaged checkpoints ---------------------------------------------------------------------

def _weights(model):
    return [np.array(w) for w in model.weights]


def test_unparsable_state_file_resumes_from_the_newest_checkpoint(tmp_path):
    first, _ = _train(tmp_path, train_steps=4)
    with open(tmp_path / "checkpoint", "w") as f:
        f.write("garbage {{{")
    lines = []
    resumed = training.Trainer(experiment(tmp_path, strategy="one_device", train_steps=6,
                                          checkpoint_every_steps=2),
                               model_fn=no_bn_net, log=lines.append)
    assert int(resumed.step.numpy()) == 4, lines
    for a, b in zip(_weights(first.model), _weights(resumed.model)):
        np.testing.assert_array_equal(a, b)
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-4")   # state repaired
    resumed.train()
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-6")
    assert os.path.exists(str(tmp_path / "ckpt-4.index"))                 # not rotated away


@pytest.mark.parametrize("damage", ["data", "index"])
def test_a_truncated_checkpoint_is_skipped_by_name(tmp_path, damage):
    _train(tmp_path, train_steps=4)
    target = (tf.io.gfile.glob(str(tmp_path / "ckpt-4.data-*"))[0] if damage == "data"
              else str(tmp_path / "ckpt-4.index"))
    with open(target, "r+b") as f:
        f.truncate(40)
    lines = []
    resumed = training.Trainer(experiment(tmp_path, strategy="one_device", train_steps=4,
                                          checkpoint_every_steps=2),
                               model_fn=no_bn_net, log=lines.append)
    assert int(resumed.step.numpy()) == 2
    assert any(s.startswith("Skipped unreadable checkpoint") and "ckpt-4" in s for s in lines)
    assert any("Restored" in s and "ckpt-2" in s for s in lines)
    # Evaluation and export load the newest readable one too; an explicit bad one is one line.
    model, _, step, path = rundir.load_run(str(tmp_path), model_fn=no_bn_net, log=_silent)
    assert step == 2 and path.endswith("ckpt-2")
    with pytest.raises(rundir.RunDirError, match="ckpt-4' cannot be read") as e:
        rundir.load_run(str(tmp_path), checkpoint=str(tmp_path / "ckpt-4"),
                          model_fn=no_bn_net)
    assert "\n" not in str(e.value)


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    _train(tmp_path, train_steps=2)
    with open(str(tmp_path / "ckpt-2.index"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(rundir.RunDirError, match="None of the checkpoints.*ckpt-2"):
        training.Trainer(experiment(tmp_path, strategy="one_device", train_steps=2),
                         model_fn=no_bn_net, log=_silent)


# ---- the final evaluation --------------------------------------------------------------------

def test_a_final_evaluation_cut_short_runs_again(tmp_path):
    _, result = _train(tmp_path, train_steps=2)
    assert result["eval"]["examples"] == 32
    assert rundir.final_eval_done(str(tmp_path), 2)
    os.remove(tmp_path / rundir.FINAL_EVAL_FILE)            # as if killed during it
    lines = []
    _, again = _train(tmp_path, train_steps=2, log=lines.append)
    assert again["status"] == "completed" and again["eval"]["examples"] == 32
    assert any(s.startswith("eval at step 2") for s in lines)
    assert rundir.final_eval_done(str(tmp_path), 2)
    lines.clear()
    _, done = _train(tmp_path, train_steps=2, log=lines.append)     # recorded: not again
    assert not any(s.startswith("eval at") for s in lines)
    assert done["eval"] == again["eval"]           # the recorded result is returned
