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


def check_choice(what: str, value, choices) -> None:
    """``Invalid <what> <value>; valid choices: ...`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise UserError(f"Invalid {what} {value!r}; valid choices: {', '.join(map(str, choices))}.")


def first(items: list, k: int = 3) -> str:
    """The first ``k`` of ``items``, and how many there are in all when there are more."""
    more = f", ... ({len(items)} in all)" if len(items) > k else ""
    return ", ".join(map(str, items[:k])) + more


def mismatch(*parts: tuple[str, list, int]) -> str:
    """``"2 variables missing (a, b); 1 of another shape (c)"`` from (what, items, shown) parts,
    the empty ones left out; "" when all are empty."""
    return "; ".join(f"{len(items)} {what} ({first(items, k)})" for what, items, k in parts
                     if items)
