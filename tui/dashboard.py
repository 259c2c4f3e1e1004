"""The run dashboard: live plots, progress with ETA, learning rates, images/s and a log.

The same screen attaches to a run trained by another process (`DashboardScreen(run_dir=...,
follow=True)`): a thread worker follows its metrics.jsonl as it grows (core.live.MetricsFollower)
and posts what is new; `s` / `a` write a control request in its folder (core.live.request).

The same screen replays a finished run: from its folder (`DashboardScreen(run_dir=...)`, whose
metrics.jsonl is read and parsed in a thread, never on the UI thread: 20,000 steps take ~0.2 s),
or from events already in memory (`DashboardScreen(events=...)`). Either way the events are
applied in one pass: the steps between two epoch events go to the plot in one call.
"""
from __future__ import annotations

import time
from itertools import groupby
from pathlib import Path
from typing import Iterable, List, Optional

from rich.markup import escape
from textual import on, work
from textual.worker import get_current_worker
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Header, Label, ProgressBar, RichLog, Static

from core import events as ev
from core.report import fmt_duration
from core.config import RunConfig, from_mapping
from core.store import read_events
from tui.dialogs import ConfirmScreen
from tui.keybar import KeyBar
from tui.plots import AccuracyPlot, LossPlot


FOLLOW_SECONDS = 0.25
"""An attached run's metrics.jsonl is read this often (a read of what is new costs ~0.1 ms)."""
FOLLOW_STATUS_SECONDS = 2.0
"""An attached run's status (summary, heartbeat) is checked this often: a run killed without a
RunFinished line is seen to end."""


