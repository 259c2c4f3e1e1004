"""What a run's plots show, as plain data: the controls (log y, smoothing, window, x axis, curves
shown) and the curves they give from a run's recorded points.

UI-agnostic on purpose: the terminal plots (tui/plots.py) and the exported pictures
(core/plots_export.py) take their curves from here, so a picture shows what the screen shows.
"""
from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field, replace
from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

SMOOTHING: Dict[str, float] = {"off": 0.0, "light": 0.6, "medium": 0.9, "strong": 0.99}
"""Smoothing strength -> the EMA's weight of the past (0.9, medium, is the plots' old fixed value;
0.99 follows about the last 100 steps)."""
WINDOWS: Tuple[int, ...] = (0, 200, 1000)
"""The steps shown: 0 = the whole run, else the last N steps."""
X_AXES: Tuple[str, ...] = ("step", "epoch")
CURVES: Dict[str, str] = {
    "raw": "train loss per step (raw)",
    "smoothed": "train loss per step (smoothed)",
    "train loss": "train loss, epoch mean",
    "test loss": "test loss per epoch",
    "train acc": "train accuracy",
    "test acc": "test accuracy",
}
"""Every curve that can be turned off -> what it is (the curves dialog's words)."""

Curve = Tuple[List[float], List[float]]


@dataclass(frozen=True)
class PlotControls:
    """How the run plots are drawn. Frozen: a change is a new value (`cycled`, `toggled`)."""

    log_y: bool = False
    """Log-scale y for the loss and learning-rate plots (points <= 0 are left out)."""
    smoothing: str = "medium"
    window: int = 0
    x_axis: str = "step"
    """"epoch": steps at fractional epochs (global step / steps per epoch), epoch results at
    whole epochs; "step": epoch results at the last step of their epoch."""
    hidden: FrozenSet[str] = frozenset({"train loss"})
    """Curves not drawn (the epoch mean of the train loss repeats the smoothed curve: off at first)."""

    @property
    def keep(self) -> float:
        return SMOOTHING[self.smoothing]

    def shows(self, curve: str) -> bool:
        return curve not in self.hidden

    def cycled(self, what: str) -> "PlotControls":
        """The next value of `what` (log_y, smoothing, window or x_axis), after the last the first."""
        if what == "log_y":
            return replace(self, log_y=not self.log_y)
        options = {"smoothing": tuple(SMOOTHING), "window": WINDOWS, "x_axis": X_AXES}[what]
        now = options.index(getattr(self, what))
        return replace(self, **{what: options[(now + 1) % len(options)]})

    def toggled(self, curve: str) -> "PlotControls":
        return replace(self, hidden=self.hidden ^ {curve})

    def describe(self, short: bool = False) -> str:
        """What differs from the defaults (said in the plot titles); "" for the defaults. `short`:
        in fewer words, for narrow plots."""
        parts = []
        if self.log_y:
            parts.append("log" if short else "log y")
        if self.smoothing != "medium":
            parts.append(f"{'sm.' if short else 'smoothing'} {self.smoothing}")
        if self.window:
            parts.append(f"last {self.window}{'' if short else ' steps'}")
        return " · ".join(parts)


def ema(values: Iterable[float], keep: float, last: Optional[float] = None) -> List[float]:
    """Exponential moving average: the first value as is, then keep x previous + (1 - keep) x value
    (as the loss plot always smoothed); `last` continues an earlier stretch. keep 0: the values."""
    if keep == 0.0:
        return list(values)
    out = []
    for value in values:
        last = value if last is None else keep * last + (1 - keep) * value
        out.append(last)
    return out


@dataclass
class Buckets:
    """A series of (x, y) points reduced to at most `size` bucket means, in O(1) per point."""

    SIZE = 150
    xs: List[float] = field(default_factory=list)
    ys: List[float] = field(default_factory=list)
    counts: List[int] = field(default_factory=list)
    per_bucket: int = 1
    size: int = SIZE

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
            elif len(counts) >= self.size:
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


def reduced(xs: Sequence[float], ys: Sequence[float], size: int) -> Curve:
    buckets = Buckets(size=size)
    buckets.extend(xs, ys)
    return buckets.xs, buckets.ys


def windowed(xs: Sequence[float], ys: Sequence[float], window: int, size: int) -> Curve:
    """The last `window` points (0: all), reduced to at most `size` bucket means."""
    start = max(0, len(xs) - window) if window else 0
    return reduced(xs[start:], ys[start:], size)


