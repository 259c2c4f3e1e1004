"""A run is a folder, not a process: everything another process needs to watch or steer a live run.

runs/<run id>/
  heartbeat.json  who trains the run (pid, host, boot id, process start time) and when it last said
                  so; rewritten every HEARTBEAT_SECONDS by a daemon thread, removed when the run ends
  control.json    a request to the run: {"action": "stop" | "abort", "requested": time, "by": "host/pid"};
                  written by anyone (`request`), acted on by the trainer at its next step, removed
                  when the run ends
  change.json     settings to change at the next epoch boundary: {"epochs": N, "lr_scale": x,
                  "unfreeze": true, "requested": time, "by": ...} (`request_change`); taken (and
                  removed) by the run's heartbeat thread

`LiveRun` is the trainer's side (a core listener); `judge` is what `core.store.read_run` asks to
tell a running run from an interrupted one; `request` is what `transferlab stop` and the app's
keys call; `MetricsFollower` reads a growing metrics.jsonl for a dashboard attached to the run. Works across processes, and across hosts sharing the runs folder (hosts then need
synchronised clocks, as NFS itself does: freshness compares another host's `updated` with ours).
"""
from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from core import events as ev
from core.files import MAX_LINE, is_regular_file

HEARTBEAT_FILE, CONTROL_FILE, CHANGE_FILE = "heartbeat.json", "control.json", "change.json"
HEARTBEAT_SECONDS = 5.0
"""How often a live run rewrites heartbeat.json."""
STALE_SECONDS = 3 * HEARTBEAT_SECONDS + 5.0
"""A heartbeat older than this means the run no longer trains (three missed beats, plus a margin
for a slow shared file system)."""
GONE_SECONDS = 600.0
"""A run on another host whose heartbeat is older than this is taken as surely dead: only then are
its half-written leftovers tidied (a host that merely stalled could still be writing them)."""
CONTROL_POLL_SECONDS = 0.5
"""How often the heartbeat thread looks for control.json (one os.stat)."""
ACTIONS = ("stop", "abort")
MAX_FILE = 64 * 1024
"""heartbeat.json and control.json larger than this are not read (they are under 300 bytes)."""


# ---------------------------------------------------------------------------------------------
# Who is this process


def boot_id() -> Optional[str]:
    """This machine's boot id (Linux), or None: with the host name, it tells "same machine, same
    boot" (where pids can be checked) from anywhere else."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def start_ticks(pid: int) -> Optional[int]:
    """When process `pid` started, in clock ticks since boot (field 22 of /proc/PID/stat), or None
    (no such process, not Linux). A pid reused by another process has another start time."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])  # fields after "(comm)" start at 3
    except (OSError, ValueError, IndexError, OverflowError):
        return None


def pid_alive(pid: Any) -> bool:
    """True when process `pid` exists (on this machine)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def identity() -> Dict[str, Any]:
    """This process, as a heartbeat names it."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot_id": boot_id(), "start_ticks": start_ticks(pid)}


