"""Plots that own bounded data and redraw on the UI thread on a timer, only when dirty.

PlotextPlot rebuilds its whole figure on every repaint (~22 ms for 500 points, 100+ ms for 5,000
on 2 cores), so each series is drawn as at most `Buckets.SIZE` points: when full, neighbouring
buckets merge, so a 100,000-step run costs the same to draw as a 100-step one. (The loss plot
also keeps every step, 16 bytes each, for its controls: core.plotdata.) The figure goes
from plotext's character grid straight to styled text: the ANSI string that PlotextPlot builds and
then parses back was 40% of a redraw.
"""
from __future__ import annotations

from array import array
from dataclasses import replace
from itertools import groupby
from typing import Dict, List, Sequence, Tuple

from plotext import _utility as plotext_utility
from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual_plotext import PlotextPlot

from core.plotdata import Buckets, EpochPoint, PlotControls, RunCurves, log_safe, loss_curves, windowed, x_label
from tui.compat import build_plotext_matrix
from tui.keybar import SPARE

REDRAW_SECONDS = 0.2
TITLE_MARGIN = 6
"""A title longer than the plot's width less this is left out by plotext: it is said shorter."""
COLORS = ("cyan", "orange", "green", "magenta", "blue", "red", "yellow", "white")
LOSS_COLORS = {"raw": "gray", "smoothed": COLORS[0], "test loss": COLORS[1], "train loss": COLORS[2]}


_STYLES: Dict[str, Style] = {}


def cell_style(foreground, style, background) -> Style:
    """The rich Style of a plotext cell's colours: plotext's own ANSI codes, decoded once."""
    codes = plotext_utility.colors_to_ansi(foreground, style, background)
    found = _STYLES.get(codes)
    if found is None:
        found = _STYLES[codes] = Style.combine(span.style for span in Text.from_ansi(codes + "x").spans)
    return found


def matrix_text(matrix) -> Text:
    """A built plotext matrix (rows of characters and colours, bottom row first) as Text: the
    same characters and styles as `Text.from_ansi` of plotext's canvas, one span per colour run."""
    text = Text(end="")
    for row in reversed(range(matrix.rows)):
        cells = zip(matrix.marker[row], matrix.fullground[row], matrix.style[row], matrix.background[row])
        for colours, run in groupby(cells, key=lambda cell: cell[1:]):
            text.append("".join(cell[0] for cell in run), cell_style(*colours))
        text.append("\n")
    return text


