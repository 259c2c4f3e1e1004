"""The LR finder's curve as a plotext figure: drawn in the app (tui.lrfind) and printed by
`transferlab lr-find` (core.cli gets `sweep_text` through the hook that tui/__main__.py gives
it: core never imports plotext). The x axis is log10 of the learning rate with ticks at whole
decades, labelled 1e-05 ... 1e+00, and the suggestion is a red vertical line."""
from __future__ import annotations

import math
import shutil
from typing import Optional, Sequence

from core.lrfind import SweepPoint, SweepResult, format_lr

HEIGHT = 20


def y_range(points: Sequence[SweepPoint]) -> tuple:
    """Room for the falling part of the curve and some of its rise: a diverging loss (often
    10x the rest) would otherwise flatten everything else to the bottom row."""
    smoothed = [p.smoothed for p in points]
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    top = max(smoothed[:lowest + 1]) * 1.25
    bottom = min(min(p.loss for p in points), smoothed[lowest])
    return bottom - 0.02 * (top - bottom), top


def draw_sweep(plt, points: Sequence[SweepPoint], suggestion: Optional[float]) -> None:
    """The raw and smoothed loss against the learning rate on `plt` (a plotext figure or the
    plotext module), with the suggestion marked."""
    if not points:
        return
    xs = [math.log10(p.lr) for p in points]
    low, high = y_range(points)
    plt.plot(xs, [min(p.loss, high) for p in points], label="loss", marker="braille", color="gray")
    plt.plot(xs, [min(p.smoothed, high) for p in points], label="smoothed", marker="braille", color="cyan")
    if suggestion is not None:
        x = min(max(math.log10(suggestion), xs[0]), xs[-1])  # outside the plot, plotext's legend breaks
        plt.vline(x, "red")
        nearest = min(points, key=lambda p: abs(math.log10(p.lr) - x))
        plt.scatter([x], [min(nearest.smoothed, high)], marker="x", color="red",
                    label=f"suggested {format_lr(suggestion)}")
    decades = list(range(math.ceil(xs[0]), math.floor(xs[-1]) + 1))
    if decades:
        plt.xticks(decades, [f"1e{d:+03d}" for d in decades])
    plt.xlim(xs[0], xs[-1] if xs[-1] > xs[0] else xs[0] + 1)
    plt.ylim(low, high)
    plt.xlabel("learning rate (log scale)")


def sweep_text(result: SweepResult, width: Optional[int] = None, height: int = HEIGHT,
               color: bool = True) -> str:
    """The sweep plotted for a terminal (`color` False: plain characters, for a file or pipe).
    Uses plotext's module-level figure: call it from one thread (the CLI's)."""
    import plotext as plt

    plt.clear_figure()
    plt.plotsize(width or min(shutil.get_terminal_size((100, 24)).columns, 120), height)
    plt.title("LR finder: loss against learning rate")
    draw_sweep(plt, result.points, result.suggestion)
    text = plt.build()
    return text if color else plt.uncolorize(text)
