"""The run dashboard: live plots, progress with ETA, learning rates, images/s and a log.

It shows a core.runner.Run, and does not know where that run trains: in a thread of this process,
in a background process, in another terminal or on another host. `show_run(run)` adds a feed to the
run's listeners (called in whatever thread runs it: steps wait in a deque drained every 0.1 s,
other events are posted at once); `s` / `a` call run.stop() / run.abort() (off the UI thread:
for a run elsewhere they write a file). The app's dashboard (a mode) shows the run the app
started, which the app runs in its worker; a dashboard opened on a running run of the runs screen
(`DashboardScreen(run=core.runner.attach(folder))`) runs the follower itself, in a worker, and
lets go of it when it is closed.

The same screen replays a finished run: from its folder (`DashboardScreen(run_dir=...)`, whose
metrics.jsonl is read and parsed in a thread, never on the UI thread: 20,000 steps take ~0.2 s),
or from events already in memory (`DashboardScreen(events=...)`). Either way the events are
applied in one pass: the steps between two epoch events go to the plot in one call.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import replace
from itertools import groupby
from pathlib import Path
from typing import Any, Deque, Iterable, List, Optional

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Header, Label, ProgressBar, RichLog, Static

from core import events as ev
from core.report import fmt_duration
from core.config import RunConfig, from_mapping
from core.plotdata import CURVES, EpochPoint, PlotControls, x_label
from core.store import read_events
from tui.dialogs import ConfirmScreen, CurvesScreen, PathScreen
from tui.insight import InsightScreen
from tui.keybar import KeyBar
from tui.machine import MachinePanel, MachineUpdate
from tui.plots import (CONTROL_KEYS, AccuracyPlot, LossPlot, LrPlot, PlotControlsMixin, palette_commands,
                       spare_bindings)


class RunEvent(Message):
    """A non-step event of a watched run (posted from the thread that runs it)."""

    def __init__(self, event: ev.Event) -> None:
        super().__init__()
        self.event = event


class RunHistory(Message):
    """What a watched run recorded before it was taken up (a resumed run, a run attached midway)."""

    def __init__(self, events: List[ev.Event]) -> None:
        super().__init__()
        self.events = events


class RunFeed:
    """A core listener (and history callback) of a Run, called in the thread that runs it. Step
    events wait in a deque for the screen to drain; every other event is posted to `target` at
    once, never coalesced."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.steps: Deque[ev.StepEnded] = deque()

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.StepEnded):
            self.steps.append(event)
        else:
            self.target.post_message(RunEvent(event))

    def history(self, events: List[ev.Event]) -> None:
        self.target.post_message(RunHistory(events))

    def drain(self) -> List[ev.StepEnded]:
        out = []
        while self.steps:
            out.append(self.steps.popleft())
        return out


PLOT_KEYS = CONTROL_KEYS[:1] + (
    ("c", "curves", "Curves", "Which curves are drawn (loss raw, smoothed, test, accuracy...)"),
) + CONTROL_KEYS[1:] + (
    ("P", "export_plots", "Plots export", "The plots as shown, as SVG and PNG in RUN/exports"),
    ("C", "export_csv", "CSV export", "The run's metrics as CSV in RUN/exports"),
)
"""The plot controls and exports (tui.plots.CONTROL_KEYS), in the order they leave the key bar
when it has no room for them (last first)."""


