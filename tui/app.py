"""The TransferLab app: three modes (form, dashboard, runs) and the training worker.

A run started here is a core.runner.Run: trained in one exclusive thread worker of the app
(Local), or in its own process (Background: "run in background", several processes) that the
worker follows. The worker never touches a widget: the dashboard's feed (a core listener)
queues step events for the UI to drain every 0.1 s and posts every other event as a message
right away; the app's own listener posts the run's start and end. The UI thread never calls oneflow.
"""
from __future__ import annotations

import asyncio
import gc
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Set

from textual import events, on, work
from textual.app import SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.worker import Worker, WorkerState, get_current_worker

from core import events as ev
from core.config import RunConfig
from core.plotdata import PlotControls
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


class StatusFeed:
    """The app's core listener of its run (called in the thread that runs it): the run's start
    and end, posted as messages; steps are the dashboard's (tui.dashboard.RunFeed)."""

    def __init__(self, app: "TransferLabApp", here: bool):
        self.app, self.here = app, here

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, (ev.RunStarted, ev.RunFinished, ev.RunLost)):
            if isinstance(event, ev.RunStarted) and self.here:
                lower_training_priority()  # and the threads OneFlow started for the model and data
            self.app.post_message(TransferLabApp.RunStatus(event))


@dataclass
class LiveRun:
    """The run this app started: a core.runner.Run (in its worker thread, or a background process)."""

    cfg: RunConfig
    run: Any
    run_id: str = ""
    status: str = "starting"
    """As the interface knows it (from the run's events)."""

    @property
    def done(self) -> threading.Event:
        """Set when the run has ended (or, for one in another process, the app let go of it)."""
        return self.run.done

    @property
    def result(self) -> Optional[ev.RunFinished]:
        return self.run.result

    @property
    def resume(self) -> Optional[Path]:
        """The folder of the stopped run this one continues."""
        return self.run.resume


