"""Replaying a long finished run: time from the key to the first frame and to the fully plotted loss.

Writes a finished run of 20,000 steps (the run store's format: tests/conftest.py write_long_run),
opens the app headless (Textual's Pilot, 100x32) on its runs screen (F3) and presses
- enter: open the run's dashboard (replayed from its metrics.jsonl),
- space: overlay the run's curves on the runs screen,
each --repeat times, measuring from the key to the first frame the app outputs after it, and to
the first frame whose loss plot holds every step. "old" is the code before the replay was moved
off the UI thread, reconstructed here: metrics.jsonl parsed on the UI thread, then every event
applied (every step added to the plot) one at a time; "new" is the app as it is.

Usage: .venv/bin/python benchmarks/replay.py [--steps 20000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from textual import events  # noqa: E402

from conftest import write_long_run  # noqa: E402
from core import events as ev  # noqa: E402
from core.config import RunConfig  # noqa: E402
from core.store import read_events  # noqa: E402
from tui.app import TransferLabApp  # noqa: E402
from tui.dashboard import DashboardScreen  # noqa: E402
from tui.plots import AccuracyPlot, LossPlot  # noqa: E402
from tui.runs import RunsScreen  # noqa: E402


# -- the old path, as it was ---------------------------------------------------------------------

def old_open(self: RunsScreen) -> None:
    run = self.current()
    if run is not None:
        self.app.push_screen(DashboardScreen(events=read_events(run.path)))


def old_apply_all(self: DashboardScreen, recorded) -> None:
    for event in recorded:
        if isinstance(event, ev.StepEnded):
            self.apply_steps([event])
        else:
            self.apply(event)


def old_replot(self: RunsScreen, load: bool = True) -> None:
    loss, acc = self.query_one("#overlay-loss", LossPlot), self.query_one("#overlay-acc", AccuracyPlot)
    loss.reset()
    acc.reset()
    for run in self.runs:
        if run.run_id in self.selected:
            label = f"{run.config.strategy} {run.run_id[9:15]}"
            for event in read_events(run.path):
                if isinstance(event, ev.StepEnded):
                    loss.add(label, event.global_step, event.loss)
                elif isinstance(event, ev.EpochEnded):
                    acc.add(label, event.epoch, event.test_acc)


def old_path(stack: ExitStack) -> None:
    stack.enter_context(mock.patch.object(RunsScreen, "action_open", old_open))
    stack.enter_context(mock.patch.object(RunsScreen, "_replot", old_replot))
    stack.enter_context(mock.patch.object(DashboardScreen, "apply_all", old_apply_all))


# -- measuring -----------------------------------------------------------------------------------

def fully_plotted(plot: LossPlot, steps: int) -> bool:
    """Every step is in the plot's data, and the figure of that data is the one on screen."""
    done = plot.raw and sum(sum(b.counts) for b in plot.raw.values()) == steps
    return bool(done) and not plot.dirty and plot._cache is not None and plot._cache[0][0] == plot.version


class Frames:
    """When the app output frames: the first after a key, the first with the whole loss plot."""

    def __init__(self, app: TransferLabApp, steps: int):
        self.app, self.steps = app, steps
        self.plot_of = None  # screen -> its loss plot, while a key is measured
        self.first = self.plotted = None
        display = app._display

        def record(screen, renderable):
            display(screen, renderable)
            if renderable is None or self.plot_of is None:
                return
            now = time.perf_counter()
            plot = self.plot_of(screen)
            if self.first is None and plot is not None:
                self.first = now
            if self.plotted is None and plot is not None and fully_plotted(plot, steps):
                self.plotted = now

        app._display = record

    async def measure(self, key: str, plot_of) -> tuple:
        self.first = self.plotted = None
        self.plot_of = plot_of
        start = time.perf_counter()
        self.app.post_message(events.Key(key, " " if key == "space" else None))
        while self.plotted is None:
            assert time.perf_counter() - start < 120, "never fully plotted"
            await asyncio.sleep(0.005)
        self.plot_of = None
        return self.first - start, self.plotted - start


async def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        assert time.perf_counter() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def bench(runs_dir: Path, steps: int, repeat: int) -> dict:
    app = TransferLabApp(RunConfig(dataset="digits", pretrained="none", device="cpu", runs_dir=str(runs_dir)))
    results = {"open (enter)": [], "overlay (space)": []}
    async with app.run_test(size=(100, 32)) as pilot:
        frames = Frames(app, steps)
        await pilot.pause()
        await pilot.press("f3")
        await wait_for(lambda: isinstance(app.screen, RunsScreen) and app.screen.runs)
        runs = app.screen
        for _ in range(repeat):
            results["open (enter)"].append(await frames.measure(
                "enter", lambda s: s.query_one(LossPlot) if isinstance(s, DashboardScreen) else None))
            await pilot.press("escape")
            await wait_for(lambda: app.screen is runs)
            runs.curves.clear()  # read the file again each time, as the first time
            results["overlay (space)"].append(await frames.measure(
                "space", lambda s: s.query_one("#overlay-loss", LossPlot) if s is runs else None))
            await pilot.press("space")  # unselect
            await pilot.pause(0.3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="transferlab-replay-") as tmp:
        write_long_run(Path(tmp) / "runs", steps=args.steps)
        table = {}
        for name in ("old", "new"):
            print(f"{name} path: {args.repeat} x (enter, space) on a run of {args.steps:,} steps...", flush=True)
            with ExitStack() as stack:
                if name == "old":
                    old_path(stack)
                table[name] = asyncio.run(bench(Path(tmp) / "runs", args.steps, args.repeat))
    print(f"\nkey -> first frame / key -> fully plotted, {args.steps:,} steps (median of {args.repeat}, "
          f"all in s; target: the screen responds within 0.5 s):")
    for action in table["new"]:
        for name in ("old", "new"):
            times = table[name][action]
            first = statistics.median(t[0] for t in times)
            plotted = statistics.median(t[1] for t in times)
            print(f"  {action:<16} {name}: first frame {first:6.2f}   fully plotted {plotted:6.2f}   "
                  f"(each: {', '.join(f'{a:.2f}/{b:.2f}' for a, b in times)})")


if __name__ == "__main__":
    main()
