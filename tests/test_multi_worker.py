"""MultiWorkerMirroredStrategy for real: ``run/train.py`` worker processes on 127.0.0.1.

One cluster run is shared by several checks (each process costs ~10 s of TensorFlow start-up
on a small machine), in this order:

1. two workers train 6 steps: only the chief writes into model_dir, both print the same
   losses, and the final evaluation counts every example of an eval split that the two hosts
   share unequally (3 per-replica batches: 2 on one host, 1 on the other);
2. those losses equal an in-process MirroredStrategy run on 2 logical CPUs (conftest) of the
   same experiment: the data, the seeds and the batch-norm statistics do not depend on how
   the replicas are spread over processes;
3. both workers restarted with more steps resume from ckpt-6; worker 1 is then SIGKILLed
   after ckpt-9 and worker 0 ends promptly with one error line, status 1;
4. both restarted again: they resume from ckpt-9 and complete;
5. a worker whose peer never starts gives up after --peer_timeout_seconds with one line (it
   runs while check 2 trains in-process, which leaves a core free);
6. without processes: TensorFlow's messages for a lost peer, as measured in these runs, map
   to the one line naming the worker, and other errors do not.

Each start gets fresh ports (TF_CONFIG differs only in them); everything else is the same
command. See tests/multiworker.py for the process handling (timeouts kill process groups).
"""
import json
import os
import re
import time

import numpy as np
import pytest

from multiworker import Cluster
from sat_tf.config import Experiment, RuntimeConfig

STEPS, MORE_STEPS = 6, 12
EVAL_EXAMPLES = 20     # per-replica eval batch 8: batches of 8, 8, 4 -> hosts get 2 and 1
RUN_TIMEOUT = 150      # seconds one worker may take (normally ~40)
DEAD_PEER_BOUND = 60   # seconds worker 0 may take to end after worker 1 is killed (measured
                       # 2-22 s: a reset connection at once, else the 10 s heartbeat timeout)
PEER_TIMEOUT = 5


def _args(model_dir, steps, *extra):
    return ["--strategy=multi_worker", "--dataset=synthetic", "--model=wrn-10-1",
            "--image_size=16", "--num_classes=4", "--train_batch_size=16",
            f"--train_steps={steps}", "--steps_per_loop=1", "--summary_every_steps=1",
            "--checkpoint_every_steps=3", "--eval_every_steps=1000", "--eval_batch_size=16",
            "--eval_attack_steps=1",
            f"--synthetic_eval_examples={EVAL_EXAMPLES}", f"--model_dir={model_dir}", *extra]


def _step_lines(text):
    return [line for line in text.splitlines() if line.startswith("step ")]


def _progress(text):
    """The step lines without their timing fields (img/s, ETA), which differ between workers."""
    return [line.split(" img/s")[0].rsplit(" | ", 1)[0] for line in _step_lines(text)]


def _losses(text):
    return [float(re.search(r"\| loss ([-\d.eE+naif]+) \|", line).group(1))
            for line in _step_lines(text)]


def _error_lines(text):
    return [line for line in text.splitlines() if line.startswith("train.py: error:")]


