"""The one error type for bad input from the user.

A :class:`UserError` says what the user gave that cannot work (a value, a name, a path, a
file's content) in one line naming the bad value and, where there are any, the valid choices.
The command-line programs (:mod:`sat_tf.cli`) print it as that line and exit; any other
exception is a bug in sat-tf and keeps its traceback. It is a ``ValueError``, so code that
catches bad values as ``ValueError`` still does.

Importable without TensorFlow.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user; its message is one line naming the value and the choices."""
