"""The one base class of every problem found before a run starts.

Configuration, data, weights, device and runs-folder errors all derive from `SetupError`, so the
CLI and the app catch one type and show its message (one line a person can act on) without a
traceback. Anything else that escapes is a bug, reported as such.
"""
from __future__ import annotations

import re

MAX_LINE = 300
"""Longest message line shown: text quoted from a file (a key, a name) can be any length."""


class SetupError(RuntimeError):
    """A run cannot start (bad setting, missing or unsafe file, unusable device or folder).

    `str(exc)` is the whole message; `problems` lists its lines when there are several."""

    def __init__(self, message: str = "", problems: "list[str] | None" = None):
        self.problems = list(problems) if problems is not None else ([message] if message else [])
        super().__init__(message if problems is None else "\n".join(self.problems))

    def lines(self) -> "list[str]":
        """The problems as lines fit to show: each on one line, control characters replaced, long
        quotes cut (the text may come from a crafted file)."""
        return [printable(p) for p in self.problems] or [printable(str(self))]


def interrupted(exc: BaseException) -> bool:
    """A Ctrl-C (or SIGTERM), also when it came during an import: a C extension's import turns
    it into an ImportError, naming it (oneflow's) or with it as the cause (scipy's, under
    scikit-learn's digits: "initialization failed")."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, KeyboardInterrupt) or (isinstance(exc, ImportError) and "KeyboardInterrupt" in str(exc)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def printable(text: str, limit: int = MAX_LINE) -> str:
    """`text` on one line: newlines and other control characters as spaces, at most `limit`
    characters (then "...")."""
    flat = re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()
    return flat if len(flat) <= limit else flat[:limit] + "..."


def one_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (OneFlow's errors
    run over many lines; the whole text goes to the run's error.txt)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
