"""A run's life, for the CLI and the app alike: start it (in this process, in the background,
through OneFlow's launcher), follow it, stop or abort it, resume it.

Whoever starts or attaches to a run holds a `Run`. Its listeners receive the run's core events
(RunStarted, StepEnded, EpochEnded, ..., RunFinished) whether it trains in a thread of this
process (`Local`) or in another process, here or on another host sharing the runs folder
(`Remote`: followed through its metrics.jsonl; `Background`: a child started now, then followed).
A resumed run's earlier lives go once, as one list, to its `history` callbacks first; its
current life goes to the listeners from its start (what was written before this process took
it up, at once), so a listener sees the same sequence wherever the run trains.
`stop()` / `abort()` reach the run either way. `run()` blocks until the run ends or the holder
lets go (`close()`), so call it in a worker thread (the app) or on the main thread (the CLI).

How the work is split: core.trainer trains, core.live keeps a run's folder watchable and
steerable (heartbeat, control requests, the metrics follower), core.launch starts background
processes, core.distributed the launcher's ranks. This module is the one the callers use.
"""
from __future__ import annotations

import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional

from core import events as ev
from core.config import RunConfig
from core.errors import SetupError, one_line

FOLLOW_SECONDS = 0.25
"""A followed run's metrics.jsonl is read this often (a read of what is new costs ~0.1 ms)."""
STATUS_SECONDS = 2.0
"""A followed run's status (summary, heartbeat) is checked this often: a run killed without a
RunFinished line is seen to end."""

History = Callable[[List[ev.Event]], None]


class Run:
    """A run as its holder sees it. Subclasses say where it trains."""

    here = False
    """It trains in this process (it ends with it)."""

    def __init__(self, listeners: List[ev.Listener] = (), history: List[History] = ()) -> None:
        self.listeners: List[ev.Listener] = list(listeners)
        self.history: List[History] = list(history)
        self.run_dir: Optional[Path] = None
        """Its folder, once it started."""
        self.started: Optional[float] = None
        """When it started (time.time()), once it did: what an ETA counts from."""
        self.result: Optional[ev.RunFinished] = None
        """How it ended, when it did and said so."""
        self.lost: Optional[ev.RunLost] = None
        """Set when it stopped training without saying how (its process was killed...)."""
        self.done = threading.Event()
        """Set when run() returns, however it ends."""
        self._closed = threading.Event()

    @property
    def set_up(self) -> bool:
        """Its start is behind it (data and model loaded here, or its folder found): an error from
        now on is the run failing, not failing to start."""
        return self.run_dir is not None

    def _tell(self, event: ev.Event) -> None:
        if isinstance(event, ev.RunStarted) and self.here:  # (another process's path may be relative to its own folder)
            self.run_dir, self.started = Path(event.run_dir), time.time()
        elif isinstance(event, ev.RunFinished):
            self.result = event
        for listener in self.listeners:
            listener(event)

    def _tell_history(self, events: List[ev.Event]) -> None:
        for callback in self.history:
            callback(events)

    def machine_pid(self) -> Optional[int]:
        """The process that trains the run when it is on this machine (what the dashboard's
        machine panel samples), else None. May read a file: call it off the UI thread."""
        from core.live import training_pid

        return training_pid(self.run_dir) if self.run_dir is not None else None

    def run(self) -> Optional[ev.RunFinished]:
        raise NotImplementedError

    def stop(self, reason: str = "") -> None:
        """Finish the current step, save a checkpoint, end "stopped"."""
        raise NotImplementedError

    def abort(self) -> None:
        """End at once, "aborted", without a checkpoint."""
        raise NotImplementedError

    def change(self, epochs: Optional[int] = None, lr_scale: Optional[float] = None, unfreeze: bool = False) -> None:
        """Change settings at the next epoch boundary: train to `epochs`, scale the learning
        rates by `lr_scale`, unfreeze the backbone (a frozen run)."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of the run: run() returns soon. A run in another process goes on; one in this
        process cannot be let go of (stop or abort it)."""
        self._closed.set()


