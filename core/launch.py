"""Starting a run as its own process in the background (`transferlab train --detach`, the form's
"run in background" and "processes"; core.runner.Background uses it).

The parent checks the runs folder, writes the resolved settings to a launch file in it and starts
`transferlab train --config LAUNCH` (or `train --resume RUN`; with `--nproc-per-node N` through
OneFlow's launcher, whose rank 0 does the naming below) in a new session (no terminal: closing the parent's does not
touch it), its output going to a log file beside the launch file. When the run has started,
the child moves the log into its run folder as `output.log` and names its run folder in
`LAUNCH.run`; the parent waits for that (or for the child to fail while setting up) and says
which run it is. Nothing in the run depends on the parent afterwards: the run is its folder.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from core import config as C
from core import events as ev
from core.store import atomic_write_text, check_runs_dir

ENV_LAUNCH = "TRANSFERLAB_LAUNCH"
"""Set in a detached child: the path of its launch file (its log is LAUNCH.log)."""
ENV_EXPERIMENT = "TRANSFERLAB_EXPERIMENT_LAUNCH"
"""Set in a detached experiment process: the launch file whose .run names its first run (its
output stays in the experiment's folder as output.log)."""
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

    def reason(self) -> List[str]:
        """Why a child that ended before its run started did (its `error:` lines, else its last
        line), read from its log, which is then removed (nothing else of it remains)."""
        try:
            lines = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            lines = []
        self.log.unlink(missing_ok=True)
        errors = [line for line in lines if line.startswith("error:")]
        if errors or lines[-1:] == ["interrupted before training started; nothing was written"]:
            return errors or lines[-1:]
        code = self.exit_code or 0
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return [f"error: the background process ended before its run started ({how})"
                + (f"; its last output: {lines[-1][:200]}" if lines else "")]


def train_args(cfg: Optional[C.RunConfig] = None, launch: Optional[Path] = None, resume: Optional[Path] = None,
               epochs: Optional[int] = None, processes: int = 1, port: Optional[int] = None) -> List[str]:
    """The `transferlab train` arguments of a background child: the settings in `launch` (a
    config file), or `--resume` of the run folder `resume`; through the launcher with processes > 1
    (its ranks talking on `port`, default: a free one)."""
    if resume is not None:
        args = ["train", "--resume", str(resume)] + (["--epochs", str(epochs)] if epochs else [])
    else:
        args = ["train", "--config", str(launch)]
    if processes > 1:
        args += ["--nproc-per-node", str(processes), "--master-port", str(port or free_port())]
    return args


def free_port() -> int:
    """A TCP port free on this machine now (for the launcher's ranks of a run started here: two
    runs on the launcher's default port would meet each other)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tidy_launch_files(runs_dir: Path, older_than: float = START_TIMEOUT + 60.0) -> None:
    """Remove the launch files (.launch-*.json / .run) that nobody waits for any more: those of a
    parent that was killed, or that gave up. A file younger than `older_than` seconds may still
    be waited for (the parent's pid is in the name: a live parent's files are kept whatever
    their age). Logs are kept: the child may still write to one."""
    from core.live import pid_alive

    now = time.time()
    try:
        entries = [p for p in Path(runs_dir).iterdir() if p.name.startswith(".launch-") and p.suffix in (".json", ".run")]
    except OSError:
        return
    for path in entries:
        parts = path.stem.split("-")  # .launch-DATE-TIME-PID-N (detach) or .launch-ddp-DATE-TIME-PID (launcher)
        try:
            parent = int(parts[-1] if path.stem.startswith(".launch-ddp-") else parts[-2])
        except (ValueError, IndexError):
            parent = -1
        try:
            if not pid_alive(parent) and now - path.stat().st_mtime > older_than:
                path.unlink()
        except OSError:
            pass


def _launch_file(folder: Path) -> Path:
    return folder / f".launch-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.time_ns() % 10**6}.json"


class Child:
    """A `transferlab train` process started in the background, until its run has started (or,
    made by `experiment()`, a `transferlab experiment` process, until its first run has)."""

    adopts_log = True
    """Its log becomes the run's output.log (an experiment's stays in the experiment's folder)."""

    def __init__(self, cfg: Optional[C.RunConfig] = None, resume: Optional[Path] = None,
                 epochs: Optional[int] = None, processes: int = 1, port: Optional[int] = None):
        runs_dir = check_runs_dir(cfg.runs_dir if cfg is not None else Path(resume).parent)
        tidy_launch_files(runs_dir)
        self.launch = _launch_file(runs_dir)
        if cfg is not None:
            C.save(cfg, self.launch)
        self._start(train_args(cfg, self.launch, resume, epochs, processes, port), self.launch.with_suffix(".log"),
                    ENV_LAUNCH)

    @classmethod
    def experiment(cls, folder: Path, processes: int = 1, port: Optional[int] = None) -> "Child":
        """`transferlab experiment --continue` of the experiment in `folder` (RUNS/experiments/ID),
        its output in the folder's output.log (an earlier one is kept as output.N.log)."""
        child = cls.__new__(cls)
        child.adopts_log = False
        tidy_launch_files(folder)
        child.launch = _launch_file(folder)
        log = folder / "output.log"
        if log.exists():
            os.replace(log, _free_name(log))
        args = ["experiment", "--continue", folder.name, "--runs-dir", str(folder.parent.parent)]
        if processes > 1:
            args += ["--nproc-per-node", str(processes)] + (["--master-port", str(port)] if port else [])
        child._start(args, log, ENV_EXPERIMENT)
        return child

    def _start(self, args: List[str], log: Path, env_key: str) -> None:
        with open(os.devnull, "rb") as stdin, open(log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tui", *args], stdin=stdin, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, env_key: str(self.launch)}, cwd=os.getcwd())
        self.state = Detached(self.process.pid, log)

    def poll(self) -> bool:
        """True once the run started (state.run_dir) or the child ended before it did (state.exit_code)."""
        state, started = self.state, self.launch.with_suffix(".run")
        if state.run_dir is None and state.exit_code is None:
            if started.exists():
                state.run_dir = Path(started.read_text(encoding="utf-8").strip())
                if self.adopts_log:
                    state.log = state.run_dir / "output.log"
            else:
                state.exit_code = self.process.poll()
        done = state.run_dir is not None or state.exit_code is not None
        if done:
            for leftover in (self.launch, started):
                leftover.unlink(missing_ok=True)
        return done

    def wait(self, timeout: float = START_TIMEOUT, cancelled: Optional[threading.Event] = None) -> Detached:
        """Wait until the run started or the child ended (at most `timeout` seconds, or until
        `cancelled` is set); the state then, whichever it is."""
        deadline = time.monotonic() + timeout
        while not self.poll() and time.monotonic() < deadline:
            if cancelled is not None and cancelled.wait(0.1):
                break
            if cancelled is None:
                time.sleep(0.1)
        return self.state

    def terminate(self) -> None:
        """Ask the child to end (SIGTERM to its session: before training it ends at once, while
        training it stops gracefully; a launcher parent forwards it to every rank)."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass


class NameRun:
    """A listener for a child started by a parent that waits (`--detach`, the launcher's rank 0):
    when its run starts, name the run folder in LAUNCH.run."""

    def __init__(self, launch: str):
        self.launch = Path(launch)

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.RunStarted):
            self.name(Path(event.run_dir))

    def name(self, run_dir: Path) -> None:
        atomic_write_text(self.launch.with_suffix(".run"), str(run_dir) + "\n")


class AdoptLog(NameRun):
    """A detached child's NameRun that first moves the launch log into the run folder
    (`output.log`; the open file follows the rename)."""

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.RunStarted):
            log = Path(event.run_dir) / "output.log"
            try:
                if log.exists():  # a resumed run: its earlier output is kept beside
                    os.replace(log, _free_name(log))
                os.replace(self.launch.with_suffix(".log"), log)
            except OSError:
                pass  # the log stays beside the launch file; the run goes on
        super().__call__(event)


def _free_name(path: Path) -> Path:
    """output.log -> the first of output.1.log, output.2.log... that does not exist."""
    n = 1
    while path.with_suffix(f".{n}{path.suffix}").exists():
        n += 1
    return path.with_suffix(f".{n}{path.suffix}")


def adopt_log_listener() -> Optional[AdoptLog]:
    """The AdoptLog listener when this process is a detached child, else None."""
    launch = os.environ.get(ENV_LAUNCH)
    return AdoptLog(launch) if launch else None
