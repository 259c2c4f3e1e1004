"""The TransferLab app: three modes (form, dashboard, runs) and the training worker.

The run executes core.trainer.train in one exclusive thread worker. The worker never touches a
widget: a bridge (a core listener) queues step events for the UI to drain every 0.1 s and posts
every other event as a message right away. The UI thread never calls oneflow.
"""
from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Deque, Iterable, List, Optional, Set

from textual import events, on, work
from textual.app import SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from core import events as ev
from core.config import RunConfig
from tui.compat import InstantSwitchApp
from tui.dialogs import ChoiceScreen, ConfirmScreen


RESUMABLE = ("stopped", "interrupted", "failed", "aborted")
"""The statuses the command palette offers "Resume run" for (a completed run needs more epochs:
transferlab train --resume RUN --epochs N)."""

TRAINING_NICENESS = 10
"""While a run trains, OneFlow's own (native) threads run at this nice value, so that the kernel
gives the interface a core at once when it needs one (measured: without it a redraw waits behind
OneFlow's compute threads on a busy 2-core machine)."""


GC_YOUNG_SECONDS = 0.5
GC_FULL_SECONDS = 60.0
GC_FULL_LATEST_SECONDS = 300.0
GC_KEYS_QUIET_SECONDS = 2.0
"""Python's cycle collector runs on the UI's schedule: young objects every GC_YOUNG_SECONDS (a
few ms); everything every GC_FULL_SECONDS, at a moment when no key was pressed for
GC_KEYS_QUIET_SECONDS (at the latest after GC_FULL_LATEST_SECONDS). Left to itself it ran a full
collection every 5-8 s during training, 130-300 ms each on the UI thread (Textual's render caches
are ~100k objects, and it makes ~2k cyclic garbage objects a second): the slowest key presses."""


def lower_training_priority(niceness: int = TRAINING_NICENESS) -> int:
    """Renice the process's native threads (OneFlow's); returns how many. Linux only.

    Python threads keep their priority: each of them takes the GIL now and then, and the UI
    thread would wait whenever the GIL is handed to one that the kernel does not run at once."""
    keep = {t.native_id for t in threading.enumerate()}
    changed = 0
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return 0
    for tid in tids:
        if tid in keep:
            continue
        try:
            os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), niceness))
            changed += 1
        except OSError:
            pass
    return changed


def one_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (OneFlow's errors
    run over many lines; the whole text goes to the run's error.txt)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class EventBridge:
    """A core listener, called in the worker thread. Step events wait in a deque (drained by the
    UI on a timer); every other event is posted at once as a message, never coalesced."""

    def __init__(self, app: "TransferLabApp"):
        self.app = app
        self.steps: Deque[ev.StepEnded] = deque()
        self.run_dir: Optional[str] = None
        """The run's folder, once it started (known to the worker thread)."""

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.StepEnded):
            self.steps.append(event)
            return
        if isinstance(event, ev.RunStarted):
            self.run_dir = event.run_dir
        self.app.post_message(TransferLabApp.RunEvent(event))

    def drain(self) -> List[ev.StepEnded]:
        out = []
        while self.steps:
            out.append(self.steps.popleft())
        return out


@dataclass
class LiveRun:
    cfg: RunConfig
    control: object
    bridge: EventBridge
    run_id: str = ""
    status: str = "starting"
    """As the interface knows it (from the worker's messages)."""
    done: threading.Event = field(default_factory=threading.Event)
    """Set by the worker thread when it ends, however it ends (the interface may be gone)."""
    result: Optional[ev.RunFinished] = None
    """How the run ended, set by the worker thread (None if it never started or crashed)."""
    resume: Optional[Path] = None
    """The folder of the stopped run this one continues."""


