"""What every ``run/*.py`` program shares: one-line errors instead of tracebacks.

* Flag errors (unknown flag, a value of the wrong type) and bad values found by
  ``sat_tf.config`` / ``sat_tf.names`` exit with status 2 and one line, before TensorFlow is
  imported: :func:`fail`, and :func:`run`'s flag parser.
* Problems with the user's input found while running (a data folder without shards, a corrupt
  record, a dataset that cannot be downloaded, a checkpoint that does not exist) exit with
  status 1 and one line naming what was wrong: :func:`run` catches them around ``main``.
  Anything else is a bug in sat-tf and keeps its traceback; so does everything when the
  environment variable ``SAT_TF_TRACEBACK=1`` is set.

This module reads no flags itself and imports no TensorFlow.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags


def fail(program: str, message: str, status: int = 2):
    """Prints ``program: error: message`` (first line only) to stderr and exits."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    print(f"{program}: error: {first}", file=sys.stderr, flush=True)
    sys.exit(status)


def _user_error(e: BaseException) -> str | None:
    """The one-line message for an error caused by the user's input, else None."""
    if isinstance(e, (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
                      ConnectionError)):
        return str(e)
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(e, (tf.errors.NotFoundError, tf.errors.InvalidArgumentError,
                                         tf.errors.DataLossError,
                                         tf.errors.PermissionDeniedError)):
        return e.message
    return None


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
