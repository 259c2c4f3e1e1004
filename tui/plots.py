"""Plots that own bounded data and redraw on the UI thread on a timer, only when dirty.

PlotextPlot rebuilds its whole figure on every repaint (~22 ms for 500 points, 100+ ms for 5,000
on 2 cores), so each series is kept as at most `Buckets.SIZE` points: when full, neighbouring
buckets merge, so a 100,000-step run costs the same to draw as a 100-step one. The figure goes
from plotext's character grid straight to styled text: the ANSI string that PlotextPlot builds and
then parses back was 40% of a redraw.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby
from typing import Dict, List, Sequence, Tuple

from plotext import _utility as plotext_utility
from rich.style import Style
from rich.text import Text
from textual_plotext import PlotextPlot

from tui.compat import build_plotext_matrix

REDRAW_SECONDS = 0.2
COLORS = ("cyan", "orange", "green", "magenta", "blue", "red", "yellow", "white")


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


@dataclass
class Buckets:
    """A series of (x, y) points reduced to at most SIZE bucket means, in O(1) per point."""

    SIZE = 150
    xs: List[float] = field(default_factory=list)
    ys: List[float] = field(default_factory=list)
    counts: List[int] = field(default_factory=list)
    per_bucket: int = 1

    def add(self, x: float, y: float) -> None:
        self.extend((x,), (y,))

    def extend(self, xs: Sequence[float], ys: Sequence[float]) -> None:
        """add() of every point in turn, in one call: the same arithmetic in the same order, so
        the same floats (a bucket's mean is updated one point at a time, as add() does it)."""
        i, end = 0, len(xs)
        while i < end:
            counts = self.counts
            if counts and counts[-1] < self.per_bucket:
                n = counts[-1]
                x, y = self.xs[-1], self.ys[-1]
                stop = min(end, i + self.per_bucket - n)
                for j in range(i, stop):
                    x = (x * n + xs[j]) / (n + 1)
                    y = (y * n + ys[j]) / (n + 1)
                    n += 1
                self.xs[-1], self.ys[-1], counts[-1] = x, y, n
                i = stop
            elif len(counts) >= self.SIZE:
                self._halve()
            else:
                self.xs.append(xs[i])
                self.ys.append(ys[i])
                counts.append(1)
                i += 1

    def _halve(self) -> None:
        xs, ys, counts = [], [], []
        for i in range(0, len(self.counts) - 1, 2):
            n = self.counts[i] + self.counts[i + 1]
            xs.append((self.xs[i] * self.counts[i] + self.xs[i + 1] * self.counts[i + 1]) / n)
            ys.append((self.ys[i] * self.counts[i] + self.ys[i + 1] * self.counts[i + 1]) / n)
            counts.append(n)
        if len(self.counts) % 2:
            xs.append(self.xs[-1])
            ys.append(self.ys[-1])
            counts.append(self.counts[-1])
        self.xs, self.ys, self.counts = xs, ys, counts
        self.per_bucket *= 2

    def __len__(self) -> int:
        return len(self.xs)


class TimedPlot(PlotextPlot):
    """A PlotextPlot that replots from its own data every REDRAW_SECONDS when marked dirty."""

    DEFAULT_CSS = "TimedPlot { height: 1fr; min-height: 6; }"

    def __init__(self, title: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.title = title
        self.note = ""
        """Said after the title while it matters, e.g. "loading..." while data is read."""
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
        plt.title(f"{self.title} ({self.note})" if self.note else self.title)
        self.draw(plt)
        self.version += 1
        self.refresh()
        if self.size and not self.screen.is_current:
            self.render()  # build the figure now, so that switching back to this screen is quick

    def draw(self, plt) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class LossPlot(TimedPlot):
    """Training loss per step: raw (bucket means) and smoothed (exponential moving average),
    for one run or overlaid for several."""

    SMOOTHING = 0.9

    def __init__(self, title: str = "loss per step", overlay: bool = False, **kwargs) -> None:
        super().__init__(title, **kwargs)
        self.overlay = overlay
        self.raw: Dict[str, Buckets] = {}
        self.smooth: Dict[str, Buckets] = {}
        self._ema: Dict[str, float] = {}
        self.show_raw = True

    def reset(self) -> None:
        self.raw.clear()
        self.smooth.clear()
        self._ema.clear()
        self.mark_dirty()

    def add(self, series: str, step: int, loss: float) -> None:
        self.extend(series, (step,), (loss,))

    def extend(self, series: str, steps: Sequence[int], losses: Sequence[float]) -> None:
        """Many add() calls in one: the same series, the same floats (a replayed run of 20,000
        steps is added at once, then drawn once)."""
        if not len(steps):
            return
        smoothed, ema, keep = [], self._ema.get(series), self.SMOOTHING
        for loss in losses:
            ema = loss if ema is None else keep * ema + (1 - keep) * loss
            smoothed.append(ema)
        self._ema[series] = ema
        self.raw.setdefault(series, Buckets()).extend(steps, losses)
        self.smooth.setdefault(series, Buckets()).extend(steps, smoothed)
        self.dirty = True

    def points(self) -> int:
        return sum(len(b) for b in self.raw.values())

    def draw(self, plt) -> None:
        single = not self.overlay
        for i, (name, raw) in enumerate(self.raw.items()):
            if self.show_raw and single:
                plt.plot(raw.xs, raw.ys, label="raw", marker="braille", color="gray")
            smooth = self.smooth[name]
            plt.plot(smooth.xs, smooth.ys, label="smoothed" if single else name, marker="braille",
                     color=COLORS[i % len(COLORS)])
        if single and not self.show_raw:
            self.plt.title(f"{self.title} (smoothed only: r shows raw)")
        plt.xlabel("step")


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

    def draw(self, plt) -> None:
        epochs: Sequence[int] = sorted({x for xs, _ in self.series.values() for x in xs})
        for i, (name, (xs, ys)) in enumerate(self.series.items()):
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
        self.xlabel = xlabel
        self.series: Dict[str, Buckets] = {}

    def reset(self) -> None:
        self.series.clear()
        self.mark_dirty()

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
            self.series.setdefault(name, Buckets()).extend([x for x, _ in pairs], [y for _, y in pairs])
        self.dirty = True

    def draw(self, plt) -> None:
        for i, (name, buckets) in enumerate(sorted(self.series.items())):
            plt.plot(buckets.xs, buckets.ys, label=name if len(self.series) > 1 else None, marker="braille",
                     color=COLORS[i % len(COLORS)])
        top = max((max(b.ys) for b in self.series.values() if b.ys), default=0.0)
        if top > 0:  # from 0: a warmup or a decay shows in proportion
            plt.ylim(0, top * 1.05)
        plt.xlabel(self.xlabel)