@dataclass(frozen=True)
class EpochPoint:
    """An epoch's results, at the global step it ended on."""

    epoch: int
    step: int
    train_loss: float
    test_loss: float
    train_acc: float
    test_acc: float


@dataclass
class RunCurves:
    """One run's recorded points, all of them (16 bytes per step): the loss and its smoothing
    per step, the results per epoch. The windows and the smoothing strengths are computed from
    these, so a change of control shows exactly what a run recorded."""

    steps: array = field(default_factory=lambda: array("d"))
    losses: array = field(default_factory=lambda: array("d"))
    smoothed: array = field(default_factory=lambda: array("d"))
    """The EMA of `losses` at `keep`."""
    keep: float = SMOOTHING["medium"]
    steps_per_epoch: int = 0
    epochs: List[EpochPoint] = field(default_factory=list)

    def extend(self, steps: Sequence[float], losses: Sequence[float]) -> List[float]:
        """Add steps; returns their smoothed values (continuing the EMA)."""
        new = ema(losses, self.keep, self.smoothed[-1] if self.smoothed else None)
        self.steps.extend(steps)
        self.losses.extend(losses)
        self.smoothed.extend(new)
        return new

    def resmooth(self, keep: float) -> None:
        if keep != self.keep:
            self.keep, self.smoothed = keep, array("d", ema(self.losses, keep))

    def snapshot(self) -> "RunCurves":
        """A copy to hand to another thread (the export) while this one goes on growing."""
        return RunCurves(array("d", self.steps), array("d", self.losses), array("d", self.smoothed), self.keep,
                         self.steps_per_epoch, list(self.epochs))


def _positive(curve: Curve) -> Curve:
    """The points a log scale can show (finite and > 0)."""
    pairs = [(x, y) for x, y in zip(*curve) if y > 0 and math.isfinite(y)]
    return [x for x, _ in pairs], [y for _, y in pairs]


def x_label(controls: PlotControls, steps_per_epoch: int) -> str:
    return "epoch" if controls.x_axis == "epoch" and steps_per_epoch > 0 else "step"


def loss_curves(run: RunCurves, controls: PlotControls, size: int,
                whole: Optional[Tuple[Buckets, Buckets]] = None) -> Dict[str, Curve]:
    """The loss curves to draw, by curve name (raw, smoothed, train loss, test loss), each of at
    most `size` points: the steps in the window (raw and smoothed reduced to bucket means), the
    epochs that ended in it; x in steps or in epochs; for a log scale only positive values.
    `whole`: (raw, smoothed) buckets of the whole run that a caller keeps up to date as points
    come (they equal what this computes; the screen redraws a growing run without a pass over it).
    The smoothed values must be those of `controls.keep` (RunCurves.resmooth)."""
    assert run.keep == controls.keep, "resmooth the run first"
    start = max(0, len(run.steps) - controls.window) if controls.window else 0
    first = run.steps[start] if len(run.steps) else math.inf
    out: Dict[str, Curve] = {}
    if whole is not None and start == 0:
        out["raw"] = (whole[0].xs, whole[0].ys)
        out["smoothed"] = (whole[1].xs, whole[1].ys)
    else:
        out["raw"] = windowed(run.steps, run.losses, controls.window, size)
        out["smoothed"] = windowed(run.steps, run.smoothed, controls.window, size)
    ended = [e for e in run.epochs if e.step >= first] if controls.window else run.epochs
    out["train loss"] = ([e.step for e in ended], [e.train_loss for e in ended])
    out["test loss"] = ([e.step for e in ended], [e.test_loss for e in ended])
    out = {name: curve for name, curve in out.items() if controls.shows(name)}
    if x_label(controls, run.steps_per_epoch) == "epoch":
        per = run.steps_per_epoch
        for name in ("raw", "smoothed"):
            if name in out:
                out[name] = ([x / per for x in out[name][0]], out[name][1])
        for name in ("train loss", "test loss"):
            if name in out:
                out[name] = ([e.epoch for e in ended], out[name][1])
    return log_safe(out, controls)


def log_safe(curves: Dict[str, Curve], controls: PlotControls) -> Dict[str, Curve]:
    """Curves for a plot with these controls: for a log scale only their positive points."""
    return {name: _positive(curve) for name, curve in curves.items()} if controls.log_y else dict(curves)