class DashboardScreen(Screen):
    """Loss per step and accuracy per epoch of one run, live or replayed."""

    BINDINGS = [
        Binding("s", "stop", "Stop (save)"),
        Binding("a", "abort", "Abort"),
        Binding("e", "edit", "Edit & rerun"),
        Binding("r", "toggle_raw", "Raw loss"),
        Binding("escape", "back", "Back", show=False),
    ]

    class Followed(Message):
        """New events of an attached run (read off the UI thread); `ended`: the status of a run
        that no longer trains (it ended, or its process is gone), else ""."""

        def __init__(self, events: List[ev.Event], first: bool, started: Optional[float], ended: str) -> None:
            super().__init__()
            self.events, self.first, self.started, self.ended = events, first, started, ended

    class EventsRead(Message):
        """A replayed run's events, read off the UI thread (or why they could not be read)."""

        def __init__(self, events: List[ev.Event], error: str = "") -> None:
            super().__init__()
            self.events = events
            self.error = error

    def __init__(self, events: Iterable[ev.Event] = (), live: bool = True,
                 run_dir: Optional[Path] = None, follow: bool = False) -> None:
        super().__init__()
        self.replay = list(events)
        self.run_dir = run_dir
        self.live = live and not self.replay and run_dir is None
        self.follow = follow and run_dir is not None
        """Attached to a run trained by another process."""
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

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="dash"):
            yield Static("No run yet: press F1 for the form and ctrl+r to start one.", id="summary")
            with Horizontal(id="plots"):
                yield LossPlot(id="loss")
                yield AccuracyPlot(id="acc")
            with Horizontal(classes="bar-row"):
                yield Label("epoch -/-", id="epoch-label")
                # total=1, not None: an empty bar, not the indeterminate one (which redraws 15x a second)
                yield ProgressBar(1, id="epoch-bar", show_eta=False, show_percentage=False)
                yield Label("step -/-", id="step-label")
                yield ProgressBar(1, id="step-bar", show_eta=False, show_percentage=False)
            yield Static("", id="stats")
            yield RichLog(id="log", wrap=True, markup=True, max_lines=1000)
        yield KeyBar()

    def on_mount(self) -> None:
        self.sub_title = "dashboard" if self.live else "run (attached)" if self.follow else "run (replay)"
        if self.run_dir is not None:
            self.query_one("#summary", Static).update(f"loading {escape(str(self.run_dir))}...")
            self.query_one(LossPlot).set_note("loading...")
            if self.follow:
                self._follow(self.run_dir)
            else:
                self._read_events(self.run_dir)
        self.apply_all(self.replay)
        self.set_interval(1.0, self._update_stats)

    @work(thread=True, exclusive=True, exit_on_error=False, group="replay")
    def _read_events(self, run_dir: Path) -> None:
        try:
            events = ev.as_one_run(read_events(run_dir))
        except Exception as exc:  # an unreadable file is a message on the screen, not a crash
            self.post_message(self.EventsRead([], f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(self.EventsRead(events))

    @work(thread=True, exclusive=True, exit_on_error=False, group="follow")
    def _follow(self, run_dir: Path) -> None:
        """Post the run's new events every FOLLOW_SECONDS until it no longer trains or the screen
        goes (the worker is cancelled); its status is checked every FOLLOW_STATUS_SECONDS."""
        from core.live import MetricsFollower
        from core.store import read_run

        worker = get_current_worker()
        follower = MetricsFollower(run_dir)
        started = read_run(run_dir).summary["started"]
        first, checked = True, time.monotonic()
        while not worker.is_cancelled:
            events, ended = follower.read(), ""
            finished = [e for e in events if isinstance(e, ev.RunFinished)]
            if finished:
                ended = finished[-1].status
            elif time.monotonic() - checked >= FOLLOW_STATUS_SECONDS and not follower.behind:
                checked = time.monotonic()
                status = read_run(run_dir).summary["status"]
                events += follower.read()  # what it wrote before it ended
                ended = "" if status == "running" else status
            if events or first or ended:
                self.post_message(self.Followed(events, first, started, ended))
            first = False
            if ended:
                return
            if not follower.behind:
                worker.cancelled_event.wait(FOLLOW_SECONDS)

    @on(Followed)
    def _followed(self, message: Followed) -> None:
        if message.first:
            self.query_one(LossPlot).set_note("")
        self.apply_all(message.events)
        if message.first and message.started is not None:
            self.t0 = time.monotonic() - max(0.0, time.time() - message.started)  # ETA over the whole run
        if message.ended and self.status == "running":  # gone without a RunFinished line
            self.status = message.ended
            self.refresh_bindings()
            self.log_line(f"[b red]{escape(message.ended)}[/b red]: the run no longer trains "
                          "(its process is gone or stopped beating)")
            self._update_stats()
        if message.first:
            self.query_one(LossPlot).redraw_now()

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

    def begin(self, cfg: RunConfig) -> None:
        """A new live run was requested: clear everything and say what is happening."""
        self.reset_state()
        self.cfg, self.status, self.epochs = cfg, "starting", cfg.epochs
        self.query_one(LossPlot).reset()
        self.query_one(AccuracyPlot).reset()
        self.query_one("#log", RichLog).clear()
        self.query_one("#epoch-bar", ProgressBar).update(total=cfg.epochs, progress=0)
        self.query_one("#step-bar", ProgressBar).update(total=None, progress=0)
        self.query_one("#summary", Static).update(
            f"[b]starting[/b] {cfg.strategy} {cfg.backbone} on {cfg.dataset}: loading data and model...")
        self.log_line(escape(f"Starting {cfg.strategy} on {cfg.dataset} ({cfg.epochs} epochs, lr {cfg.lr:g})."))

    def could_not_start(self, error: str) -> None:
        self.status = "not started"
        self.query_one("#step-bar", ProgressBar).update(total=1, progress=0)
        self.query_one("#summary", Static).update(f"[b red]could not start[/b red]: {escape(error)}")
        self.log_line(f"[red]{escape(error)}[/red]")
        self.log_line("Press F1 (or e) to change the settings and start again.")

    def crashed(self, error: str) -> None:
        """The run's worker died of an error that the trainer did not handle."""
        self.status = ev.FAILED
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
        self.last_step = steps[-1]
        total = self.started.steps_per_epoch if self.started else None
        self.query_one("#step-bar", ProgressBar).update(total=total, progress=self.last_step.step)
        self.query_one("#epoch-bar", ProgressBar).update(progress=self.last_step.epoch - 1 + (
            self.last_step.step / total if total else 0))
        self._update_stats()

    def apply(self, event: ev.Event) -> None:
        if isinstance(event, ev.RunStarted):
            self.started, self.status, self.t0 = event, "running", time.monotonic()
            self.cfg = from_mapping(event.config)
            self.epochs = self.cfg.epochs
            c = self.cfg
            lrs = f"lr {c.lr:g}" + (f", backbone lr {c.lr_backbone:g}" if c.strategy == "discriminative" else "")
            self.query_one("#summary", Static).update(  # names and paths from settings: never markup
                f"[b]{c.strategy}[/b] · {escape(f'{c.backbone} ({c.pretrained}) · {c.dataset}')} "
                f"{event.train_size}/{event.test_size} · {c.image_size}px · {lrs} · batch {c.batch_size}\n"
                f"[b]{escape(event.device)}[/b] · trainable {event.trainable_params:,}/{event.total_params:,} · "
                f"{escape(event.run_dir)}")
            self.query_one("#epoch-bar", ProgressBar).update(total=self.epochs, progress=0)
            self.query_one("#step-bar", ProgressBar).update(total=event.steps_per_epoch, progress=0)
            for note in event.notes:
                self.log_line(f"[yellow]note:[/yellow] {escape(note)}")
            self.log_line(escape(f"Run {event.run_id} started on {event.device}."))
            self.refresh_bindings()
        elif isinstance(event, ev.EpochEnded):
            self.results.append(event)
            acc = self.query_one(AccuracyPlot)
            acc.add("train", event.epoch, event.train_acc)
            acc.add("test", event.epoch, event.test_acc)
            self.query_one("#epoch-bar", ProgressBar).update(progress=event.epoch)
            self.log_line(escape(ev.epoch_summary(event, self.epochs)))
        elif isinstance(event, ev.RunResumed):
            self.status, self.epochs, self.resumed_from = "running", event.epochs, event.global_step
            self.query_one("#epoch-bar", ProgressBar).update(total=event.epochs)
            self.log_line(f"[b]Resumed[/b] at epoch {event.epoch} step {event.step} (global step "
                          f"{event.global_step}), to {event.epochs} epochs.")
        elif isinstance(event, ev.CheckpointSaved):
            self.log_line(f"[dim]checkpoint {event.kind} saved (epoch {event.epoch})[/dim]")
        elif isinstance(event, ev.RunFinished):
            self.status = event.status
            self.refresh_bindings()
            colour = ev.STATUS_COLOURS[event.status]
            self.log_line(f"[b {colour}]{escape(ev.finish_summary(event))}[/]")
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
        if self.results:
            parts.append(f"test acc {self.results[-1].test_acc:.4f}")
        self.query_one("#stats", Static).update(" · ".join(parts))

    # -- keys -------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple) -> Optional[bool]:
        if action in ("stop", "abort"):
            if self.follow:
                return self.status == "running"
            return self.live and getattr(self.app, "running", False)
        if action == "edit":
            return self.cfg is not None
        return True

    def action_stop(self) -> None:
        if self.follow:
            self._request("stop")
            self.notify("Asked the run to stop after its current step; a checkpoint will be saved.")
        else:
            self.app.stop_run()

    def action_abort(self) -> None:
        if not self.follow:
            self.app.abort_run()
            return

        def confirmed(yes: Optional[bool]) -> None:
            if yes and self.status == "running":
                self._request("abort")
                self.notify("Asked the run to abort.", severity="warning")

        self.app.push_screen(ConfirmScreen("Abort the run now? No checkpoint is saved.", "Abort"), confirmed)

    @work(thread=True, exit_on_error=False, group="request")
    def _request(self, action: str) -> None:
        """Write the attached run's control request (a file write: never on the UI thread)."""
        from core.live import request
        from core.store import error_reason

        try:
            request(self.run_dir, action)
        except OSError as exc:
            self.app.call_from_thread(self.notify, f"cannot ask the run to {action}: {error_reason(exc)}",
                                      severity="error")

    async def action_edit(self) -> None:
        if self.cfg is not None:
            await self.app.edit_config(self.cfg)

    def action_toggle_raw(self) -> None:
        plot = self.query_one(LossPlot)
        plot.show_raw = not plot.show_raw
        plot.redraw_now()

    def action_back(self) -> None:
        if not self.live:
            self.dismiss()
