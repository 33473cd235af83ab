"""What every ``run/*.py`` program shares: its start, and one-line errors instead of tracebacks.

* Flag errors (unknown flag, a value of the wrong type) and bad values found by
  ``sat_tf.config`` / ``sat_tf.names`` (a :class:`~sat_tf.errors.UserError`) exit with status 2
  and one line, before TensorFlow is imported: :func:`run`'s flag parser, and :func:`start`,
  the first line of every ``main``.
* Problems with the user's input found while running (a :class:`~sat_tf.errors.UserError`: a
  data folder without shards, a checkpoint that does not exist; a corrupt record, a dataset
  that cannot be downloaded, a file that cannot be read) exit with status 1 and one line naming
  what was wrong: :func:`run` catches them around ``main``. A plain ``ValueError`` is not the
  user's: Keras raises it for shape bugs, and it keeps its traceback.
  So does a missing or wrong TensorFlow build (:mod:`sat_tf.install`), with the pip command
  that fixes it. So does a multi-worker run whose peer worker stopped or never started
  (:func:`_lost_peer`).
  Anything else is a bug in sat-tf and keeps its traceback; so does everything when the
  environment variable ``SAT_TF_TRACEBACK=1`` is set.

This module reads no program flags (only absl's ``--verbosity``, in :func:`start`) and
imports no TensorFlow.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Callable, Sequence, TypeVar

from absl import app, flags, logging

from sat_tf import install
from sat_tf.errors import UserError

T = TypeVar("T")


def fail(program: str, message: str, status: int = 2):
    """Prints ``program: error: message`` (first line only) to stderr and exits."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    print(f"{program}: error: {first}", file=sys.stderr, flush=True)
    sys.exit(status)


def start(program: str, argv: Sequence[str], configure: Callable[[], T], *,
          quiet_logging: bool = False) -> T:
    """The start of a program's ``main``, up to the point where TensorFlow may be imported.

    1. Positional arguments are refused in one line, exit status 2 (every option is a --flag).
    2. TensorFlow's C++ INFO and WARNING lines are turned off (``TF_CPP_MIN_LOG_LEVEL=2``,
       unless the environment sets it); with ``quiet_logging``, absl logs warnings and errors
       only, unless ``--verbosity`` was given (TensorFlow's INFO lines drown the program's own
       output).
    3. ``configure()`` turns the flags into config objects; a UserError it raises (a bad flag
       value) ends the program in one line, exit status 2. It imports no TensorFlow, so bad
       values fail in well under a second (unless it must ask TensorFlow's file system about a
       remote path, after the local checks).

    Returns what ``configure`` returned; TensorFlow is imported after this call::

        def main(argv):
            exp = cli.start("train.py", argv, experiment_from_flags, quiet_logging=True)
            from sat_tf import distribute, training   # only now TensorFlow
            ...

        if __name__ == "__main__":
            cli.run(main, "train.py")
    """
    if len(argv) > 1:
        fail(program, f"unexpected arguments {list(argv[1:])}; every option is a --flag.")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if quiet_logging and not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        return configure()
    except UserError as e:
        fail(program, str(e))


_TASK = re.compile(r"/job:(\w+)/replica:\d+/task:(\d+)")
# (text in TensorFlow's message, lower case; the short reason shown): the first match wins.
_PEER_REASONS = (
    ("wait_for_all_tasks_to_register", "not running within --peer_timeout_seconds"),
    ("registertask", "not reachable within --peer_timeout_seconds"),
    ("incarnation", "it restarted alone"),
    ("heartbeat", "heartbeat lost"),
    ("connection reset", "connection reset"),
    ("socket closed", "connection closed"),
    ("connection refused", "connection refused"),
    ("failed to connect", "connection failed"),
)