def _finish(workers, timeout=RUN_TIMEOUT):
    deadline = time.monotonic() + timeout
    return [w.wait(deadline - time.monotonic()) for w in workers]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("multi_worker_logs"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("multi_worker") / "run"


@pytest.fixture(scope="module")
def first_run(cluster, model_dir):
    workers = cluster.start(_args(model_dir, STEPS))
    return workers, _finish(workers)


def test_two_workers_train_and_only_the_chief_writes_into_model_dir(first_run, model_dir):
    workers, codes = first_run
    chief, other = workers
    assert codes == [0, 0], [w.stderr[-3000:] for w in workers]
    assert _progress(chief.stdout) == _progress(other.stdout)
    assert [line.split(" |")[0] for line in _step_lines(chief.stdout)] == [
        f"step {k}/{STEPS}" for k in range(1, STEPS + 1)]

    # The chief: experiment.json, checkpoints, summaries (and its lock, final_eval.json).
    names = set(os.listdir(model_dir))
    assert {"experiment.json", "checkpoint", "ckpt-3.index", "ckpt-6.index", "train",
            "eval", ".worker-1"} <= names, names
    chief_files = re.compile(r"(experiment\.json|checkpoint|ckpt-\d+\.(index|data-.*)|train|eval"
                             r"|final_eval\.json|\.lock)$")
    assert all(chief_files.match(n) for n in names - {".worker-1"}), names
    for folder in ("train", "eval"):    # event file names end in <pid>.<n>.v2
        events = os.listdir(model_dir / folder)
        assert events and all(f".{chief.proc.pid}." in e for e in events), (events,
                                                                            chief.proc.pid)
    # Worker 1: its checkpoints (the save is collective) in its own scratch folder only.
    scratch = os.listdir(model_dir / ".worker-1")
    assert all(re.match(r"(checkpoint|ckpt-\d+\.(index|data-.*))$", n) for n in scratch), scratch
    saved = lambda w: re.findall(r"Saved checkpoint (\S+)\.$", w.stdout, re.M)
    assert saved(chief) == [str(model_dir / "ckpt-3"), str(model_dir / "ckpt-6")]
    assert saved(other) == [str(model_dir / ".worker-1" / "ckpt-3"),
                            str(model_dir / ".worker-1" / "ckpt-6")]

    # The final evaluation covers the eval split exactly once over both hosts.
    for w in workers:
        assert f"eval at step {STEPS}: {EVAL_EXAMPLES} images" in w.stdout, w.stdout


@pytest.fixture(scope="module")
def lone_worker(cluster, tmp_path_factory):
    """Worker 0 of a two-worker cluster whose worker 1 never starts (checked by the last
    test; started early so that its wait overlaps the in-process training)."""
    model_dir = tmp_path_factory.mktemp("lone_worker") / "run"
    (worker,) = cluster.start(_args(model_dir, STEPS, f"--peer_timeout_seconds={PEER_TIMEOUT}"),
                              indices=[0])
    return worker


@pytest.mark.usefixtures("lone_worker")
def test_two_workers_lose_the_same_as_one_process_with_two_devices(first_run, model_dir,
                                                                   tmp_path):
    from sat_tf import distribute, training

    workers, codes = first_run
    assert codes == [0, 0]
    with open(model_dir / "experiment.json") as f:
        exp = Experiment.from_dict(json.load(f))
    exp = exp.replace(**{"model_dir": str(tmp_path / "one_process"),
                         "runtime.strategy": "mirrored"})
    strategy = distribute.strategy_from_config(
        RuntimeConfig(strategy="mirrored", devices=("/cpu:0", "/cpu:1")))
    lines = []
    training.Trainer(exp, strategy=strategy, log=lines.append).train()
    one_process = _losses("\n".join(lines))
    two_workers = _losses(workers[0].stdout)
    assert len(one_process) == len(two_workers) == STEPS
    np.testing.assert_allclose(two_workers, one_process, rtol=1e-4)
    # The same at full float32 precision, from the TensorBoard summaries (measured: bitwise).
    np.testing.assert_allclose(_summary_losses(model_dir / "train"),
                               _summary_losses(tmp_path / "one_process" / "train"), rtol=1e-4)


def _summary_losses(folder):
    """The ``loss`` scalars of the event files in ``folder``, by step."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    by_step = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == "loss":
                    by_step[event.step] = float(tf.make_ndarray(value.tensor))
    assert sorted(by_step) == list(range(1, STEPS + 1)), sorted(by_step)
    return [by_step[k] for k in sorted(by_step)]


@pytest.fixture(scope="module")
def resumed_then_killed(cluster, model_dir, first_run):
    workers = cluster.start(_args(model_dir, MORE_STEPS))
    chief, other = workers
    chief.wait_for_line(f"Saved checkpoint {model_dir / 'ckpt-9'}.", RUN_TIMEOUT)
    other.kill()
    killed = time.monotonic()
    code = chief.wait(RUN_TIMEOUT)
    return workers, code, chief.ended - killed


def test_restarted_workers_resume_from_the_last_checkpoint(resumed_then_killed, model_dir):
    workers, _, _ = resumed_then_killed
    for w in workers:
        assert "Restored" in w.stdout and "ckpt-6 (step 6)" in w.stdout, w.stdout
        assert _step_lines(w.stdout)[0].startswith(f"step 7/{MORE_STEPS} |"), w.stdout


def test_a_killed_worker_ends_the_other_with_one_line_and_restart_resumes(
        resumed_then_killed, cluster, model_dir):
    workers, code, seconds = resumed_then_killed
    chief, other = workers
    print(f"worker 0 ended {seconds:.1f} s after worker 1 was killed")
    assert code == 1, chief.stderr[-3000:]
    assert seconds < DEAD_PEER_BOUND
    assert "Traceback" not in chief.stderr
    errors = _error_lines(chief.stderr)
    assert len(errors) == 1, chief.stderr[-3000:]
    assert errors[0].startswith(f"train.py: error: worker 1 of the cluster ({other.address}) "
                                "stopped or never started ("), errors[0]
    assert errors[0].endswith("restart every worker with the same command to resume from the "
                              "last checkpoint."), errors[0]

    again = cluster.start(_args(model_dir, MORE_STEPS))
    assert _finish(again) == [0, 0], [w.stderr[-3000:] for w in again]
    for w in again:
        assert "ckpt-9 (step 9)" in w.stdout, w.stdout
        assert _step_lines(w.stdout)[0].startswith(f"step 10/{MORE_STEPS} |"), w.stdout
        assert f"completed at step {MORE_STEPS}/{MORE_STEPS}" in w.stdout
    assert _progress(again[0].stdout) == _progress(again[1].stdout)


def test_a_worker_whose_peer_never_starts_gives_up_after_the_peer_timeout(lone_worker):
    alone = lone_worker
    code = alone.wait(RUN_TIMEOUT)
    seconds = alone.ended - alone.started
    print(f"worker 0 alone ended {seconds:.1f} s after its start")
    assert code == 1, alone.stderr[-3000:]
    # It waited for the timeout, and not much longer than start-up (~10 s here) + timeout.
    assert PEER_TIMEOUT < seconds < PEER_TIMEOUT + 45
    assert "Traceback" not in alone.stderr
    errors = _error_lines(alone.stderr)
    assert len(errors) == 1, alone.stderr[-3000:]
    assert errors[0].startswith("train.py: error: worker 1 of the cluster (127.0.0.1:"), errors
    assert "--peer_timeout_seconds" in errors[0]
    assert alone.stdout == ""


# TensorFlow's messages as measured in the runs above (TF 2.21), for the mapping to one line.
_NEVER_STARTED = (  # worker 0 (the coordination leader) alone
    "Barrier timed out. Id: [Init]Wait_for_all_tasks_to_register::0. This usually happens "
    "because a task triggered the barrier too early or too slowly.\n# of tasks that reached "
    "the barrier: 1/2.\nThe first task at the barrier: /job:worker/replica:0/task:0. Some "
    "timed out task names:\n/job:worker/replica:0/task:1\n\nAdditional GRPC error information "
    "from remote target /job:worker/replica:0/task:0 while calling "
    "/tensorflow.CoordinationService/RegisterTask:")
_LEADER_NEVER_STARTED = (  # worker 1 alone
    "Deadline Exceeded\nAdditional GRPC error information from remote target "
    "/job:worker/replica:0/task:0 while calling /tensorflow.CoordinationService/RegisterTask:")
_RESET = (
    "Graph execution error:\n\nDetected at node while/CollectiveReduceV2 defined at (most "
    "recent call last):\n  File \"run/train.py\", line 291, in <module>\n\nCollective ops is "
    "aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error information from "
    "remote target /job:worker/replica:0/task:1 while calling /tensorflow.WorkerService/RecvBuf")
_LEADER_HUNG = (  # worker 0 stopped (SIGSTOP): worker 1's heartbeat to it times out
    "Graph execution error:\n\nCollective ops is aborted by: Deadline Exceeded\nRPC: "
    "/tensorflow.CoordinationService/Heartbeat\nThe error could be from a previous operation.")


@pytest.mark.parametrize("kind, message, index, words", [
    ("DeadlineExceededError", _NEVER_STARTED, 0, ["worker 1 of the cluster (127.0.0.1:2002)",
                                                  "(not running within --peer_timeout"]),
    ("DeadlineExceededError", _LEADER_NEVER_STARTED, 1,
     ["worker 0 of the cluster (127.0.0.1:2001)", "(not reachable within --peer_timeout"]),
    ("UnavailableError", _RESET, 0, ["worker 1 of the cluster (127.0.0.1:2002)",
                                     "(connection reset)"]),
    ("DeadlineExceededError", _LEADER_HUNG, 1, ["worker 0 of the cluster (127.0.0.1:2001)",
                                                "(heartbeat lost)"]),
])
def test_a_lost_peer_becomes_one_line_naming_it(monkeypatch, kind, message, index, words):
    import tensorflow as tf

    from sat_tf import cli

    monkeypatch.setenv("TF_CONFIG", json.dumps({
        "cluster": {"worker": ["127.0.0.1:2001", "127.0.0.1:2002"]},
        "task": {"type": "worker", "index": index}}))
    line = cli._user_error(getattr(tf.errors, kind)(None, None, message))
    assert line is not None and "\n" not in line
    assert line.endswith("; restart every worker with the same command to resume from the "
                         "last checkpoint.")
    for w in words:
        assert w in line, line


def test_other_errors_are_not_taken_for_a_lost_peer(monkeypatch):
    import tensorflow as tf

    from sat_tf import cli

    internal = tf.errors.InternalError(None, None, "Shape mismatch in the collective instance "
                                       "100. Op at device /job:worker/replica:0/task:1")
    reset = tf.errors.UnavailableError(None, None, _RESET)
    monkeypatch.setenv("TF_CONFIG", json.dumps({
        "cluster": {"worker": ["127.0.0.1:2001", "127.0.0.1:2002"]},
        "task": {"type": "worker", "index": 0}}))
    assert cli._user_error(internal) is None          # a bug: keeps its traceback
    monkeypatch.delenv("TF_CONFIG")
    assert cli._user_error(reset) is None             # not a multi-worker run