class TimedPlot(PlotextPlot):
    """A PlotextPlot that replots from its own data every REDRAW_SECONDS when marked dirty."""

    DEFAULT_CSS = "TimedPlot { height: 1fr; min-height: 6; }"

    def __init__(self, title: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.title = title
        self.note = ""
        """Said after the title while it matters, e.g. "loading..." while data is read."""
        self.controls = PlotControls()
        """How to draw (log y, smoothing, window, x axis, curves shown): the screen's, set_controls."""
        self.dirty = True
        self.version = 0
        self._cache = None

    def render(self):
        """Build the figure once per change of data or size; repaints reuse it."""
        key = (self.version, self.size, self.app.theme)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.build_text())
        return self._cache[1]

    def build_text(self) -> Text:
        """PlotextPlot.render (size, theme, build) without the detour through an ANSI string.
        Values plotext cannot scale (an lr of 1.7e308, whose axis ends at inf; one of 1e-320,
        whose ticks overflow) get a line instead of a figure: an exception here would end the app."""
        width, height = self.size
        theme = self._get_plotext_theme_name(self.app.theme)  # textual-plotext's own mapping
        self.plt.title(self.heading(width - TITLE_MARGIN))
        try:
            return matrix_text(build_plotext_matrix(self.plt, width, height, theme))
        except (ArithmeticError, ValueError):
            return Text(f"{self.title}: cannot plot these values (too large or too small to scale)")

    def on_mount(self) -> None:
        super().on_mount()
        self.set_interval(REDRAW_SECONDS, self._redraw_if_dirty)
        self._redraw_if_dirty()

    def mark_dirty(self) -> None:
        self.dirty = True

    def set_controls(self, controls: PlotControls) -> None:
        if controls != self.controls:
            self.controls = controls
            self.dirty = True

    def heading(self, width: int = 0) -> str:
        """The title, then the controls that differ from the defaults, then the note; in fewer
        words when longer than `width` (plotext leaves out a title that does not fit)."""
        for short in (False, True):
            said = self.said_controls(short)
            title = self.title.replace(" per ", "/") if short and said else self.title
            text = f"{title}{' · ' + said if said else ''}{f' ({self.note})' if self.note else ''}"
            text += "" if short else self.hint
            if not width or len(text) <= width:
                return text
        return text[:max(0, width - 1)] + "…"

    @property
    def hint(self) -> str:
        """Said at the end of the title, e.g. how to get back a curve turned off."""
        return ""

    def said_controls(self, short: bool = False) -> str:
        """The controls that change this plot, when not the defaults ("" then)."""
        return self.controls.describe(short)

    def set_note(self, note: str) -> None:
        if note != self.note:
            self.note = note
            self.dirty = True

    def redraw_now(self) -> None:
        """Redraw at once (after a key press), not on the next tick."""
        self.dirty = True
        self._redraw_if_dirty()

    def _redraw_if_dirty(self) -> None:
        if not self.dirty:
            return
        self.dirty = False
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        self.draw(plt)
        self.version += 1
        self.refresh()
        if self.size and not self.screen.is_current:
            self.render()  # build the figure now, so that switching back to this screen is quick

    def draw(self, plt) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class LossPlot(TimedPlot):
    """Training loss per step, raw (bucket means) and smoothed (exponential moving average), with
    the test loss (and the epoch mean of the train loss) per epoch; for one run, or the smoothed
    curves of several overlaid. Every step is kept (RunCurves), so that the smoothing and the
    window can change; the whole run is also kept reduced as points come (`raw`, `smooth`), so a
    growing run is redrawn without a pass over all its steps."""

    def __init__(self, title: str = "loss per step", overlay: bool = False, **kwargs) -> None:
        super().__init__(title, **kwargs)
        self.step_title = title
        self.overlay = overlay
        self.runs: Dict[str, RunCurves] = {}
        self.raw: Dict[str, Buckets] = {}
        self.smooth: Dict[str, Buckets] = {}

    @property
    def _ema(self) -> Dict[str, float]:
        """Each series' last smoothed value (where the smoothing goes on from)."""
        return {name: run.smoothed[-1] for name, run in self.runs.items() if run.smoothed}

    @property
    def show_raw(self) -> bool:
        return self.controls.shows("raw")

    def reset(self) -> None:
        self.runs.clear()
        self.raw.clear()
        self.smooth.clear()
        self.mark_dirty()

    def run(self, series: str) -> RunCurves:
        return self.runs.setdefault(series, RunCurves(keep=self.controls.keep))

    def set_controls(self, controls: PlotControls) -> None:
        if controls.keep != self.controls.keep:  # every series smoothed again, from its steps
            for name, run in self.runs.items():
                run.resmooth(controls.keep)
                self.smooth[name] = Buckets()
                self.smooth[name].extend(run.steps, run.smoothed)
        epochs = controls.x_axis == "epoch" and any(run.steps_per_epoch for run in self.runs.values())
        self.title = self.step_title.replace("per step", "per epoch") if epochs else self.step_title
        super().set_controls(controls)

    def add(self, series: str, step: int, loss: float) -> None:
        self.extend(series, (step,), (loss,))

    def extend(self, series: str, steps: Sequence[int], losses: Sequence[float]) -> None:
        """Many add() calls in one: the same series, the same floats (a replayed run of 20,000
        steps is added at once, then drawn once)."""
        if not len(steps):
            return
        smoothed = self.run(series).extend(steps, losses)
        self.raw.setdefault(series, Buckets()).extend(steps, losses)
        self.smooth.setdefault(series, Buckets()).extend(steps, smoothed)
        self.dirty = True

    def add_epoch(self, series: str, point: EpochPoint) -> None:
        self.run(series).epochs.append(point)
        self.dirty = True

    def set_steps_per_epoch(self, series: str, steps: int) -> None:
        """For the epoch x axis (a step is drawn at global step / steps per epoch)."""
        self.run(series).steps_per_epoch = steps
        self.set_controls(self.controls)  # the title may change
        self.dirty = True

    @property
    def hint(self) -> str:
        return " (raw hidden: r shows it)" if not self.overlay and not self.show_raw else ""

    def points(self) -> int:
        return sum(len(b) for b in self.raw.values())

    def curves(self, series: str) -> Dict[str, Tuple[List[float], List[float]]]:
        """What is drawn of `series` (core.plotdata.loss_curves, at most Buckets.SIZE points each)."""
        whole = (self.raw[series], self.smooth[series]) if series in self.raw else None
        return loss_curves(self.runs[series], self.controls, Buckets.SIZE, whole)

    def draw(self, plt) -> None:
        single, drawn, label = not self.overlay, False, "step"
        for i, name in enumerate(self.runs):
            curves = self.curves(name)
            label = x_label(self.controls, self.runs[name].steps_per_epoch)
            if not single:
                curves = {name: curves["smoothed"]} if "smoothed" in curves else {}
            for curve, (xs, ys) in curves.items():
                if not xs:
                    continue
                drawn = True
                color = LOSS_COLORS[curve] if single else COLORS[i % len(COLORS)]
                plt.plot(xs, ys, label=curve, marker="braille", color=color)
                if curve in ("test loss", "train loss"):
                    plt.scatter(xs, ys, marker="dot", color=color)
        if self.controls.log_y and drawn:  # (plotext fails on a log axis with no points)
            plt.yscale("log")
        plt.xlabel(label)