class TransferLabApp(InstantSwitchApp):
    """Transfer learning with OneFlow: set up a run, watch it train, compare runs."""

    TITLE = "TransferLab"
    _last_key = _last_full_gc = 0.0
    CSS_PATH = "app.tcss"
    BINDINGS = [
        Binding("f1", "switch_mode('form')", "Form"),
        Binding("f2", "switch_mode('dashboard')", "Dashboard"),
        Binding("f3", "switch_mode('runs')", "Runs"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    class RunEvent(Message):
        """A non-step core event of the live run (posted from the worker thread)."""

        def __init__(self, event: ev.Event) -> None:
            super().__init__()
            self.event = event

    class RunHistory(Message):
        """What a resumed run recorded before (read in the worker), to show the whole run."""

        def __init__(self, events: List[ev.Event]) -> None:
            super().__init__()
            self.events = events

    class RunCouldNotStart(Message):
        """Setup failed (bad data path, missing weights, unusable GPU...): nothing was created."""

        def __init__(self, error: str) -> None:
            super().__init__()
            self.error = error

    def __init__(self, cfg: Optional[RunConfig] = None, notes: Iterable[str] = (), runs_dir: Optional[str] = None,
                 attach: Optional[Path] = None):
        super().__init__()
        self.attach_to = attach
        """A run folder to open at start (`transferlab attach RUN`)."""
        import core.backend  # noqa: F401  oneflow is imported on the main thread, never first in a worker
        from tui.dashboard import DashboardScreen
        from tui.form import FormScreen
        from tui.runs import RunsScreen

        self.initial_cfg = cfg or RunConfig()
        self.runs_dir = runs_dir or self.initial_cfg.runs_dir
        self.live: Optional[LiveRun] = None
        self.quit_after_run = False
        self.add_mode("form", lambda: FormScreen(self.initial_cfg, list(notes)))
        self.add_mode("dashboard", lambda: DashboardScreen())
        self.add_mode("runs", lambda: RunsScreen())

    def on_mount(self) -> None:
        self.switch_mode("form")
        self.set_interval(0.1, self._drain_steps)
        self.call_after_refresh(self._build_screens)

    async def _build_screens(self) -> None:
        """Build the dashboard and runs screens while the form is shown, so that the first F2/F3
        does not wait for them (and for the CSS they bring, which every screen then reapplies)."""
        for mode in ("dashboard", "runs"):
            await self.build_mode(mode)
        gc.collect()
        gc.freeze()  # what exists now (OneFlow, FlowVision, Textual...) lives as long as the app
        gc.disable()
        self._last_full_gc = time.monotonic()
        self.set_interval(GC_YOUNG_SECONDS, self._collect)
        if self.attach_to is not None:
            from core.store import read_run
            from tui.dashboard import DashboardScreen

            following = read_run(self.attach_to).summary["status"] == "running"
            await self.switch_mode("runs")
            self.push_screen(DashboardScreen(live=False, run_dir=self.attach_to, follow=following))

    def _collect(self) -> None:
        now = time.monotonic()
        due, quiet = now - self._last_full_gc, now - self._last_key >= GC_KEYS_QUIET_SECONDS
        if due >= GC_FULL_LATEST_SECONDS or (due >= GC_FULL_SECONDS and quiet):
            gc.collect()
            self._last_full_gc = now
        else:
            gc.collect(1)

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.Key):
            self._last_key = time.monotonic()
        await super().on_event(event)

    def on_unmount(self) -> None:
        gc.unfreeze()
        gc.enable()

    def notify(self, message: str, *, title: str = "", severity="information", timeout=None,
               markup: bool = False) -> None:
        """Textual's notify (also what screens' and widgets' notify call), always without markup:
        messages quote paths, values and names from files, which must show as they are (a "[/x]"
        in one once ended the app)."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    # -- runs -----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.live is not None and self.live.status in ("starting", "running")

    async def start_run(self, cfg: Optional[RunConfig] = None, resume: Optional[Path] = None,
                        background: bool = False, processes: int = 1) -> bool:
        """Start training `cfg` in the worker and show the dashboard; with `resume` (a run
        folder), continue that stopped run instead, with its own settings. False (with a toast)
        if a run is in progress or the run cannot be continued."""
        from core.trainer import ResumeError, RunControl, plan_resume

        if self.running:
            self.notify("A run is in progress: stop it first (s on the dashboard).", severity="warning")
            return False
        if resume is not None:
            try:
                cfg = plan_resume(resume).cfg  # small JSON files: the checks answer at once
            except ResumeError as exc:
                self.notify(str(exc), title="Cannot resume", severity="warning", timeout=8)
                return False
        else:
            self.runs_dir = cfg.runs_dir
        self.live = LiveRun(cfg, RunControl(), EventBridge(self), resume=resume)
        await self.switch_mode("dashboard")
        self.dashboard.begin(cfg)
        self._train(self.live)
        return True

    @work(thread=True, exclusive=True, exit_on_error=False, group="train", name="train")
    def _train(self, live: LiveRun) -> None:
        try:
            live.result = self._run(live)
        finally:
            live.done.set()

    def _run(self, live: LiveRun) -> Optional[ev.RunFinished]:
        """The worker's work: set up and train `live`; how it finished, or None if it did not start."""
        from core.errors import SetupError
        from core.store import mark_failed
        from core.store import read_events
        from core.trainer import plan_resume, prepare, prepare_resume, train

        lower_training_priority()
        try:
            if live.resume is not None:  # first what the run did so far, then it continues live
                marker = plan_resume(live.resume).marker()
                history = ev.as_one_run([*read_events(live.resume), marker])[:-1]
                self.post_message(self.RunHistory(history))
                prepared = prepare_resume(live.resume)
            else:
                prepared = prepare(live.cfg)
            lower_training_priority()  # and the threads OneFlow started for the model and data
        except SetupError as exc:
            self.post_message(self.RunCouldNotStart(str(exc)))
            return None
        except Exception as exc:  # anything else while setting up: report, never crash the app
            self.post_message(self.RunCouldNotStart(one_line(exc)))
            return None
        try:
            return train(live.cfg, [live.bridge], live.control, prepared=prepared)
        except SetupError as exc:  # the run folder could not be created
            self.post_message(self.RunCouldNotStart(str(exc)))
            return None
        except Exception as exc:  # escaped the trainer's own handling: on_worker_state_changed reports it
            if live.bridge.run_dir is not None:
                mark_failed(live.bridge.run_dir, one_line(exc), traceback.format_exc())
            raise

    @property
    def dashboard(self):
        return self.mode_screen("dashboard")

    def _drain_steps(self) -> None:
        if self.live is not None and self.live.bridge.steps and self.dashboard is not None:
            self.dashboard.apply_steps(self.live.bridge.drain())

    @on(RunEvent)
    def _on_run_event(self, message: RunEvent) -> None:
        live, event = self.live, message.event
        if live is None:
            return
        if self.dashboard is not None:
            steps = live.bridge.drain()
            if steps:
                self.dashboard.apply_steps(steps)
            self.dashboard.apply(event)
        if isinstance(event, ev.RunStarted):
            live.run_id, live.status = event.run_id, "running"
        elif isinstance(event, ev.RunFinished):
            live.status = event.status
            severity = "information" if event.status == ev.COMPLETED else "warning"
            final = "" if event.final_test_acc is None else f": final test accuracy {event.final_test_acc:.4f}"
            self.notify(f"Run {event.status}{final}", severity=severity if event.status != ev.FAILED else "error")
            self.refresh_runs()
            if self.quit_after_run:
                self.exit()

    @on(RunHistory)
    def _on_run_history(self, message: RunHistory) -> None:
        if self.dashboard is not None:
            self.dashboard.apply_all(message.events)

    @on(RunCouldNotStart)
    def _on_could_not_start(self, message: RunCouldNotStart) -> None:
        if self.live is not None:
            self.live.status = "not started"
        if self.dashboard is not None:
            self.dashboard.could_not_start(message.error)
        self.notify(message.error, title="Run could not start", severity="error", timeout=10)
        if self.quit_after_run:
            self.exit()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """A crash in the worker outside train()'s own handling: show it, keep the app alive.
        (The worker has marked the run's folder failed, if the run had one.)"""
        if event.worker.name == "train" and event.state == WorkerState.ERROR and self.live is not None:
            error = one_line(event.worker.error)
            started = bool(self.live.run_id)
            self.live.status = ev.FAILED
            if self.dashboard is not None:
                if started:
                    self.dashboard.crashed(error)
                else:
                    self.dashboard.could_not_start(error)
            self.notify(error, title="The run failed", severity="error", timeout=10)
            self.refresh_runs()
            if self.quit_after_run:
                self.exit(return_code=1)  # the app ends on an error: its exit status says so

    def stop_run(self) -> None:
        if self.running:
            self.live.control.request_stop()
            self.notify("Stopping after this step; a checkpoint will be saved.")

    def abort_run(self) -> None:
        def confirmed(yes: Optional[bool]) -> None:
            if yes and self.running:
                self.live.control.request_abort()
                self.notify("Aborting the run.", severity="warning")

        if self.running:
            self.push_screen(ConfirmScreen("Abort the run now? No checkpoint is saved.", "Abort"), confirmed)

    def refresh_runs(self) -> None:
        runs = self.mode_screen("runs")
        if runs is not None:
            runs.reload()

    async def edit_config(self, cfg: RunConfig) -> None:
        """Back to the form, filled with `cfg`, to tweak and run again."""
        await self.switch_mode("form")
        self.mode_screen("form").load_config(cfg, note="Loaded the settings of the run: tweak and start again.")

    async def action_quit(self) -> None:
        if not self.running:
            self.exit()
            return

        def chosen(choice: Optional[str]) -> None:
            if choice == "s":
                self.quit_after_run = True
                self.stop_run()
            elif choice == "b" and self.running:
                self.exit()  # run_app keeps the process going until the run ends

        self.push_screen(ChoiceScreen("A run is in progress. Quit how?", [
            ("s", "Stop the run (saving a checkpoint), then quit"),
            ("b", "Keep training in the background, quit the interface"),
            ("c", "Cancel"),
        ]), chosen)

    # -- the terminal going away ----------------------------------------------------------------

    lost_terminal = False

    def terminal_lost(self) -> None:
        """SIGHUP (the terminal closed, the SSH connection dropped): end the interface at once,
        write nothing more to the terminal; a run goes on (run_app)."""
        self.lost_terminal = True
        restore_job_control_signals()  # the SIGCONT that comes with a hangup would restart the driver
        redirect_output(os.devnull)
        exit_when_the_run_ends(self)
        self.exit()

    # -- command palette ------------------------------------------------------------------------

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        form = self.mode_screen("form")
        if not self.running and form is not None and form.valid_config() is not None:
            yield SystemCommand("Start run", "Train with the settings in the form", form.action_start)
        if self.running:
            yield SystemCommand("Stop run", "Finish this step, save a checkpoint, stop", self.stop_run)
            yield SystemCommand("Abort run", "End the run at once (asks first)", self.abort_run)
        resumable = self._resumable_run()
        if not self.running and resumable is not None:
            yield SystemCommand("Resume run", f"Continue {resumable.run_id} from its last checkpoint",
                                lambda: self.start_run(resume=resumable.path))
        yield SystemCommand("Open form", "Settings of the next run", lambda: self.switch_mode("form"))
        yield SystemCommand("Open dashboard", "The current or last run", lambda: self.switch_mode("dashboard"))
        yield SystemCommand("Open runs", "All runs, overlay and compare", lambda: self.switch_mode("runs"))
        yield SystemCommand("Compare runs", "Final test accuracy by strategy, vs scratch", self._compare)
        if form is not None:
            yield SystemCommand("Save preset", "Write the form's settings to a file", form.action_save_preset)
            yield SystemCommand("Load preset", "Fill the form from a preset file", form.action_load_preset)

    def _resumable_run(self):
        """The run under the runs screen's cursor, when it stopped before its end."""
        runs = self.mode_screen("runs")
        run = runs.current() if runs is not None else None
        return run if run is not None and run.summary["status"] in RESUMABLE else None

    async def _compare(self) -> None:
        await self.switch_mode("runs")
        self.mode_screen("runs").action_compare()


def run_app(cfg: RunConfig, explicit: Set[str], attach: Optional[Path] = None) -> int:
    """Open the TUI with `cfg` (settings the user did not give are adapted to this machine) and
    return the exit status: 1 when the interface failed, else that of a run it left going."""
    from core.suggest import machine_defaults

    cfg, notes = machine_defaults(cfg, keep=explicit)
    code = asyncio.run(_run_app(TransferLabApp(cfg, notes, attach=attach)))
    end_process_if_threads_linger(code)
    return code


async def _run_app(app: TransferLabApp) -> int:
    """The app, then, if a run is still going when the interface ends (however it ends: ctrl+q
    "keep training", the terminal gone, an error in the interface), the run to its end in this
    process, headless: the run store records it as usual; nothing more goes to the terminal."""
    from core.cli import EXIT_CODES

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, app.terminal_lost)
    await app.run_async()
    restore_job_control_signals()
    live = app.live
    if live is None or live.done.is_set() or live.status not in ("starting", "running"):
        return app.return_code or 0
    if app.return_code:  # the interface failed: stop the run, with a checkpoint, saying why
        live.control.request_stop("the interface ended on an error (its traceback is in the terminal)")
    elif not app.lost_terminal:
        folder = live.bridge.run_dir or app.runs_dir
        print(f"TransferLab: the run goes on in this process (pid {os.getpid()}) until it ends; closing "
              f"this terminal does not stop it. It is recorded in {folder}; `transferlab runs --runs-dir "
              f"{app.runs_dir}` shows it. Ctrl-C here stops it (saving a checkpoint), twice aborts it.",
              file=sys.stderr, flush=True)
    if live.bridge.run_dir:
        redirect_output(os.path.join(live.bridge.run_dir, "output.log"))
    else:
        redirect_output(os.devnull)
    presses = []

    def interrupted() -> None:  # Ctrl-C or SIGTERM while the run goes on headless
        presses.append(1)
        live.control.request_stop() if len(presses) == 1 else live.control.request_abort()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted)
    await loop.run_in_executor(None, live.done.wait)
    if app.return_code:
        return app.return_code
    return EXIT_CODES.get(live.result.status, 1) if live.result else 1


