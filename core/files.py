"""Opening files that come from elsewhere (presets, weights, datasets, run folders).

A path may name a FIFO (opening it blocks until someone writes), a device (/dev/zero never ends)
or a sparse file of any size: readers check that it is a regular file and cap what they read.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

MAX_LINE = 1 << 20
"""A line of metrics.jsonl longer than this is skipped (real ones are under 1 KB)."""


def is_regular_file(path: str | Path) -> bool:
    """A regular file (after links): not a folder, FIFO, socket or device."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):  # missing, unreadable, a NUL in the name
        return False


def too_large(path: str | Path, limit: int) -> bool:
    """True when the file at `path` holds more than `limit` bytes (its apparent size: a sparse
    file reads back as all of it)."""
    try:
        return os.stat(path).st_size > limit
    except (OSError, ValueError):
        return False


def lines(f: BinaryIO, max_line: int = MAX_LINE) -> Iterator[bytes]:
    """The lines of a binary file, skipping (whole) any longer than `max_line`: one huge line,
    or a file of zeros without a newline, never sits in memory at once."""
    while True:
        line = f.readline(max_line + 1)
        if not line:
            return
        if len(line) > max_line and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # skip to the end of this line
                line = f.readline(max_line + 1)
            continue
        yield line