class Local(Run):
    """A run trained in this process, in the thread that calls run(): a new one from `cfg`, or
    the continuation of the stopped run in the folder `resume` (with `epochs`, extended)."""

    here = True

    def __init__(self, cfg: Optional[RunConfig] = None, resume: Optional[Path] = None, epochs: Optional[int] = None,
                 listeners: List[ev.Listener] = (), history: List[History] = (), dist: Any = None) -> None:
        from core.trainer import RunControl  # imports oneflow: the caller has done so on the main thread

        super().__init__(listeners, history)
        self.cfg, self.resume, self.epochs, self.dist = cfg, resume, epochs, dist
        self.control = RunControl()
        self.prepared: Any = None

    @property
    def set_up(self) -> bool:
        return self.prepared is not None

    def prepare(self) -> None:
        """Load data and model (SetupError when they cannot be); for a resumed run, tell its history first."""
        from core.store import read_events
        from core.trainer import plan_resume, prepare, prepare_resume

        if self.resume is not None:
            plan = plan_resume(self.resume, self.epochs)  # small JSON files: answers at once
            self.cfg = plan.cfg
            if self.history:
                self._tell_history(ev.as_one_run([*read_events(self.resume), plan.marker()])[:-1])
            self.prepared = prepare_resume(self.resume, self.epochs)
        else:
            self.prepared = prepare(self.cfg)

    def train(self) -> ev.RunFinished:
        """Train the prepared run to its end. SetupError when its folder cannot be made; any other
        exception that escapes the trainer's own handling marks the run's folder failed and rises."""
        from core.store import mark_failed
        from core.trainer import train

        try:
            return train(self.prepared.cfg, [self._tell], self.control, prepared=self.prepared, dist=self.dist)
        except SetupError:
            raise
        except Exception as exc:
            if self.run_dir is not None:
                mark_failed(self.run_dir, one_line(exc), traceback.format_exc())
            raise

    def run(self) -> Optional[ev.RunFinished]:
        try:
            if self.prepared is None:
                self.prepare()
            return self.train()
        finally:
            self.done.set()

    def machine_pid(self) -> Optional[int]:
        return os.getpid()

    def stop(self, reason: str = "") -> None:
        self.control.request_stop(reason)

    def abort(self) -> None:
        self.control.request_abort()

    def change(self, epochs: Optional[int] = None, lr_scale: Optional[float] = None, unfreeze: bool = False) -> None:
        self.control.request_change(epochs, lr_scale, unfreeze)