class TransferLabApp(InstantSwitchApp):
    """Transfer learning with OneFlow: set up a run, watch it train, compare runs."""

    TITLE = "TransferLab"
    _last_key = _last_full_gc = 0.0
    CSS_PATH = "app.tcss"
    plot_controls = PlotControls()
    """How the run plots are drawn (y, m, w, t, c on a dashboard): kept for the next run and replays."""
    BINDINGS = [
        Binding("f1", "switch_mode('form')", "Form"),
        Binding("f2", "switch_mode('dashboard')", "Dashboard"),
        Binding("f3", "switch_mode('runs')", "Runs"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    class RunStatus(Message):
        """The app's run started or ended (posted from the thread that runs it)."""

        def __init__(self, event: ev.Event) -> None:
            super().__init__()
            self.event = event

    class ExperimentEnded(Message):
        """The app's experiment ran its last run, or paused (a run did not complete)."""

        def __init__(self, exp: Any, finished: bool) -> None:
            super().__init__()
            self.exp, self.finished = exp, finished

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
        self.experiment: Any = None
        """The experiment this app runs or follows (core.experiment), while it does."""
        self.experiment_elsewhere = False
        """The experiment trains in a process of its own (this app follows it)."""
        self.experiment_child: Any = None
        """The process of the experiment this app started in the background (core.launch.Child)."""
        self._letting_go = threading.Event()
        """Set when the interface ends: a worker following another process lets go of it."""
        self.quit_after_run = False
        self.add_mode("form", lambda: FormScreen(self.initial_cfg, list(notes)))
        self.add_mode("dashboard", lambda: DashboardScreen())
        self.add_mode("runs", lambda: RunsScreen())

    def on_mount(self) -> None:
        self.switch_mode("form")
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
            from core.experiment import of_run
            from core.store import read_run

            exp = of_run(self.attach_to)
            if exp is not None and exp.held_elsewhere():  # a run of an experiment that goes on: follow it all
                await self.follow_experiment(exp)
                return
            following = read_run(self.attach_to).summary["status"] == "running"
            await self.switch_mode("runs")
            self.mode_screen("runs").open_run(self.attach_to, following)

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

    def action_help_quit(self) -> None:
        """Ctrl-C does not quit a Textual app: say what does (Textual's own toast is markup, which
        this app's notify shows as typed)."""
        self.notify("Press ctrl+q to quit the app", title="Do you want to quit?")

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

    @property
    def busy(self) -> bool:
        """A run trains, or an experiment goes on (between its runs too): nothing else may start."""
        return self.running or self.experiment is not None

    async def start_run(self, cfg: Optional[RunConfig] = None, resume: Optional[Path] = None,
                        background: bool = False, processes: int = 1) -> bool:
        """Start training `cfg` and show the dashboard: in the app's worker thread, or with
        `background` (always with processes > 1) as its own process that the dashboard follows.
        With `resume` (a run folder), continue that stopped run instead, with its own settings.
        False (with a toast) if a run is in progress or the run cannot be continued."""
        from core.runner import Background, Local
        from core.trainer import ResumeError, plan_resume

        if self.busy:
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
        elsewhere = background or processes > 1
        run = Background(cfg if resume is None else None, resume, processes=processes) if elsewhere \
            else Local(cfg if resume is None else None, resume)
        run.listeners.append(StatusFeed(self, run.here))
        self.live = LiveRun(cfg, run)
        await self.switch_mode("dashboard")
        self.dashboard.begin(cfg, where="in the background" + (f" on {processes} processes" if processes > 1 else "")
                             if elsewhere else "")
        self.dashboard.show_run(run)
        self._train(self.live)
        return True

    @work(thread=True, exclusive=True, exit_on_error=False, group="train", name="train")
    def _train(self, live: LiveRun) -> None:
        """The worker's work: the run, to its end (one in another process: followed until it ends
        or the app lets go of it)."""
        self._run_or_report(live.run)

    def _run_or_report(self, run: Any) -> Optional[ev.RunFinished]:
        """Run `run` in this worker thread; how it ended, or None when it could not start (said in
        a message). An error of a started run ends the worker in ERROR (on_worker_state_changed
        reports it; the run's folder says "failed")."""
        from core.errors import SetupError, one_line

        if run.here:
            lower_training_priority()
        try:
            return run.run()
        except SetupError as exc:
            self.post_message(self.RunCouldNotStart(str(exc)))
        except Exception as exc:
            if run.set_up:
                raise
            self.post_message(self.RunCouldNotStart(one_line(exc)))  # while setting up: never crash the app
        return None

    async def start_experiment(self, cfg: Optional[RunConfig] = None, strategies: Iterable[str] = (),
                               exp: Any = None, background: bool = False, processes: int = 1) -> bool:
        """Train `cfg` with each of `strategies`, one after another in the app's worker (or
        continue the experiment `exp`); with `background` (always with processes > 1), in a
        process of its own that the dashboard follows run by run. At the end, the comparison.
        False (with a toast) when a run is in progress or the experiment cannot start."""
        from core import experiment as X

        if self.busy:
            self.notify("A run is in progress: stop it first (s on the dashboard).", severity="warning")
            return False
        from core.errors import SetupError

        elsewhere = background or processes > 1
        try:
            exp = exp or X.create(cfg, list(strategies))
            if elsewhere and exp.held_elsewhere():
                raise X.ExperimentError(f"experiment {exp.id} is being run by another process: wait until it "
                                        "pauses or ends")
            if not elsewhere:
                exp.hold()
            todo = exp.plan()
        except SetupError as exc:  # the experiment's file or folder, the runs folder
            if exp is not None:
                exp.release()
            self.notify(str(exc), title="Cannot start the experiment", severity="error", timeout=8)
            return False
        if not todo:
            exp.release()
            self.notify(f"Experiment {exp.id} is complete.")
            self._show_experiment(exp)
            return False
        self.runs_dir = str(exp.runs_dir)
        self.experiment, self.experiment_elsewhere, self.experiment_child = exp, elsewhere, None
        await self.switch_mode("dashboard")
        if elsewhere:
            from core.launch import Child

            self.dashboard.begin(exp.config(todo[0][0]), where=f"(experiment {exp.id}: starting in the background"
                                 + (f" on {processes} processes" if processes > 1 else "") + ")")
            self._experiment_elsewhere(exp, len(todo), lambda: Child.experiment(exp.path, processes))
        else:
            self._experiment(exp, todo)
        return True

    async def follow_experiment(self, exp: Any) -> bool:
        """Follow, run by run, the experiment another process trains now (`x` on the runs
        screen, `transferlab attach`); the comparison at its end. False (with a toast) when this
        app trains a run."""
        if self.busy:
            self.notify("A run is in progress: stop it first (s on the dashboard).", severity="warning")
            return False
        self.experiment, self.experiment_elsewhere, self.experiment_child = exp, True, None
        self.runs_dir = str(exp.runs_dir)
        left = len(exp.strategies) - sum(status == "completed" for _, _, status in exp.statuses())
        await self.switch_mode("dashboard")
        self.dashboard.begin(exp.config(exp.strategies[0]), where=f"(experiment {exp.id}, trained in the background)")
        self._experiment_elsewhere(exp, left, None)
        return True

    @work(thread=True, exclusive=True, exit_on_error=False, group="train", name="train")
    def _experiment_elsewhere(self, exp: Any, count: int, start: Optional[Callable[[], Any]]) -> None:
        """An experiment trained by its own process (started now by `start`, or already running):
        each of its runs, as it starts, followed on the dashboard; the end when the process has
        ended and no run is left to follow. Letting go (the app ends) leaves it training."""
        from core.errors import one_line
        from core.runner import attach

        worker = get_current_worker()
        since, followed, i = time.time(), set(), 0
        if start is not None:
            try:
                child = start()
            except OSError as exc:
                self.post_message(self.RunCouldNotStart(f"cannot start the experiment's process: {one_line(exc)}"))
                self.post_message(self.ExperimentEnded(exp, False))
                return
            self.experiment_child = child
            state = child.wait(cancelled=self._letting_go)
            if state.exit_code is not None:
                self.post_message(self.RunCouldNotStart("; ".join(line.removeprefix("error: ")
                                                                  for line in state.reason())))
                self.post_message(self.ExperimentEnded(exp, False))
                return
        while not worker.is_cancelled and not self._letting_go.is_set():
            now = exp.reread()
            fresh = [(s, p) for s, p, status in now.statuses()
                     if p.name not in followed and (status == "running" or _changed_since(p, since))]
            if fresh:
                strategy, path = fresh[0]
                followed.add(path.name)
                i += 1
                run = attach(path)
                run.listeners.append(StatusFeed(self, False))
                self.call_from_thread(self._begin, LiveRun(exp.config(strategy), run),
                                      f"(experiment {exp.id} in the background: run {i} of {max(count, i)})",
                                      (i, max(count, i)))
                self._run_or_report(run)
                continue
            if not exp.held_elsewhere():
                exp = exp.reread()
                break
            self._letting_go.wait(0.5)
        if self._letting_go.is_set():
            return
        if self.experiment_child is not None:  # reap it (it has let go of the experiment: it is ending)
            try:
                self.experiment_child.process.wait(10)
            except subprocess.TimeoutExpired:
                pass
        done = exp.complete()
        self.post_message(self.ExperimentEnded(exp, done))

    @work(thread=True, exclusive=True, exit_on_error=False, group="train", name="train")
    def _experiment(self, exp: Any, todo: list) -> None:
        """The experiment's runs, one after another, each as a run of the app (the dashboard
        shows which of how many); it pauses when one does not complete."""
        from core import experiment as X
        from core.runner import Local

        for i, (strategy, resume) in enumerate(todo, 1):
            cfg = exp.config(strategy)
            run = Local(None if resume else cfg, resume, listeners=[X.Recorder(exp, strategy)])
            run.listeners.append(StatusFeed(self, True))
            live = LiveRun(cfg, run)
            self.call_from_thread(self._begin, live, f"(experiment {exp.id}: run {i} of {len(todo)}"
                                  + (", resumed" if resume else "") + ")", (i, len(todo)))
            result = self._run_or_report(run)
            if result is None or result.status != ev.COMPLETED:
                self.post_message(self.ExperimentEnded(exp, False))
                return
        self.post_message(self.ExperimentEnded(exp, True))

    def _begin(self, live: LiveRun, where: str, queue: Optional[tuple] = None) -> None:
        """A run of this app begins: it is the live run; the dashboard shows it (UI thread)."""
        self.live = live
        self.dashboard.begin(live.cfg, where=where, queue=queue)
        self.dashboard.show_run(live.run)

    @on(ExperimentEnded)
    def _on_experiment_ended(self, message: ExperimentEnded) -> None:
        exp = message.exp
        exp.release()
        self.experiment = None
        if message.finished:
            self.notify(f"Experiment {exp.id} complete: the comparison of its runs.", timeout=8)
            self._show_experiment(exp)
        else:
            self.notify(f"Experiment {exp.id} paused: continue it from the runs screen (x) or with "
                        f"transferlab experiment --continue {exp.id}", severity="warning", timeout=10)
            self.refresh_runs()

    @work(exclusive=True, group="experiment-show")
    async def _show_experiment(self, exp: Any) -> None:
        """The runs screen with the experiment's runs overlaid, and its comparison."""
        from tui.runs import CompareScreen

        await self.switch_mode("runs")
        runs = self.mode_screen("runs")
        runs.reload()
        runs.select_only(set(exp.runs.values()))
        self.push_screen(CompareScreen(exp.records(), title=f"experiment {exp.id}"))

    @property
    def dashboard(self):
        return self.mode_screen("dashboard")

    @on(RunStatus)
    def _on_run_status(self, message: RunStatus) -> None:
        live, event = self.live, message.event
        if live is None:
            return
        if isinstance(event, ev.RunStarted):
            live.run_id, live.status = event.run_id, "running"
        elif isinstance(event, (ev.RunFinished, ev.RunLost)):
            live.status = event.status
            severity = "information" if event.status == ev.COMPLETED else "warning"
            final = getattr(event, "final_test_acc", None)
            final = "" if final is None else f": final test accuracy {final:.4f}"
            self.notify(f"Run {event.status}{final}", severity=severity if event.status != ev.FAILED else "error")
            self.refresh_runs()
            if self.quit_after_run:
                self.exit()

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
        """A crash in the worker outside the trainer's own handling: show it, keep the app alive.
        (core.runner has marked the run's folder failed.)"""
        from core.errors import one_line

        if event.worker.name == "train" and event.state == WorkerState.ERROR and self.live is not None:
            error = one_line(event.worker.error)
            self.live.status = ev.FAILED
            if self.dashboard is not None:
                self.dashboard.crashed(error)
            self.notify(error, title="The run failed", severity="error", timeout=10)
            self.refresh_runs()
            if self.quit_after_run:
                self.exit(return_code=1)  # the app ends on an error: its exit status says so

    def stop_run(self) -> None:
        if self.running and self.dashboard is not None:
            self.dashboard.action_stop()

    def abort_run(self) -> None:
        if self.running and self.dashboard is not None:
            self.dashboard.action_abort()

    def refresh_runs(self) -> None:
        runs = self.mode_screen("runs")
        if runs is not None:
            runs.reload()

    async def edit_config(self, cfg: RunConfig) -> None:
        """Back to the form, filled with `cfg`, to tweak and run again."""
        await self.switch_mode("form")
        self.mode_screen("form").load_config(cfg, note="Loaded the settings of the run: tweak and start again.")

    async def action_quit(self) -> None:
        if not self.running or not self.live.run.here:  # a run in its own process goes on by itself
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
        for name, help, callback in getattr(screen, "palette_commands", list)():  # the dashboard's plots
            yield SystemCommand(name, help, callback)
        if isinstance(screen, ModalScreen):  # a dialog or the LR finder: what it offers, not the screens' actions
            return
        form = self.mode_screen("form")
        if not self.running and form is not None and form.valid_config() is not None:
            yield SystemCommand("Start run", "Train with the settings in the form", form.action_start)
        if not self.running and form is not None and form.valid_config() is not None:
            yield SystemCommand("Run experiment", "The form's settings with several strategies, then the comparison",
                                form.action_experiment)
        if form is not None and form.valid_config() is not None:
            yield SystemCommand("LR finder", "Sweep the learning rate on a copy of the model; suggest one",
                                self._lr_find)
        if self.running:
            yield SystemCommand("Stop run", "Finish this step, save a checkpoint, stop", self.stop_run)
            yield SystemCommand("Abort run", "End the run at once (asks first)", self.abort_run)
            if self.dashboard is not None:
                yield SystemCommand("More epochs", "One epoch more, from the next epoch boundary (+)",
                                    self.dashboard.action_more_epochs)
                yield SystemCommand("Fewer epochs", "One epoch fewer, from the next epoch boundary (-)",
                                    self.dashboard.action_fewer_epochs)
                yield SystemCommand("Scale learning rates", "By a factor, from the next epoch boundary (L)",
                                    self.dashboard.action_scale_lr)
                if self.dashboard.check_action("unfreeze", ()):
                    yield SystemCommand("Unfreeze the backbone", "It trains too from the next epoch (u)",
                                        self.dashboard.action_unfreeze)
        runs = self.mode_screen("runs")
        if not self.running and runs is not None and runs.current() is not None \
                and runs.current().run_id in runs.experiments:
            yield SystemCommand("Experiment of this run", "Compare its runs, or continue it if it paused",
                                runs.action_experiment)
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

    async def _lr_find(self) -> None:
        await self.switch_mode("form")
        self.mode_screen("form").action_lr_find()

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
    app._letting_go.set()
    live = app.live
    if app.experiment is not None and app.experiment_elsewhere:  # its own process: let go of it, say where
        if live is not None:
            live.run.close()
        if not app.lost_terminal:
            print(experiment_background_note(app.experiment, app.experiment_child), file=sys.stderr, flush=True)
        return app.return_code or 0
    if live is not None and not live.run.here:  # its own process: let go of it, say where it is
        live.run.close()
        if live.status in ("starting", "running") and not app.lost_terminal:
            print(background_note(live.run, app.runs_dir), file=sys.stderr, flush=True)
        return app.return_code or 0
    if live is None or live.done.is_set() or live.status not in ("starting", "running"):
        return app.return_code or 0
    if app.return_code:  # the interface failed: stop the run, with a checkpoint, saying why
        live.run.stop("the interface ended on an error (its traceback is in the terminal)")
    elif not app.lost_terminal:
        folder = live.run.run_dir or app.runs_dir
        print(f"TransferLab: the run goes on in this process (pid {os.getpid()}) until it ends; closing "
              f"this terminal does not stop it. It is recorded in {folder}; `transferlab runs --runs-dir "
              f"{shlex.quote(str(app.runs_dir))}` shows it. Ctrl-C here stops it (saving a checkpoint), twice "
              "aborts it." + experiment_note(app), file=sys.stderr, flush=True)
    if live.run.run_dir:
        redirect_output(os.path.join(live.run.run_dir, "output.log"))
    else:
        redirect_output(os.devnull)
    presses = []

    def interrupted() -> None:  # Ctrl-C or SIGTERM while the run goes on headless
        presses.append(1)
        live.run.stop() if len(presses) == 1 else live.run.abort()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted)
    await loop.run_in_executor(None, live.done.wait)
    if app.return_code:
        return app.return_code
    return EXIT_CODES.get(live.result.status, 1) if live.result else 1


def _changed_since(run_dir: Path, since: float) -> bool:
    """The run's metrics were written after `since` (a run that started and ended between two looks)."""
    try:
        return (run_dir / "metrics.jsonl").stat().st_mtime >= since
    except OSError:
        return False


def experiment_note(app: "TransferLabApp") -> str:
    """When the interface ends in the middle of an experiment: only the current run goes on."""
    exp = app.experiment
    if exp is None:
        return ""
    return (f" Experiment {exp.id} pauses after this run: continue it with transferlab experiment --continue "
            f"{shlex.quote(exp.id)} --runs-dir {shlex.quote(str(exp.runs_dir))}")


def experiment_background_note(exp: Any, child: Any) -> str:
    """What the terminal says when the interface ends while an experiment trains in its own process."""
    ref = f"{shlex.quote(exp.id)} --runs-dir {shlex.quote(str(exp.runs_dir))}"
    pid = f" (pid {child.process.pid})" if child is not None else ""
    return (f"TransferLab: experiment {exp.id} goes on in the background{pid}. Watch it: transferlab attach {ref}; "
            f"stop it: transferlab stop {ref} (it pauses; continue it with transferlab experiment --continue {ref}).")


def background_note(run: Any, runs_dir: str) -> str:
    """What the terminal says when the interface ends while its run trains in its own process."""
    if run.run_dir is None:
        return (f"TransferLab: the run is still starting in the background (pid {run.pid}); "
                f"`transferlab runs --runs-dir {runs_dir}` shows it once it has started.")
    name, where = shlex.quote(run.run_dir.name), shlex.quote(str(run.run_dir.parent))
    return (f"TransferLab: run {run.run_dir.name} goes on in the background (pid {run.pid}). Watch it: "
            f"transferlab attach {name} --runs-dir {where}; stop it: transferlab stop {name} --runs-dir {where}.")


def exit_when_the_run_ends(app: "TransferLabApp", grace: float = 5.0) -> None:
    """After a hangup: a watchdog thread ends the process `grace` seconds after the run has
    ended (at once if there is none), whatever the main thread is stuck in. With the terminal
    gone, a Textual thread or the event loop's shutdown could otherwise wait on it forever (seen
    in CI: the run completed, the process stayed)."""
    from core.cli import EXIT_CODES

    def watch() -> None:
        live = app.live
        if live is not None:
            if not live.run.here:
                live.run.close()  # its own process: nothing here to wait for
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