def _read_small_json(path: Path) -> Any:
    """The JSON in a small file, or None (missing, not a regular file, too large, not JSON:
    untrusted, never raises). Opened without blocking: a FIFO put in a file's place would
    otherwise hang the reader (the heartbeat thread, the runs list) until someone writes to it."""
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            data = f.read(MAX_FILE + 1)
        return None if len(data) > MAX_FILE else json.loads(data.decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


# ---------------------------------------------------------------------------------------------
# Heartbeat: is the run alive?


@dataclass(frozen=True)
class Heartbeat:
    pid: int
    host: str
    updated: float
    boot_id: Optional[str] = None
    start_ticks: Optional[int] = None


def read_heartbeat(run_dir: str | Path) -> Optional[Heartbeat]:
    """The run's heartbeat, type-checked, or None when there is none (or it makes no sense)."""
    data = _read_small_json(Path(run_dir) / HEARTBEAT_FILE)
    if not isinstance(data, dict):
        return None
    try:
        return Heartbeat(ev.checked(data.get("pid"), "int", "pid"), ev.checked(data.get("host"), "str", "host"),
                         ev.checked(data.get("updated"), "float", "updated"),
                         ev.checked(data.get("boot_id"), "Optional[str]", "boot_id"),
                         ev.checked(data.get("start_ticks"), "Optional[int]", "start_ticks"))
    except ValueError:
        return None


def _where(beat: Heartbeat) -> str:
    """"here" when `beat` was written on this machine since its last boot (its pid can be
    checked), "rebooted" when on this machine before its last boot, else "elsewhere"."""
    if beat.host != socket.gethostname():
        return "elsewhere"
    mine = boot_id()
    return "here" if beat.boot_id is None or mine is None or beat.boot_id == mine else "rebooted"


def suspended(pid: int) -> bool:
    """Process `pid` is stopped (Ctrl-Z, SIGSTOP: state T in /proc/PID/stat): it beats no more but
    will go on when continued, so its run is not to be resumed by anyone else."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[0] in ("T", "t")
    except (OSError, ValueError, IndexError, OverflowError):
        return False


def training_pid(run_dir: str | Path) -> Optional[int]:
    """The pid of the process that trains the run in `run_dir` when it trains on this machine
    (its heartbeat written here since the last boot, by a process still alive), else None."""
    beat = read_heartbeat(run_dir)
    if beat is None or _where(beat) != "here" or _process_gone(beat):
        return None
    return beat.pid


def _process_gone(beat: Heartbeat) -> bool:
    """This machine, and the process that wrote `beat` no longer exists (or its pid now belongs to
    another process: another start time)."""
    if not pid_alive(beat.pid):
        return True
    ticks = start_ticks(beat.pid)
    return beat.start_ticks is not None and ticks is not None and ticks != beat.start_ticks


def judge(run_dir: str | Path, pid: Any, now: Optional[float] = None) -> tuple:
    """(running, gone) for a run whose summary says "running" and was written by `pid`.

    running: its heartbeat is fresh (younger than STALE_SECONDS) and, on this machine, the
    process that wrote it is still the same process (same boot, same pid and start time). gone: the run is surely not writing any more
    (process gone, or the heartbeat of another host older than GONE_SECONDS): its leftovers may be
    tidied. A run without heartbeat.json (written before heartbeats existed, or in the moment
    before its first beat) is running while its pid lives."""
    beat = read_heartbeat(run_dir)
    if beat is None:
        alive = pid_alive(pid)
        return alive, not alive
    age = (time.time() if now is None else now) - beat.updated
    where = _where(beat)
    if where == "elsewhere":
        return age < STALE_SECONDS, age >= GONE_SECONDS
    gone = where == "rebooted" or _process_gone(beat)
    return (age < STALE_SECONDS or suspended(beat.pid)) and not gone, gone


# ---------------------------------------------------------------------------------------------
# Control requests: steer the run


def request(run_dir: str | Path, action: str) -> None:
    """Ask the run in `run_dir` to stop (checkpoint, status "stopped") or abort (status
    "aborted"), from any process or host. Raises OSError when the folder cannot be written."""
    from core.store import atomic_write_json

    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}: {' or '.join(ACTIONS)}")
    atomic_write_json(Path(run_dir) / CONTROL_FILE, {
        "action": action, "requested": time.time(), "by": f"{socket.gethostname()}/{os.getpid()}"})


def request_change(run_dir: str | Path, epochs: Optional[int] = None, lr_scale: Optional[float] = None,
                   unfreeze: bool = False) -> None:
    """Ask the run in `run_dir` to change settings at its next epoch boundary, from any process
    or host. A request not yet taken is merged into. Raises OSError when the folder cannot be written."""
    from core.store import atomic_write_json

    path = Path(run_dir) / CHANGE_FILE
    with _CHANGE_LOCK:  # read, merge, write: two threads at once would lose one's request
        pending = _read_change(path) or {}
        if epochs is not None:
            pending["epochs"] = int(epochs)
        if lr_scale is not None:
            pending["lr_scale"] = pending.get("lr_scale", 1.0) * float(lr_scale)
        if unfreeze:
            pending["unfreeze"] = True
        atomic_write_json(path, {**pending, "requested": time.time(), "by": f"{socket.gethostname()}/{os.getpid()}"})


_CHANGE_LOCK = threading.Lock()
"""Held while a change request is merged into change.json (the dashboard asks from a thread per key)."""


def _read_change(path: Path, since: float = float("-inf")) -> Optional[Dict[str, Any]]:
    """A change request, type-checked (from a file anyone may write): only the known keys with
    sane values; None when there is none or it makes no sense, or it was made before `since`
    (left by an earlier life of the folder, as read_request)."""
    data = _read_small_json(path)
    if not isinstance(data, dict):
        return None
    requested = data.get("requested")
    if type(requested) in (int, float) and requested < since:
        return None
    out: Dict[str, Any] = {}
    epochs, scale = data.get("epochs"), data.get("lr_scale")
    if type(epochs) is int and 1 <= epochs <= 10_000:
        out["epochs"] = epochs
    if type(scale) in (int, float) and 1e-6 <= scale <= 1e6:
        out["lr_scale"] = float(scale)
    if data.get("unfreeze") is True:
        out["unfreeze"] = True
    return out


def read_request(run_dir: str | Path, since: float = float("-inf")) -> Optional[str]:
    """The action asked of the run ("stop" or "abort"), or None; a request made before `since`
    (left by an earlier life of the folder) does not count."""
    data = _read_small_json(Path(run_dir) / CONTROL_FILE)
    if not isinstance(data, dict) or data.get("action") not in ACTIONS:
        return None
    requested = data.get("requested")
    if type(requested) in (int, float) and requested < since:
        return None
    return data["action"]


# ---------------------------------------------------------------------------------------------
# The trainer's side


class LiveRun:
    """A core listener that keeps a run watchable and steerable from outside its process.

    From RunStarted to RunFinished a daemon thread rewrites heartbeat.json every
    HEARTBEAT_SECONDS and looks for control.json every CONTROL_POLL_SECONDS, turning a request
    into `control.request_stop()` / `request_abort()` (the trainer acts on it between steps). The
    thread beats only while the thread that started the run lives, so a training thread that died
    without finishing reads as interrupted. Both files are removed when the run ends.

    Errors writing the heartbeat are ignored: the run's own writes report a full disk."""

    def __init__(self, control: Any) -> None:
        self.control = control
        self.created = time.time()
        """Requests older than this were meant for an earlier life of the folder."""
        self.run_dir: Optional[Path] = None
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.RunStarted):
            self.start(Path(event.run_dir))
        elif isinstance(event, ev.RunFinished):
            self.stop()

    def start(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._identity = identity()
        self._beat()
        trainer = threading.current_thread()
        self._thread = threading.Thread(target=self._loop, args=(trainer,), name="transferlab-heartbeat",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread; remove heartbeat.json and control.json (the summary says how it ended)."""
        self._done.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * CONTROL_POLL_SECONDS + 1)
        if self.run_dir is not None:
            for name in (HEARTBEAT_FILE, CONTROL_FILE, CHANGE_FILE):
                try:
                    (self.run_dir / name).unlink(missing_ok=True)
                except OSError:
                    pass

    def _beat(self) -> None:
        from core.store import atomic_write_json

        try:
            atomic_write_json(self.run_dir / HEARTBEAT_FILE, {**self._identity, "updated": time.time()})
        except OSError:
            pass

    def _loop(self, trainer: threading.Thread) -> None:
        last_beat = time.monotonic()
        while not self._done.wait(CONTROL_POLL_SECONDS) and trainer.is_alive():
            self._poll_control()
            self._poll_change()
            if time.monotonic() - last_beat >= HEARTBEAT_SECONDS:
                self._beat()
                last_beat = time.monotonic()

    def _poll_change(self) -> None:
        path = self.run_dir / CHANGE_FILE
        try:
            os.stat(path)
        except OSError:
            return
        changes = _read_change(path, since=self.created)
        try:
            path.unlink()
        except OSError:
            return  # cannot take it away: leave it, rather than apply it again and again
        if changes:
            self.control.request_change(**changes)

    def _poll_control(self) -> None:
        try:
            os.stat(self.run_dir / CONTROL_FILE)
        except OSError:
            return
        action = read_request(self.run_dir, since=self.created)
        if action == "abort" and not self.control.aborting:
            self.control.request_abort()
        elif action == "stop" and not self.control.stopping:
            self.control.request_stop()


# ---------------------------------------------------------------------------------------------
# Following a run's metrics as they are written


FOLLOW_CHUNK = 4 * 2 ** 20
"""At most this many bytes are read per call of MetricsFollower.read (a long run catches up in a
few calls, each parsed in well under a second)."""


class MetricsFollower:
    """Reads the events a run appends to its metrics.jsonl, a little at a time, from where the
    last read stopped (an offset: what was read is never read again).

    A last line without its newline is a line being written (or torn by a kill): it waits for the
    next read. A line that is not a valid event is skipped, as read_events does (one longer than
    MAX_LINE without ever being held whole). A file that shrank (replaced) is read again from its
    start."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.offset = 0
        self._partial = b""
        self._skipping = False
        self.behind = False
        """More was written than the last read took (FOLLOW_CHUNK): read again at once."""

    def read(self) -> List[ev.Event]:
        """The complete events written since the last call (possibly none)."""
        try:
            if not is_regular_file(self.path):  # a FIFO or device would block or never end
                return []
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset:
                    self.offset, self._partial, self._skipping = 0, b"", False
                f.seek(self.offset)
                data = f.read(FOLLOW_CHUNK)
        except (OSError, ValueError):
            return []
        self.offset += len(data)
        self.behind = size > self.offset
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if self._skipping and lines:
            lines[0], self._skipping = b"", False  # the end of an overlong line
        if len(self._partial) > MAX_LINE:  # not an event line: never held in memory whole
            self._partial, self._skipping = b"", True
        return [e for e in map(ev.from_line, lines) if e is not None]
