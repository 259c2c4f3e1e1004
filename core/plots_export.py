"""A run's plots as SVG and PNG files, and the folder where a run's exports go.

The app hands over plain data (core.plotdata's curves with the controls shown on screen), so the
files show what the screen shows, at a finer resolution. matplotlib (Agg, its Figure API: no
pyplot, no global state, safe in a worker thread) is imported only here and only when a picture is
drawn: it costs ~0.35 s, which the app's start-up must not pay.
"""
from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from core.plotdata import Curve, PlotControls, RunCurves, loss_curves, log_safe, x_label

EXPORT_POINTS = 2000
"""At most this many points per exported curve (bucket means, as on screen with 150)."""
EXPORTS_DIR = "exports"
COLOURS = {"raw": "#9e9e9e", "smoothed": "#1f77b4", "test loss": "#ff7f0e", "train loss": "#2ca02c",
           "train": "#1f77b4", "test": "#ff7f0e"}
CYCLE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
EPOCH_CURVES = ("train loss", "test loss", "train", "test")
"""Curves of one point per epoch: drawn with their points marked."""


@dataclass
class Panel:
    """One plot of the picture: its curves by label, already in the shown window and axis."""

    title: str
    xlabel: str
    curves: Dict[str, Curve] = field(default_factory=dict)
    log_y: bool = False
    ylim: Optional[Tuple[float, float]] = None
    integer_x: bool = False


def loss_panel(title: str, run: RunCurves, controls: PlotControls) -> Panel:
    """The loss plot of one run (run: a snapshot, smoothed at the controls' strength)."""
    return Panel(title, x_label(controls, run.steps_per_epoch), loss_curves(run, controls, EXPORT_POINTS),
                 controls.log_y)


def lr_panel(title: str, xlabel: str, series: Dict[str, Curve], controls: PlotControls) -> Panel:
    """The learning-rate plot (series: as the screen draws them, window and axis applied)."""
    return Panel(title, xlabel, log_safe(series, controls), controls.log_y)


def accuracy_panel(title: str, series: Dict[str, Curve]) -> Panel:
    return Panel(title, "epoch", dict(series), False, (0.0, 1.0), integer_x=True)


def stamp() -> str:
    """The local time, as in the names of exports (and of runs)."""
    return time.strftime("%Y%m%d-%H%M%S")


def new_export_path(run_dir: Union[str, Path], stem: str, suffixes: Sequence[str]) -> Path:
    """RUN/exports/<stem>-<time> (the folder made if missing), with a number added until no file
    of that name exists with any of `suffixes`: an earlier export is never overwritten."""
    folder = Path(run_dir) / EXPORTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    base = f"{stem}-{stamp()}"
    n = 1
    while True:
        path = folder / (base if n == 1 else f"{base}-{n}")
        if not any(path.with_name(path.name + suffix).exists() for suffix in suffixes):
            return path
        n += 1


def figure(panels: Sequence[Panel]):
    """A matplotlib Figure of the panels side by side (the loss plot wider, as on screen)."""
    from matplotlib.figure import Figure  # noqa: PLC0415  (lazy: see the module's docstring)
    from matplotlib.ticker import FixedLocator, LogFormatter, MaxNLocator

    fig = Figure(figsize=(5 * len(panels) + 2, 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, width_ratios=[3 if not p.integer_x else 2 for p in panels])[0]
    for ax, panel in zip(axes, panels):
        ax.set_title(panel.title)
        ax.set_xlabel(panel.xlabel)
        drawn = False
        for i, (label, (xs, ys)) in enumerate(panel.curves.items()):
            if not len(xs):
                continue
            drawn = True
            colour = COLOURS.get(label, CYCLE[i % len(CYCLE)])
            ax.plot(xs, ys, label=label, color=colour, linewidth=0.8 if label == "raw" else 1.5,
                    marker="o" if label in EPOCH_CURVES else None, markersize=4)
        if panel.log_y and drawn:
            ax.set_yscale("log")  # labelled 2.4, 1e-05: not 2.4x10^0
            ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        if panel.integer_x:  # epochs: whole numbers, each one while they are few
            epochs = sorted({x for xs, _ in panel.curves.values() for x in xs})
            ax.xaxis.set_major_locator(FixedLocator(epochs) if 0 < len(epochs) <= 20 else MaxNLocator(integer=True))
            if len(epochs) == 1:
                ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
        if drawn:
            ax.legend(fontsize="small")
        ax.grid(True, alpha=0.3)
    return fig


def export_plots(run_dir: Union[str, Path], panels: Sequence[Panel], stem: str = "plots") -> List[Path]:
    """Draw the panels into RUN/exports/<stem>-<time>.svg and .png (new files, never over earlier
    ones); returns their paths. Each file is created exclusively and removed again if writing it
    fails (a full disk leaves no half picture)."""
    from matplotlib import rc_context

    fig = figure(panels)
    base = new_export_path(run_dir, stem, (".svg", ".png"))
    written: List[Path] = []
    try:
        for suffix, options in ((".svg", {"format": "svg"}), (".png", {"format": "png", "dpi": 100})):
            data = io.BytesIO()
            with rc_context({"svg.fonttype": "none"}):  # text stays text in the SVG: editable, searchable
                fig.savefig(data, **options)
            path = base.with_name(base.name + suffix)
            with open(path, "xb") as f:
                written.append(path)
                f.write(data.getvalue())
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for path in written:
            try:
                path.unlink()
            except OSError:
                pass
        raise
    return written