class Remote(Run):
    """A run trained by another process, followed through its folder `run_dir`.

    run() tells the history (the run's earlier lives, when it was resumed), then the events of its
    current life (those already written at once, then each as it is written) until the run ends: by a RunFinished line, or by no longer training without one
    (its process killed, its heartbeat stale: a RunLost event with the status the run store gives
    it). stop() and abort() write a control request in the folder (OSError if they cannot)."""

    def __init__(self, run_dir: Optional[Path] = None, listeners: List[ev.Listener] = (),
                 history: List[History] = ()) -> None:
        super().__init__(listeners, history)
        self.run_dir = Path(run_dir) if run_dir is not None else None

    def run(self) -> Optional[ev.RunFinished]:
        try:
            if self._find_folder():
                self._follow()
            return self.result
        finally:
            self.done.set()

    def _find_folder(self) -> bool:
        return self.run_dir is not None

    def _follow(self) -> None:
        from core.live import MetricsFollower
        from core.store import read_run

        follower = MetricsFollower(self.run_dir)
        summary = read_run(self.run_dir).summary
        self.started = summary["started"]
        past: List[ev.Event] = follower.read()
        while follower.behind:
            past += follower.read()
        resumed = max((i for i, e in enumerate(past) if isinstance(e, ev.RunResumed)), default=0)
        if resumed:  # the run's earlier lives: what was redone after its checkpoint dropped
            self._tell_history(ev.as_one_run(past[:resumed + 1])[:-1])
            ended = [e for e in past[:resumed] if isinstance(e, ev.RunFinished)]
            if ended and self.started is not None:  # the store counts the earlier lives' time: not this life's
                self.started += ended[-1].seconds
        for event in past[resumed:]:  # this life, as if it were followed from its start
            self._tell(event)
            if isinstance(event, ev.RunFinished):
                return
        checked = time.monotonic()
        while not self._closed.is_set():
            events = follower.read()
            if not events and time.monotonic() - checked >= STATUS_SECONDS and not follower.behind:
                checked = time.monotonic()
                summary = read_run(self.run_dir).summary
                events = follower.read()  # what it wrote before it ended
                if summary["status"] != "running" and not any(isinstance(e, ev.RunFinished) for e in events):
                    for event in events:
                        self._tell(event)
                    self.lost = ev.RunLost(summary["status"], summary.get("message") or "")
                    self._tell(self.lost)
                    return
            for event in events:
                self._tell(event)
                if isinstance(event, ev.RunFinished):
                    return
            if not follower.behind:
                self._closed.wait(FOLLOW_SECONDS)

    def stop(self, reason: str = "") -> None:
        self._request("stop")

    def abort(self) -> None:
        self._request("abort")

    def change(self, epochs: Optional[int] = None, lr_scale: Optional[float] = None, unfreeze: bool = False) -> None:
        from core.live import request_change

        if self.run_dir is None:
            raise OSError("the run has not started yet: change its settings on the form instead")
        request_change(self.run_dir, epochs, lr_scale, unfreeze)

    def _request(self, action: str) -> None:
        from core.live import request

        if self.run_dir is None:
            raise OSError(f"the run has not started yet: cannot ask it to {action}")
        request(self.run_dir, action)


class Background(Remote):
    """A run started now as its own process (`train --detach`; with processes > 1 through
    OneFlow's launcher), then followed like any Remote run. run() starts the process, waits
    until it names its run folder (SetupError with the child's own message when it ends first),
    then follows. Stopped or aborted before the folder exists, the child is told by a signal."""

    def __init__(self, cfg: Optional[RunConfig] = None, resume: Optional[Path] = None, epochs: Optional[int] = None,
                 processes: int = 1, listeners: List[ev.Listener] = (), history: List[History] = ()) -> None:
        super().__init__(None, listeners, history)
        self.cfg, self.resume, self.epochs, self.processes = cfg, resume, epochs, processes
        self.child: Any = None
        self._ending = threading.Event()
        self._asked_to_end = False

    @property
    def pid(self) -> Optional[int]:
        return self.child.process.pid if self.child is not None else None

    def machine_pid(self) -> Optional[int]:
        """The process that trains the run (rank 0 on several processes), from its heartbeat;
        without one (not written yet, or gone), the child started (it loads the data and model)."""
        pid = super().machine_pid()
        return pid if pid is not None else self.pid

    def _find_folder(self) -> bool:
        from core.launch import START_TIMEOUT, Child

        self.child = Child(self.cfg, self.resume, self.epochs, self.processes)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.child.poll():
            if self._ending.is_set():
                self.child.terminate()
                self._ending.clear()
                self._asked_to_end = True
            if self._closed.is_set() or time.monotonic() > deadline:
                return False  # let go: the child goes on by itself
            self._closed.wait(0.1)
        state = self.child.state
        if state.exit_code is not None and self._asked_to_end:
            state.reason()  # (removes its log)
            raise SetupError("stopped before it started: nothing was written")
        if state.exit_code is not None:
            raise SetupError(problems=[line.removeprefix("error: ") for line in state.reason()])
        self.run_dir = state.run_dir
        return True

    def _request(self, action: str) -> None:
        if self.run_dir is None and self.child is not None:
            self._ending.set()  # not training yet: ending it is all there is to do
            return
        super()._request(action)


def attach(run_dir: Path, listeners: List[ev.Listener] = (), history: List[History] = ()) -> Remote:
    """The run in `run_dir`, trained by whatever process: followed, stopped, aborted from here."""
    return Remote(run_dir, listeners, history)
