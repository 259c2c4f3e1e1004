"""The one base class of every problem found before a run starts.

Configuration, data, weights, device and runs-folder errors all derive from `SetupError`, so the
CLI and the app catch one type and show its message (one line a person can act on) without a
traceback. Anything else that escapes is a bug, reported as such.
"""
from __future__ import annotations


class SetupError(RuntimeError):
    """A run cannot start (bad setting, missing or unsafe file, unusable device or folder).

    `str(exc)` is the whole message; `problems` lists its lines when there are several."""

    def __init__(self, message: str = "", problems: "list[str] | None" = None):
        self.problems = list(problems) if problems is not None else ([message] if message else [])
        super().__init__(message if problems is None else "\n".join(self.problems))
