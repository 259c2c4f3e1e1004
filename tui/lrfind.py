"""The LR finder in the app: a modal screen that runs core.lrfind's sweep in a thread worker,
plots the curve as it grows, and hands the suggestion back to the form (enter / u).

The worker never touches a widget: each step and the end are posted as messages (a sweep has at
most ~100 steps, so a message per step is cheap); the plot redraws on its own timer. Escape sets
the sweep's cancel flag (checked between steps) and closes the screen at once; the worker ends
after its current step.
"""
from __future__ import annotations

import threading
from typing import Any, Optional

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from core.config import RunConfig
from core.lrfind import SweepProgress, SweepResult, apply_suggestion, format_lr
from tui.lrplot import draw_sweep
from tui.plots import TimedPlot


class SweepPlot(TimedPlot):
    """The sweep's raw and smoothed loss against the learning rate, the suggestion marked."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("loss against learning rate", **kwargs)
        self.points: list = []
        self.suggestion: Optional[float] = None

    def draw(self, plt) -> None:
        draw_sweep(plt, self.points, self.suggestion)


class LRFindScreen(ModalScreen[Optional[float]]):
    """Runs the sweep for `cfg`; dismisses with the suggested learning rate (enter / u) or None."""

    CSS_PATH = "lrfind.tcss"
    BINDINGS = [Binding("enter,u", "use", "Use it"), Binding("escape", "close", "Cancel / close")]

    class Stepped(Message):
        def __init__(self, progress: SweepProgress) -> None:
            super().__init__()
            self.progress = progress

    class Finished(Message):
        def __init__(self, result: SweepResult) -> None:
            super().__init__()
            self.result = result

    class Failed(Message):
        """The sweep could not start (bad settings, data missing...) or broke: one line."""

        def __init__(self, error: str) -> None:
            super().__init__()
            self.error = error

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cancel = threading.Event()
        self.result: Optional[SweepResult] = None

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide", id="lrfind"):
            what = "the head's learning rate (the backbone's keeps its ratio)" \
                if self.cfg.strategy == "discriminative" else "the learning rate"
            yield Static(f"[b]LR finder[/b]: sweeps {what} on a copy of the model; nothing is saved")
            yield Static("loading data and model...", id="lrfind-status")
            yield SweepPlot(id="lrfind-plot")
            yield Label("enter / u: use the suggestion   escape: cancel / close", classes="hint")

    def on_mount(self) -> None:
        self._sweep()

    def on_unmount(self) -> None:
        self.cancel.set()

    @work(thread=True, exclusive=True, exit_on_error=False, group="lrfind")
    def _sweep(self) -> None:
        from core.errors import SetupError, one_line
        from core.lrfind import lr_find

        try:
            result = lr_find(self.cfg, on_step=lambda p: self.post_message(self.Stepped(p)), cancel=self.cancel)
        except SetupError as exc:
            self.post_message(self.Failed(str(exc)))
        except Exception as exc:  # OneFlow's own errors: one line, never a crash of the app
            self.post_message(self.Failed(one_line(exc)))
        else:
            self.post_message(self.Finished(result))

    @on(Stepped)
    def _stepped(self, message: Stepped) -> None:
        point, plot = message.progress.point, self.query_one(SweepPlot)
        plot.points.append(point)
        plot.mark_dirty()
        self.query_one("#lrfind-status", Static).update(
            f"step {point.step}/{message.progress.total}   lr {format_lr(point.lr)}   loss {point.loss:.4f}")

    @on(Finished)
    def _finished(self, message: Finished) -> None:
        self.result = result = message.result
        plot = self.query_one(SweepPlot)
        plot.points, plot.suggestion = list(result.points), result.suggestion
        plot.redraw_now()
        if result.suggestion is None:
            text = escape(result.why)
        else:
            text = (f"{escape(result.why)}\nsuggested lr: [b]{format_lr(result.suggestion)}[/b]"
                    + self._backbone_note(result.suggestion) + "   enter / u puts it in the form")
        self.query_one("#lrfind-status", Static).update(text)

    def _backbone_note(self, lr: float) -> str:
        if self.cfg.strategy != "discriminative":
            return ""
        return f" (backbone {apply_suggestion(self.cfg, lr).lr_backbone:g})"

    @on(Failed)
    def _failed(self, message: Failed) -> None:
        self.app.notify(message.error, title="LR finder could not run", severity="error", timeout=10)
        self.dismiss(None)

    def action_use(self) -> None:
        if self.result is None:
            self.notify("The sweep is still running: wait for its suggestion (escape cancels it).",
                        severity="warning")
        elif self.result.suggestion is None:
            self.notify(f"No suggestion: {self.result.why}", severity="warning")
        else:
            self.dismiss(self.result.suggestion)

    def action_close(self) -> None:
        self.cancel.set()
        self.dismiss(None)


def open_lr_finder(form: Any) -> None:
    """The form's LR finder (ctrl+l, "LR finder" in the palette): sweep with the form's settings
    and, on enter / u, put the suggestion in its learning-rate field (for discriminative the
    head's, with the backbone's scaled to keep the ratio)."""
    if any(isinstance(screen, LRFindScreen) for screen in form.app.screen_stack):
        form.notify("The LR finder is open already: one sweep at a time.", severity="warning")
        return  # (the palette reaches here over an open finder: a second sweep would share the cores)
    form.revalidate()
    cfg = form.valid_config()
    if cfg is None:
        form.notify("Fix the settings marked in red first:\n" + "\n".join(form.problems),
                    title="Cannot run the LR finder", severity="error")
        return

    def use(lr: Optional[float]) -> None:
        if lr is None:
            return
        new = apply_suggestion(cfg, lr)
        form.set_learning_rates(new)
        extra = f", backbone lr {new.lr_backbone:g}" if new.strategy == "discriminative" else ""
        form.notify(f"Learning rate set to {new.lr:g}{extra}")

    form.app.push_screen(LRFindScreen(cfg), use)