class DashboardScreen(PlotControlsMixin, Screen):
    """Loss per step and accuracy per epoch of one run, live or replayed."""

    BINDINGS = [
        Binding("s", "stop", "Stop (save)"),
        Binding("a", "abort", "Abort"),
        Binding("e", "edit", "Edit & rerun"),
        Binding("r", "toggle_raw", "Raw loss"),
        Binding("l", "toggle_lr", "LR / loss plot"),
        Binding("h", "half_batch", "Half batch"),
        Binding("i", "insight", "Classes"),
        Binding("plus", "more_epochs", "More epochs", show=False),
        Binding("minus", "fewer_epochs", "Fewer epochs", show=False),
        Binding("L", "scale_lr", "Scale LR", show=False),
        Binding("u", "unfreeze", "Unfreeze now", show=False),
        Binding("escape", "back", "Back", show=False),
        *spare_bindings(PLOT_KEYS),
    ]

    class EventsRead(Message):
        """A replayed run's events, read off the UI thread (or why they could not be read)."""

        def __init__(self, events: List[ev.Event], error: str = "") -> None:
            super().__init__()
            self.events = events
            self.error = error

    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    """The machine panel: one line below 120 columns, a column beside the plots from 120."""

    def __init__(self, events: Iterable[ev.Event] = (), run_dir: Optional[Path] = None, run: Any = None) -> None:
        super().__init__()
        self.sampler: Any = None
        """The core.machine.Sampler of the run shown, while it runs (a replay shows what was recorded)."""
        self._machine_shown: Optional[tuple] = None
        self.replay = list(events)
        self.run_dir = run_dir
        self.pushed = bool(self.replay) or run_dir is not None or run is not None
        """Opened over the runs screen (escape closes it), not the app's dashboard mode."""
        self.run: Any = None
        """The core.runner.Run shown, when there is one (not a replay)."""
        self._followed = run
        self.feed: Optional[RunFeed] = None
        self._loading = False
        """An attached run's first events are awaited ("loading..." on the plot)."""
        self.reset_state()

    def reset_state(self) -> None:
        self.cfg: Optional[RunConfig] = None
        self.started: Optional[ev.RunStarted] = None
        self.status = "idle"
        self.epochs = 0
        self.last_step: Optional[ev.StepEnded] = None
        self.t0 = time.monotonic()
        self.results: List[ev.EpochEnded] = []
        self.resumed_from = 0
        """The global step a resumed run continued from (the ETA counts the steps since)."""
        self.asked_epochs = 0
        """The epochs last asked for with + / - (0: none asked)."""
        self.out_of_memory = False
        """The run failed for want of memory (`h` offers half the batch)."""
        self.queue: Optional[tuple] = None
        """(i, n) while the run is run i of an experiment's n (the ETA then covers them all)."""
        self.class_results: Optional[ev.ClassResults] = None
        """The latest epoch's per-class results (`i` shows them)."""
        self.insight: Optional[InsightScreen] = None
        """The per-class screen opened from here, fed as the run evaluates."""

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="dash"):
            yield Static("No run yet: press F1 for the form and ctrl+r to start one.", id="summary")
            with Horizontal(id="plots"):
                yield LossPlot(id="loss")
                yield LrPlot(id="lr")  # in the loss plot's place while `l` shows it
                yield AccuracyPlot(id="acc")
                yield MachinePanel(id="machine")
            with Horizontal(classes="bar-row"):
                yield Label("epoch -/-", id="epoch-label")
                # total=1, not None: an empty bar, not the indeterminate one (which redraws 15x a second)
                yield ProgressBar(1, id="epoch-bar", show_eta=False, show_percentage=False)
                yield Label("step -/-", id="step-label")
                yield ProgressBar(1, id="step-bar", show_eta=False, show_percentage=False)
            yield MachinePanel(compact=True, id="machine-line")
            yield Static("", id="stats")
            yield RichLog(id="log", wrap=True, markup=True, max_lines=1000)
        yield KeyBar()

    def on_mount(self) -> None:
        self.add_class("-no-machine")
        self.sub_title = "dashboard" if not self.pushed else "run (attached)" if self._followed else "run (replay)"
        if self._followed is not None:
            self.query_one("#summary", Static).update(f"loading {escape(str(self._followed.run_dir))}...")
            self.query_one(LossPlot).set_note("loading...")
            self._loading = True
            self.show_run(self._followed)
            self._drive(self._followed)
        elif self.run_dir is not None:
            self.query_one("#summary", Static).update(f"loading {escape(str(self.run_dir))}...")
            self.query_one(LossPlot).set_note("loading...")
            self._read_events(self.run_dir)
        self.set_controls(self.app.plot_controls)
        self.apply_all(self.replay)
        self.set_interval(1.0, self._update_stats)
        self.set_interval(0.1, self.drain_steps)

    def on_unmount(self) -> None:
        self._stop_sampling()
        if self._followed is not None:
            self._followed.close()  # the follower ends; the run goes on wherever it trains

    def show_run(self, run: Any) -> None:
        """Show `run` from now on: its history, then its events as they come."""
        if self.run is not None and self.feed is not None:  # a run shown before: no longer fed
            self.run.listeners.remove(self.feed)
            self.run.history.remove(self.feed.history)
        self.run, self.feed = run, RunFeed(self)
        run.listeners.append(self.feed)
        run.history.append(self.feed.history)
        self._sample_machine(run)
        if not self.pushed:
            self.sub_title = "dashboard" if run.here else "dashboard (run in another process)"

    @work(thread=True, exclusive=True, exit_on_error=False, group="follow")
    def _drive(self, run: Any) -> None:
        """Follow an attached run until it ends or the screen goes (on_unmount lets go of it)."""
        try:
            run.run()
        except Exception as exc:  # an unreadable folder is a line in the log, not a crash
            self.app.call_from_thread(self.log_line, f"[red]cannot follow the run: {escape(str(exc))}[/red]")

    def drain_steps(self) -> None:
        if self.feed is not None and self.feed.steps:
            self.apply_steps(self.feed.drain())
            self._loaded()

    def _loaded(self) -> None:
        """The first events of an attached run are in: drawn at once, not at the next redraw."""
        if self._loading:
            self._loading = False
            self.query_one(LossPlot).set_note("")
            self.query_one(LossPlot).redraw_now()

    @on(RunEvent)
    def _on_run_event(self, message: RunEvent) -> None:
        self.drain_steps()
        self.apply(message.event)
        self._loaded()

    # -- the machine panel ------------------------------------------------------------------------

    def _sample_machine(self, run: Any) -> None:
        """Sample the machine that trains `run` once a second, in a thread of its own (never here)."""
        from core.machine import LIVE_SECONDS, Sampler

        self._stop_sampling()
        post = self.post_message  # thread-safe

        def sampled(sample: ev.MachineSampled, gpu_note: str) -> None:
            post(MachineUpdate(sampler, sample, gpu_note))

        sampler = self.sampler = Sampler(sampled, LIVE_SECONDS, run.machine_pid).start()

    def _stop_sampling(self, ended: bool = False) -> None:
        """No more live samples (the thread ends by itself); `ended`: the run did, the last
        sample stays, marked as such."""
        if self.sampler is None:
            return
        self.sampler.stop()
        self.sampler = None
        if ended and self._machine_shown is not None:
            self._show_machine(self._machine_shown[0], "at the end", self._machine_shown[1])

    def _show_machine(self, sample: ev.MachineSampled, how: str, gpu_note: str = "") -> None:
        self._machine_shown = (sample, gpu_note)
        self.remove_class("-no-machine")
        for panel in self.query(MachinePanel):
            panel.show(sample, how, gpu_note)

    @on(MachineUpdate)
    def _on_machine_update(self, message: MachineUpdate) -> None:
        if message.sampler is self.sampler:  # (not one stopped meanwhile)
            self._show_machine(message.sample, "live", message.gpu_note)

    @on(RunHistory)
    def _on_run_history(self, message: RunHistory) -> None:
        self.apply_all(message.events)
        self._loaded()

    @work(thread=True, exclusive=True, exit_on_error=False, group="replay")
    def _read_events(self, run_dir: Path) -> None:
        try:
            events = ev.as_one_run(read_events(run_dir))
        except Exception as exc:  # an unreadable file is a message on the screen, not a crash
            self.post_message(self.EventsRead([], f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(self.EventsRead(events))

    @on(EventsRead)
    def _events_read(self, message: EventsRead) -> None:
        self.query_one(LossPlot).set_note("")
        if message.error:
            self.query_one("#summary", Static).update(f"[b red]unreadable run[/b red]: {escape(message.error)}")
            self.log_line(f"[red]metrics of {escape(str(self.run_dir))} unreadable: {escape(message.error)}[/red]")
        elif not message.events:
            self.query_one("#summary", Static).update(f"no events recorded in {escape(str(self.run_dir))}")
        self.apply_all(message.events)
        self.query_one(LossPlot).redraw_now()

    # -- state updates (UI thread only) -----------------------------------------------------------

    def begin(self, cfg: RunConfig, where: str = "", queue: Optional[tuple] = None) -> None:
        """A new live run was requested: clear everything and say what is happening (`where`:
        e.g. "in the background on 2 processes"; `queue`: (i, n), run i of an experiment's n)."""
        self.reset_state()
        self.queue = queue
        self.cfg, self.status, self.epochs = cfg, "starting", cfg.epochs
        self.query_one(LossPlot).reset()
        self.query_one(LrPlot).reset()
        self.query_one(AccuracyPlot).reset()
        self.query_one("#log", RichLog).clear()
        self.query_one("#epoch-bar", ProgressBar).update(total=cfg.epochs, progress=0)
        self.query_one("#step-bar", ProgressBar).update(total=None, progress=0)
        self.query_one("#summary", Static).update(
            f"[b]starting[/b] {cfg.strategy} {cfg.backbone} on {cfg.dataset}{' ' + where if where else ''}: "
            "loading data and model...")
        self.log_line(escape(f"Starting {cfg.strategy} on {cfg.dataset} ({cfg.epochs} epochs, lr {cfg.lr:g})"
                             + (f" {where}" if where else "") + "."))

    def could_not_start(self, error: str) -> None:
        self.status = "not started"
        self.query_one("#step-bar", ProgressBar).update(total=1, progress=0)
        self.query_one("#summary", Static).update(f"[b red]could not start[/b red]: {escape(error)}")
        self.log_line(f"[red]{escape(error)}[/red]")
        self.log_line("Press F1 (or e) to change the settings and start again.")

    def crashed(self, error: str) -> None:
        """The run's worker died of an error that the trainer did not handle."""
        self.status = ev.FAILED
        self._stop_sampling(ended=True)
        self.refresh_bindings()
        self.log_line(f"[b red]failed[/b red]: {escape(error)}")
        self._update_stats()

    def log_line(self, text: str) -> None:
        self.query_one("#log", RichLog).write(text)

    def apply_all(self, events: Iterable[ev.Event]) -> None:
        """Replay recorded events in one pass: each run of steps at once, other events in order
        (per step, the widget updates cost ~0.3 ms: 6.6 s of frozen UI for 20,000 steps)."""
        for is_step, group in groupby(events, key=lambda event: isinstance(event, ev.StepEnded)):
            if is_step:
                self.apply_steps(list(group))
            else:
                for event in group:
                    self.apply(event)

    def apply_steps(self, steps: List[ev.StepEnded]) -> None:
        if not steps:
            return
        self.query_one(LossPlot).extend("run", [s.global_step for s in steps], [s.loss for s in steps])
        self.query_one(LrPlot).extend([s.global_step for s in steps], [s.lrs for s in steps])
        self.last_step = steps[-1]
        total = self.started.steps_per_epoch if self.started else None
        self.query_one("#step-bar", ProgressBar).update(total=total, progress=self.last_step.step)
        self.query_one("#epoch-bar", ProgressBar).update(progress=self.last_step.epoch - 1 + (
            self.last_step.step / total if total else 0))
        self._update_stats()

    def apply(self, event: ev.Event) -> None:
        if isinstance(event, ev.RunStarted):
            self.started, self.status, self.t0 = event, "running", time.monotonic()
            if self.run is not None and self.run.started is not None:  # an ETA over the whole run
                self.t0 -= max(0.0, time.time() - self.run.started)
            self.cfg = from_mapping(event.config)
            self.epochs = self.cfg.epochs
            c = self.cfg
            own = c.strategy == "discriminative" or (c.strategy == "frozen" and c.unfreeze_epoch)
            lrs = (f"lr {c.lr:g}" + (f", backbone lr {c.lr_backbone:g}" if own else "")
                   + (f" {c.schedule}" if c.schedule != "constant" else ""))
            self.query_one("#summary", Static).update(  # names and paths from settings: never markup
                f"[b]{c.strategy}[/b] · {escape(f'{c.backbone} ({c.pretrained}) · {c.dataset}')} "
                f"{event.train_size}/{event.test_size} · {c.image_size}px · {lrs} · batch {c.batch_size}\n"
                f"[b]{escape(event.device)}[/b] · trainable {event.trainable_params:,}/{event.total_params:,} · "
                f"{escape(event.run_dir)}")
            self.query_one("#epoch-bar", ProgressBar).update(total=self.epochs, progress=0)
            self.query_one("#step-bar", ProgressBar).update(total=event.steps_per_epoch, progress=0)
            self.query_one(LossPlot).set_steps_per_epoch("run", event.steps_per_epoch)
            self.query_one(LrPlot).set_steps_per_epoch(event.steps_per_epoch)
            for note in event.notes:
                self.log_line(f"[yellow]note:[/yellow] {escape(note)}")
            self.log_line(escape(f"Run {event.run_id} started on {event.device}."))
            if self.run is not None:
                self.log_line("[dim]While it trains: + / - more or fewer epochs, L scales the learning rates"
                              + (", u unfreezes the backbone" if self.cfg.strategy == "frozen" else "")
                              + " (applied at the next epoch boundary).[/dim]")
            self.refresh_bindings()
        elif isinstance(event, ev.EpochEnded):
            self.results.append(event)
            acc = self.query_one(AccuracyPlot)
            acc.add("train", event.epoch, event.train_acc)
            acc.add("test", event.epoch, event.test_acc)
            per_epoch = self.started.steps_per_epoch if self.started else 0
            self.query_one(LossPlot).add_epoch("run", EpochPoint(
                event.epoch, self.last_step.global_step if self.last_step else event.epoch * per_epoch,
                event.train_loss, event.test_loss, event.train_acc, event.test_acc))
            self.query_one("#epoch-bar", ProgressBar).update(progress=event.epoch)
            self.log_line(escape(ev.epoch_summary(event, self.epochs)))
        elif isinstance(event, ev.RunResumed):
            self.status, self.epochs, self.resumed_from = "running", event.epochs, event.global_step
            self.query_one("#epoch-bar", ProgressBar).update(total=event.epochs)
            self.log_line(f"[b]Resumed[/b] at epoch {event.epoch} step {event.step} (global step "
                          f"{event.global_step}), to {event.epochs} epochs.")
        elif isinstance(event, ev.RunLost):
            self.status = event.status
            self._stop_sampling(ended=True)
            self.refresh_bindings()
            self.log_line(f"[b red]{escape(event.status)}[/b red]: the run no longer trains (its process is gone "
                          "or stopped beating)" + (f": {escape(event.message)}" if event.message else ""))
        elif isinstance(event, ev.SettingsChanged):
            self.cfg = from_mapping(event.config)
            self.epochs = self.cfg.epochs
            self.asked_epochs = 0  # taken (or refused): + / - count from the run's epochs again
            self.query_one("#epoch-bar", ProgressBar).update(total=self.epochs)
            self.log_line(f"[b]after epoch {event.epoch}[/b]: {escape(event.summary)}")
        elif isinstance(event, ev.ClassResults):
            self.class_results = event
            if self.insight is not None and self.insight.is_attached:
                self.insight.show_results(event)
        elif isinstance(event, ev.CheckpointSaved):
            self.log_line(f"[dim]checkpoint {event.kind} saved (epoch {event.epoch})[/dim]")
        elif isinstance(event, ev.MachineSampled):
            if self.sampler is None:  # a replay: what the run recorded (a live run has fresher figures)
                self._show_machine(event, "recorded")
        elif isinstance(event, ev.RunFinished):
            self.status = event.status
            self._stop_sampling(ended=True)
            self.out_of_memory = event.status == ev.FAILED and event.message.startswith("out of memory")
            self.refresh_bindings()
            colour = ev.STATUS_COLOURS[event.status]
            self.log_line(f"[b {colour}]{escape(ev.finish_summary(event))}[/]")
            if self.out_of_memory and self.check_action("half_batch", ()):
                self.log_line("Press [b]h[/b] to run it again with half the batch and the learning rate scaled.")
        self._update_stats()

    def _update_stats(self) -> None:
        step = self.last_step
        current = step.epoch if step else 0
        self.query_one("#epoch-label", Label).update(f"epoch {current}/{self.epochs or '-'} ")
        per_epoch = self.started.steps_per_epoch if self.started else "-"
        self.query_one("#step-label", Label).update(f" step {step.step if step else 0}/{per_epoch} ")
        parts = [f"status [b]{self.status}[/b]"]
        if step is not None:
            lrs = " ".join(f"{k} {v:g}" for k, v in step.lrs.items())
            parts += [f"epoch {step.epoch}/{self.epochs} step {step.step}"
                      + (f"/{self.started.steps_per_epoch}" if self.started else ""),
                      f"loss {step.loss:.4f}", f"lr {lrs}", f"{step.images_per_sec:.1f} img/s"]
            if self.status == "running" and self.started:
                done = (step.epoch - 1) * self.started.steps_per_epoch + step.step
                total = self.epochs * self.started.steps_per_epoch
                elapsed, here = time.monotonic() - self.t0, done - self.resumed_from
                parts.append(f"ETA {fmt_duration(elapsed / here * (total - done)) if here > 0 else '-'}")
                if self.queue and here > 0:  # the runs to come take as long as this one, all steps of it
                    i, n = self.queue
                    rest = elapsed / here * (total - done) + (n - i) * elapsed / here * total
                    parts.append(f"run {i} of {n}, experiment ETA {fmt_duration(rest)}")
        if self.results:
            parts.append(f"test acc {self.results[-1].test_acc:.4f}")
        self.query_one("#stats", Static).update(" · ".join(parts))

    # -- keys -------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple) -> Optional[bool]:
        if action in ("stop", "abort"):
            return self.run is not None and self.status in ("starting", "running")
        if action == "edit":
            return self.cfg is not None
        if action in ("more_epochs", "fewer_epochs", "scale_lr"):
            return self.run is not None and self.status == "running"
        if action == "unfreeze":
            return self.run is not None and self.status == "running" and self.cfg is not None \
                and self.cfg.strategy == "frozen"
        if action == "half_batch":
            return self.out_of_memory and not self.pushed and self.cfg is not None and self.cfg.batch_size > 1
        return True

    # -- changes at the next epoch boundary ---------------------------------------------------------

    def action_more_epochs(self) -> None:
        self._ask_epochs(+1)

    def action_fewer_epochs(self) -> None:
        self._ask_epochs(-1)

    def _ask_epochs(self, delta: int) -> None:
        if not self.check_action("more_epochs", ()):
            return
        done = self.results[-1].epoch if self.results else 0
        current = self.asked_epochs or self.epochs
        wanted = max(done + 1, current + delta)  # the epoch in progress is always finished
        if wanted == current:
            self.notify(f"The run cannot end before epoch {wanted}: it is training it.", severity="warning")
            return
        self.asked_epochs = wanted
        self._change(epochs=wanted, said=f"{wanted} epochs")

    def action_scale_lr(self) -> None:
        if not self.check_action("scale_lr", ()):
            return

        def chosen(text: Optional[str]) -> None:
            if not text:
                return
            try:
                scale = float(text)
                if not 1e-6 <= scale <= 1e6:
                    raise ValueError
            except ValueError:
                self.notify(f"Not a scale factor: {text!r} (e.g. 0.5 halves the learning rates)", severity="error")
                return
            self._change(lr_scale=scale, said=f"learning rates x{scale:g}")

        self.app.push_screen(PathScreen("Scale the learning rates by (at the next epoch boundary):", "0.5"), chosen)

    def action_unfreeze(self) -> None:
        """A frozen run: the backbone trains too from the next epoch (at the backbone lr)."""
        if self.check_action("unfreeze", ()):
            self._change(unfreeze=True, said="the backbone unfrozen")

    @work(thread=True, exit_on_error=False, group="request")
    def _change(self, said: str, **changes: Any) -> None:
        """Ask the run to change at its next epoch boundary (a file write for a run elsewhere)."""
        from core.store import error_reason

        try:
            self.run.change(**changes)
        except OSError as exc:
            self.app.call_from_thread(self.notify, f"cannot ask the run to change: {error_reason(exc)}",
                                      severity="error")
            return
        self.app.call_from_thread(self.log_line, f"[dim]asked: {escape(said)} from the next epoch boundary[/dim]")

    def action_half_batch(self) -> None:
        """After running out of memory: the same run with half the batch, the learning rates
        scaled the same way (shown before it starts)."""
        from core.trainer import halved

        from core.experiment import of_run

        if not self.check_action("half_batch", ()):
            return
        cfg, smaller = self.cfg, halved(self.cfg)
        # A run of an experiment: its runs are compared only at the same batch, so the experiment
        # starts again, every strategy at the smaller batch (the runs it has stay as they are).
        exp = of_run(Path(self.started.run_dir)) if self.started is not None else None

        async def confirmed(yes: Optional[bool]) -> None:
            if yes and exp is not None:
                # in its runs folder (config): its settings keep the one it was created in, gone if moved
                await self.app.start_experiment(halved(exp.config(exp.strategies[0])), exp.strategies)
            elif yes:
                await self.app.start_run(smaller)

        lrs = f"learning rate {smaller.lr:g} (was {cfg.lr:g})" + (
            f", backbone {smaller.lr_backbone:g} (was {cfg.lr_backbone:g})" if cfg.strategy == "discriminative" else "")
        what = (f"Run experiment {exp.id} ({', '.join(exp.strategies)}) again as a new experiment"
                if exp is not None else "Run again")
        self.app.push_screen(ConfirmScreen(escape(f"{what} with batch size {smaller.batch_size} (was {cfg.batch_size}) "
                                                  f"and {lrs}?"), "Start"), confirmed)

    def action_stop(self) -> None:
        if self.check_action("stop", ()):
            self.request("stop")
            self.notify("Stopping after the current step; a checkpoint will be saved.")

    def action_abort(self) -> None:
        def confirmed(yes: Optional[bool]) -> None:
            if yes and self.check_action("abort", ()):
                self.request("abort")
                self.notify("Aborting the run.", severity="warning")

        if self.check_action("abort", ()):
            self.app.push_screen(ConfirmScreen("Abort the run now? No checkpoint is saved.", "Abort"), confirmed)

    @work(thread=True, exit_on_error=False, group="request")
    def request(self, action: str) -> None:
        """Ask the run to stop or abort (for a run elsewhere, a file write: never on the UI thread)."""
        from core.store import error_reason

        try:
            self.run.stop() if action == "stop" else self.run.abort()
        except OSError as exc:
            self.app.call_from_thread(self.notify, f"cannot ask the run to {action}: {error_reason(exc)}",
                                      severity="error")

    async def action_edit(self) -> None:
        if self.cfg is not None:
            await self.app.edit_config(self.cfg)

    def action_toggle_raw(self) -> None:
        self.change_controls(self.controls.toggled("raw"))

    # -- plot controls and exports ------------------------------------------------------------------

    @property
    def controls(self) -> PlotControls:
        return self.query_one(LossPlot).controls

    def action_curves(self) -> None:
        def chosen(hidden: Optional[frozenset]) -> None:
            if hidden is not None:
                self.change_controls(replace(self.controls, hidden=hidden))

        self.app.push_screen(CurvesScreen(CURVES, self.controls.hidden), chosen)

    def palette_commands(self) -> List[tuple]:
        """(name, help, callback) of the plot controls and exports, for the command palette."""
        return palette_commands(self, PLOT_KEYS)

    def export_folder(self) -> Optional[Path]:
        """The folder of the run shown (its exports go into its exports/), when there is one."""
        if self.run_dir is not None:
            return Path(self.run_dir)
        if self._followed is not None:  # (the folder as found here, whatever its trainer called it)
            return Path(self._followed.run_dir)
        if self.started is not None:
            return Path(self.started.run_dir)
        return None

    def action_export_plots(self) -> None:
        """The plots as shown (controls applied) into RUN/exports, as SVG and PNG; drawn in a thread
        from a copy of what the plots hold."""
        from core.plots_export import accuracy_panel, loss_panel, lr_panel

        folder = self.export_folder()
        if folder is None:
            self.notify("No run shown yet: nothing to export.", severity="warning")
            return
        loss, lr, acc = self.query_one(LossPlot), self.query_one(LrPlot), self.query_one(AccuracyPlot)
        controls, right = self.controls, accuracy_panel(acc.heading(), {
            name: (list(xs), list(ys)) for name, (xs, ys) in acc.shown().items()})
        if lr.display:
            left = lr_panel(lr.heading(), x_label(controls, lr.steps_per_epoch),
                            {k: (list(xs), list(ys)) for k, (xs, ys) in lr.curves().items()}, controls)
            self._export(folder, "plots", lambda: [left, right])
        else:  # the steps copied here, reduced and drawn in the thread
            run, title = loss.run("run").snapshot(), loss.heading()
            self._export(folder, "plots", lambda: [loss_panel(title, run, controls), right])

    def action_export_csv(self) -> None:
        """The run's metrics as CSV into RUN/exports: the file `transferlab export RUN --csv` writes."""
        folder = self.export_folder()
        if folder is None:
            self.notify("No run shown yet: nothing to export.", severity="warning")
            return
        self._export(folder, "metrics", None)

    @work(thread=True, exit_on_error=False, group="export")
    def _export(self, folder: Path, stem: str, panels: Any) -> None:
        """Write an export (panels: a function giving the plots' panels; None: the metrics CSV)
        and say where in a toast, or why not in one line."""
        from core.errors import one_line
        from core.store import error_reason

        try:
            if panels is None:
                from core.export import write_metrics_csv
                from core.plots_export import new_export_path

                path = new_export_path(folder, stem, (".csv",))
                path = path.with_name(path.name + ".csv")
                write_metrics_csv(folder, path)
                written = [path]
            else:
                from core.plots_export import export_plots

                written = export_plots(folder, panels())
        except OSError as exc:
            self.app.call_from_thread(self.notify, f"Export failed: {error_reason(exc)} ({folder / 'exports'})",
                                      severity="error", markup=False)
            return
        except Exception as exc:  # a bad metrics file, a picture matplotlib cannot draw: a line, not a crash
            self.app.call_from_thread(self.notify, f"Export failed: {one_line(exc)}", severity="error",
                                      markup=False)
            return
        self.app.call_from_thread(self.notify, "\n".join(map(str, written)), title="Exported", markup=False,
                                  timeout=10)

    def action_toggle_lr(self) -> None:
        """Show the learning rate per step in the loss plot's place, or the loss again."""
        loss, lr = self.query_one(LossPlot), self.query_one(LrPlot)
        loss.display, lr.display = not loss.display, loss.display
        (lr if lr.display else loss).redraw_now()

    def action_insight(self) -> None:
        """The per-class results of the run shown (its latest epoch; updated as it evaluates)."""
        run_dir = self.run_dir or (self.run.run_dir if self.run is not None else None)
        if run_dir is None and self.started is not None:
            run_dir = Path(self.started.run_dir)
        if run_dir is None:
            self.notify("No run shown yet: start one (F1) or open one (F3).", severity="warning")
            return
        self.insight = InsightScreen(run_dir, self.class_results, live=self.status in ("starting", "running"))
        self.app.push_screen(self.insight)

    def action_back(self) -> None:
        if self.pushed:
            self.dismiss()