def exit_when_the_run_ends(app: "TransferLabApp", grace: float = 5.0) -> None:
    """After a hangup: a watchdog thread ends the process `grace` seconds after the run has
    ended (at once if there is none), whatever the main thread is stuck in. With the terminal
    gone, a Textual thread or the event loop's shutdown could otherwise wait on it forever (seen
    in CI: the run completed, the process stayed)."""
    from core.cli import EXIT_CODES

    def watch() -> None:
        live = app.live
        if live is not None:
            live.done.wait()
        time.sleep(grace)
        result = live.result if live is not None else None
        code = app.return_code or (EXIT_CODES.get(result.status, 1) if result else 0)
        os._exit(code)

    threading.Thread(target=watch, name="exit-after-hangup", daemon=True).start()


def restore_job_control_signals() -> None:
    """SIGTSTP and SIGCONT back to their defaults. Textual's Linux driver handles them (to
    suspend and resume the interface) and leaves its handlers installed after it stops: a SIGCONT
    (sent with every hangup) then restarted its input thread on a terminal that is gone, which
    spun forever and kept the process from ending."""
    for sig in (signal.SIGTSTP, signal.SIGCONT):
        signal.signal(sig, signal.SIG_DFL)


def end_process_if_threads_linger(code: int, grace: float = 2.0) -> None:
    """After the app and its run: if a thread that is not ours (a driver thread of Textual's)
    is still alive after `grace` seconds, end the process with `code` instead of waiting for it
    forever (Python waits for every non-daemon thread before it exits)."""
    deadline = time.monotonic() + grace
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def redirect_output(path: str) -> None:
    """Point this process's standard input, output and error at `path` (appended; /dev/null
    reads as empty): after the terminal is gone or the interface ended, OneFlow's or Python's
    messages can neither block on a dead terminal nor draw over the shell."""
    try:
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        out = os.open(os.devnull, os.O_WRONLY)
    inp = os.open(os.devnull, os.O_RDONLY)
    os.dup2(inp, 0)
    for fd in (1, 2):
        os.dup2(out, fd)
    os.close(inp)
    os.close(out)