class AccuracyPlot(TimedPlot):
    """Accuracy per epoch: train and test for one run, or test accuracy of several runs."""

    def __init__(self, title: str = "accuracy per epoch", **kwargs) -> None:
        super().__init__(title, **kwargs)
        self.series: Dict[str, Tuple[List[int], List[float]]] = {}

    def reset(self) -> None:
        self.series.clear()
        self.mark_dirty()

    def add(self, series: str, epoch: int, acc: float) -> None:
        xs, ys = self.series.setdefault(series, ([], []))
        xs.append(epoch)
        ys.append(acc)
        self.dirty = True

    def said_controls(self, short: bool = False) -> str:
        return ""  # (the curves turned off are not in the legend)

    def shown(self) -> Dict[str, Tuple[List[int], List[float]]]:
        """The series drawn: "train" and "test" unless their curve ("train acc"...) is turned off."""
        return {name: xy for name, xy in self.series.items() if self.controls.shows(f"{name} acc")}

    def draw(self, plt) -> None:
        epochs: Sequence[int] = sorted({x for xs, _ in self.series.values() for x in xs})
        for i, (name, (xs, ys)) in enumerate(self.series.items()):
            if not self.controls.shows(f"{name} acc"):
                continue
            color = COLORS[i % len(COLORS)]
            plt.plot(xs, ys, label=name, marker="braille", color=color)
            plt.scatter(xs, ys, marker="dot", color=color)
        if epochs:
            plt.xticks(list(epochs))
        plt.ylim(0, 1)
        plt.xlabel("epoch")


