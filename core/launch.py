"""Starting a run as its own process in the background (`transferlab train --detach`).

The parent checks the runs folder, writes the resolved settings to a launch file in it and starts
`transferlab train --config LAUNCH` in a new session (no terminal: closing the parent's does not
touch it), its output going to a log file beside the launch file. When the run has started,
the child moves the log into its run folder as `output.log` and names its run folder in
`LAUNCH.run`; the parent waits for that (or for the child to fail while setting up) and says
which run it is. Nothing in the run depends on the parent afterwards: the run is its folder.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from core import config as C
from core import events as ev
from core.store import atomic_write_text, check_runs_dir

ENV_LAUNCH = "TRANSFERLAB_LAUNCH"
"""Set in a detached child: the path of its launch file (its log is LAUNCH.log)."""
START_TIMEOUT = 180.0
"""How long the parent waits for the child to start its run (loading data and weights)."""


@dataclass
class Detached:
    pid: int
    log: Path
    run_dir: Optional[Path] = None
    """The run's folder once it started; None while the child is still setting up."""
    exit_code: Optional[int] = None
    """Set when the child ended before its run started (a setup error, told in its log)."""


def start_detached(cfg: C.RunConfig, timeout: float = START_TIMEOUT) -> Detached:
    """Start `cfg` as a background process and wait until its run has started (or failed to)."""
    runs_dir = check_runs_dir(cfg.runs_dir)
    launch = runs_dir / f".launch-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.time_ns() % 10**6}.json"
    C.save(cfg, launch)
    log = launch.with_suffix(".log")
    with open(os.devnull, "rb") as stdin, open(log, "ab") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "tui", "train", "--config", str(launch)], stdin=stdin, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, ENV_LAUNCH: str(launch)},
            cwd=os.getcwd())
    started = launch.with_suffix(".run")
    deadline = time.monotonic() + timeout
    result = Detached(child.pid, log)
    while time.monotonic() < deadline:
        if started.exists():
            result.run_dir = Path(started.read_text(encoding="utf-8").strip())
            result.log = result.run_dir / "output.log"
            break
        code = child.poll()
        if code is not None:
            result.exit_code = code
            break
        time.sleep(0.1)
    if result.run_dir is not None or result.exit_code is not None:
        for leftover in (launch, started):
            leftover.unlink(missing_ok=True)
    return result


class NameRun:
    """A listener for a child started by a parent that waits (`--detach`, the launcher's rank 0):
    when its run starts, name the run folder in LAUNCH.run."""

    def __init__(self, launch: str):
        self.launch = Path(launch)

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.RunStarted):
            atomic_write_text(self.launch.with_suffix(".run"), str(event.run_dir) + "\n")


class AdoptLog(NameRun):
    """A detached child's NameRun that first moves the launch log into the run folder
    (`output.log`; the open file follows the rename)."""

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.RunStarted):
            try:
                os.replace(self.launch.with_suffix(".log"), Path(event.run_dir) / "output.log")
            except OSError:
                pass  # the log stays beside the launch file; the run goes on
        super().__call__(event)


def adopt_log_listener() -> Optional[AdoptLog]:
    """The AdoptLog listener when this process is a detached child, else None."""
    launch = os.environ.get(ENV_LAUNCH)
    return AdoptLog(launch) if launch else None