def _lost_peer(e: BaseException, tf) -> str | None:
    """The one-line message for a multi-worker error caused by another worker that stopped
    (killed, crashed, machine lost) or never started, else None.

    TensorFlow reports these as Unavailable / DeadlineExceeded / Aborted / Cancelled /
    Internal errors of the coordination service or of a collective op, naming the other task
    (``/job:worker/replica:0/task:1``); the worker's address comes from ``TF_CONFIG``.
    """
    kinds = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
             tf.errors.AbortedError, tf.errors.CancelledError)
    if not isinstance(e, kinds + (tf.errors.InternalError,)):
        return None
    try:
        config = json.loads(os.environ.get("TF_CONFIG") or "{}")
        cluster, task = config.get("cluster") or {}, config.get("task") or {}
        own = (task.get("type"), int(task.get("index", 0)))
    except (ValueError, TypeError, AttributeError):
        return None
    if sum(len(v) for v in cluster.values() if isinstance(v, list)) < 2:
        return None
    message = getattr(e, "message", None) or str(e)
    lower = message.lower()
    peers = [(job, int(i)) for job, i in _TASK.findall(message) if (job, int(i)) != own]
    # A failed call to the coordination service (e.g. a heartbeat) that names no task: the
    # service's host, the leader (chief 0, else worker 0), is the one lost.
    leader = ("chief", 0) if "chief" in cluster else ("worker", 0)
    if not peers and "/tensorflow.CoordinationService/" in message and own != leader:
        peers = [leader]
    # The coordination service's own errors; an Internal error is a peer's only with these
    # (a collective op can fail with Internal errors for other reasons: bugs keep tracebacks).
    service = any(m in lower for m in ("coordination", "heartbeat", "barrier"))
    if not (service or (peers and isinstance(e, kinds))):
        return None
    reason = next((short for text, short in _PEER_REASONS if text in lower), None)
    if reason is None:
        lines = [line.strip() for line in message.splitlines() if line.strip()
                 and not line.startswith(("Graph execution error", "Detected at node"))
                 and not line.strip().startswith("File ")]
        reason = (lines[0] if lines else type(e).__name__)[:120]
    who = "a worker of the cluster"
    if peers:
        job, i = peers[0]
        addresses = cluster.get(job) or []
        where = f" ({addresses[i]})" if i < len(addresses) else ""
        who = f"{job} {i} of the cluster{where}"
    return (f"{who} stopped or never started ({reason}); restart every worker with the same "
            "command to resume from the last checkpoint.")


def _user_error(e: BaseException) -> str | None:
    """The one-line message for an error caused by the user's input, else None."""
    if isinstance(e, install.TensorFlowInstallError):
        return str(e)
    if isinstance(e, ModuleNotFoundError) and e.name == "tensorflow":
        return install.missing_tensorflow_message()
    if isinstance(e, (UserError, FileNotFoundError, NotADirectoryError, PermissionError,
                      ConnectionError)):
        return str(e)
    tf = sys.modules.get("tensorflow")
    if tf is not None and (lost := _lost_peer(e, tf)) is not None:
        return lost
    if tf is not None and isinstance(e, (tf.errors.NotFoundError, tf.errors.InvalidArgumentError,
                                         tf.errors.DataLossError,
                                         tf.errors.PermissionDeniedError)):
        return tf_error_line(e.message)
    return None


_ASSERTION = re.compile(r"assertion failed: \[(.*?)\]?\s*$")
_TRACE_LINES = ("Graph execution error", "Detected at node", "[[", "File ", "{{")


def tf_error_line(message: str) -> str:
    """The line of a TensorFlow error message that says what was wrong.

    A failure inside a graph (an input pipeline's assertion naming a corrupt record, a bad
    label) reads ``Graph execution error:`` then the Python stack of the op, and only then
    ``assertion failed: [Corrupt record or undecodable image: record 3 of <file>]``: that
    last part is the message, without the brackets. Otherwise the first line that is not
    part of a stack trace."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    for line in lines:
        match = _ASSERTION.search(line)
        if match:
            return match.group(1).rstrip("]").strip()
    for line in lines:
        if not line.startswith(_TRACE_LINES) and not line.endswith("(most recent call last):"):
            return line
    return lines[0] if lines else "TensorFlow failed"


def run(main, program: str) -> None:
    """``absl.app.run(main)`` with one-line errors (see the module doc)."""

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            fail(program, str(e))

    def guarded(argv):
        try:
            return main(argv)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is the user's input
            message = _user_error(e)
            if message is None or os.environ.get("SAT_TF_TRACEBACK"):
                raise
            fail(program, message, status=1)

    app.run(guarded, flags_parser=parse)