class LrPlot(TimedPlot):
    """Learning rate per param group: the form's preview of the schedule over the run (set
    whole), or the dashboard's lrs as a run reports them (extended per step)."""

    def __init__(self, title: str = "learning rate per step", xlabel: str = "step", **kwargs) -> None:
        super().__init__(title, **kwargs)
        self.step_title = title
        self.xlabel = xlabel
        self.series: Dict[str, Buckets] = {}
        self.kept: Dict[str, Tuple[array, array]] = {}
        """A run's every step and lr per group (extend), for the window; not the form's preview."""
        self.steps_per_epoch = 0

    def reset(self) -> None:
        self.series.clear()
        self.kept.clear()
        self.mark_dirty()

    def set_controls(self, controls: PlotControls) -> None:
        epochs = controls.x_axis == "epoch" and self.steps_per_epoch > 0
        self.title = self.step_title.replace("per step", "per epoch") if epochs else self.step_title
        super().set_controls(controls)

    def set_steps_per_epoch(self, steps: int) -> None:
        self.steps_per_epoch = steps
        self.set_controls(self.controls)
        self.dirty = True

    def set_curves(self, curves: Dict[str, Tuple[Sequence[float], Sequence[float]]]) -> None:
        """Replace every series (the form's preview)."""
        self.series.clear()
        for name, (xs, ys) in curves.items():
            self.series.setdefault(name, Buckets()).extend(xs, ys)
        self.mark_dirty()

    def extend(self, steps: Sequence[int], lrs: Sequence[Dict[str, float]]) -> None:
        """The lrs of consecutive steps, one dict per step (a group appears when it starts
        training: the backbone unfrozen)."""
        for name in {name for step_lrs in lrs for name in step_lrs}:
            pairs = [(x, step_lrs[name]) for x, step_lrs in zip(steps, lrs) if name in step_lrs]
            xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
            self.series.setdefault(name, Buckets()).extend(xs, ys)
            kept = self.kept.setdefault(name, (array("d"), array("d")))
            kept[0].extend(xs)
            kept[1].extend(ys)
        self.dirty = True

    def said_controls(self, short: bool = False) -> str:
        return replace(self.controls, smoothing="medium").describe(short)  # (the smoothing is the loss's)

    def curves(self) -> Dict[str, Tuple[List[float], List[float]]]:
        """What is drawn, by group: the window's steps (a group that started late: its own last
        ones), x in steps or epochs, for a log scale only the positive points."""
        window = self.controls.window if self.kept else 0
        curves = {name: windowed(*self.kept[name], window, Buckets.SIZE) if window else (b.xs, b.ys)
                  for name, b in sorted(self.series.items())}
        if self.kept and x_label(self.controls, self.steps_per_epoch) == "epoch":
            curves = {name: ([x / self.steps_per_epoch for x in xs], ys) for name, (xs, ys) in curves.items()}
        return log_safe(curves, self.controls)

    def draw(self, plt) -> None:
        curves = self.curves()
        for i, (name, (xs, ys)) in enumerate(curves.items()):
            plt.plot(xs, ys, label=name if len(self.series) > 1 else None, marker="braille",
                     color=COLORS[i % len(COLORS)])
        top = max((max(ys) for _, ys in curves.values() if ys), default=0.0)
        if self.controls.log_y:
            if top > 0:  # (plotext fails on a log axis with no points)
                plt.yscale("log")
        elif top > 0:  # from 0: a warmup or a decay shows in proportion
            plt.ylim(0, top * 1.05)
        plt.xlabel(x_label(self.controls, self.steps_per_epoch) if self.kept else self.xlabel)


CONTROL_KEYS = (
    ("y", "plot('log_y')", "Log y", "Log-scale y of the loss and learning-rate plots, or linear"),
    ("m", "plot('smoothing')", "Smoothing", "Smoothing of the loss: off, light, medium, strong"),
    ("w", "plot('window')", "Window", "Steps shown: the whole run, the last 200, the last 1000"),
    ("t", "plot('x_axis')", "Steps/epochs", "The x axis of the loss and learning-rate plots: steps, or epochs"),
)
"""(key, action, key bar words, palette help) of the plot controls: in the key bar where there is
room (keybar.SPARE), always in the command palette (palette_commands)."""


def spare_bindings(keys) -> list:
    """The Bindings of (key, action, words, help) rows: in the key bar where there is room."""
    return [Binding(key, action, words, id=f"{SPARE}{key}") for key, action, words, _ in keys]


class PlotControlsMixin:
    """For a Screen with run plots: `action_plot(what)` cycles a control (y, m, w, t), the app
    keeps them (`app.plot_controls`) for the other screens, the next run and the replays."""

    def set_controls(self, controls: PlotControls) -> None:
        for plot in self.query(TimedPlot):
            plot.set_controls(controls)
            if plot.display:
                plot.redraw_now()

    def change_controls(self, controls: PlotControls) -> None:
        self.app.plot_controls = controls
        self.set_controls(controls)

    def action_plot(self, what: str) -> None:
        """The next log y / smoothing / window / x axis."""
        self.change_controls(self.app.plot_controls.cycled(what))

    def on_screen_resume(self) -> None:
        self.set_controls(self.app.plot_controls)  # as changed on another screen meanwhile


def palette_commands(screen, keys) -> list:
    """(name, help, callback) for the command palette of each (key, action, words, help)."""
    return [(f"Plots: {words.lower()}", f"{help} ({key})", lambda action=action: screen.run_action(action))
            for key, action, words, help in keys]
