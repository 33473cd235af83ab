"""Real ``run/train.py`` worker processes on 127.0.0.1, for the multi-worker tests.

    cluster = Cluster(tmp_path / "logs")
    workers = cluster.start([...train.py flags...])       # one process per worker
    for w in workers:
        w.wait(timeout=120)                              # kills its process group if exceeded
    workers[0].stdout, workers[0].returncode

Every start picks fresh free ports on 127.0.0.1 (bind to port 0 at run time) and gives each
worker the ``TF_CONFIG`` of a ``worker`` cluster. A worker runs in its own process group and
session, writes stdout and stderr to files (no pipe to fill up), and is killed with its whole
group when it outlives its timeout or when :meth:`Cluster.close` runs, so a hung worker can
never hang the test session.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "run" / "train.py")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (the OS picks them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tf_config(addresses: list[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": addresses},
                       "task": {"type": "worker", "index": index}})


class Worker:
    """One ``train.py`` process; ``stdout`` / ``stderr`` read its log files."""

    def __init__(self, index: int, address: str, args: list[str], env: dict,
                 log_dir: pathlib.Path, tag: str):
        self.index, self.address = index, address
        self.out_path = log_dir / f"{tag}-worker{index}.out"
        self.err_path = log_dir / f"{tag}-worker{index}.err"
        self.started = time.monotonic()
        self.ended = None           # when the process exited (time.monotonic())
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, TRAIN, *args], stdout=out,
                                         stderr=err, env=env, cwd=str(ROOT),
                                         start_new_session=True)
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        self.proc.wait()
        self.ended = time.monotonic()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    @property
    def returncode(self):
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        """The exit status; on timeout the process group is killed and AssertionError raised."""
        try:
            rc = self.proc.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"worker {self.index} still running after {timeout:.0f} s; "
                                 f"killed.\nstdout:\n{self.stdout[-3000:]}\n"
                                 f"stderr:\n{self.stderr[-3000:]}") from None
        self._watcher.join()
        return rc

    def wait_for_line(self, prefix: str, timeout: float) -> None:
        """Waits until stdout has a line starting with ``prefix`` (AssertionError if the
        process ends or ``timeout`` passes first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line.startswith(prefix) for line in self.stdout.splitlines()):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"worker {self.index}: no line {prefix!r} (exit status "
                             f"{self.proc.poll()}).\nstdout:\n{self.stdout[-3000:]}\n"
                             f"stderr:\n{self.stderr[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig`` to the worker's whole process group (if still running)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            if sig == signal.SIGKILL:
                self.proc.wait()


class Cluster:
    """Starts groups of workers; :meth:`close` kills whatever is still running."""

    def __init__(self, log_dir: pathlib.Path, num_workers: int = 2):
        self.log_dir = pathlib.Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.num_workers = num_workers
        self.workers: list[Worker] = []
        self._starts = 0

    def start(self, args: list[str], indices=None) -> list[Worker]:
        """Starts the workers ``indices`` (default: all) of a cluster on fresh ports."""
        self._starts += 1
        addresses = [f"127.0.0.1:{p}" for p in free_ports(self.num_workers)]
        started = []
        for i in (range(self.num_workers) if indices is None else indices):
            env = {k: v for k, v in os.environ.items() if k != "SAT_TF_TRACEBACK"}
            env.update(TF_CONFIG=tf_config(addresses, i), TF_CPP_MIN_LOG_LEVEL="3",
                       PYTHONUNBUFFERED="1")
            started.append(Worker(i, addresses[i], args, env, self.log_dir,
                                  f"start{self._starts}"))
        self.workers += started
        return started

    def close(self) -> None:
        for w in self.workers:
            w.kill()
