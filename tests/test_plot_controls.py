"""The plots' controls (y log y, m smoothing, w window, t steps/epochs, c curves) and the dashboard's
exports (P the plots as SVG and PNG, C the metrics as CSV), on a replayed recorded run."""
import subprocess
import sys
import xml.etree.ElementTree as ET

import core.plots_export
from core import events as ev
from core.config import RunConfig
from core.export import write_metrics_csv
from core.plotdata import EpochPoint, PlotControls, RunCurves, loss_curves
from core.store import read_events
from tui.app import TransferLabApp
from tui.dashboard import DashboardScreen
from tui.dialogs import CurvesScreen
from tui.keybar import KeyBar
from tui.plots import AccuracyPlot, Buckets, LossPlot, LrPlot
from tui.runs import RunsScreen

from conftest import ROOT, cli_env, write_long_run
from test_tui import wait_until
from test_tui_threads import reference_buckets

STEPS, EPOCHS = 3000, 10  # 300 steps per epoch


def ema(values, keep):
    """The smoothing written out independently: the first value, then keep x last + (1 - keep) x value."""
    out, last = [], None
    for value in values:
        last = value if last is None else keep * last + (1 - keep) * value
        out.append(last)
    return out


def recorded(run_dir):
    events = ev.as_one_run(read_events(run_dir))
    steps = [e for e in events if isinstance(e, ev.StepEnded)]
    return [s.global_step for s in steps], [s.loss for s in steps], [e for e in events if isinstance(e, ev.EpochEnded)]


async def replay(pilot, app, run_dir):
    screen = DashboardScreen(run_dir=run_dir)
    await app.push_screen(screen)
    await wait_until(pilot, lambda: screen.status == ev.COMPLETED, timeout=30)
    await pilot.pause()
    return screen


def reduced(xs, ys):
    """Bucket means as the plots reduce a series (the copy of the old code in test_tui_threads)."""
    out = reference_buckets(list(zip(xs, ys)))
    return out[0], out[1]


def test_loss_curves_follow_the_controls():
    """Each control changes the curves as computed independently here."""
    steps = list(range(1, 1201))
    losses = [2.0 / (1 + s / 100) + (s % 7) * 0.01 - (0.5 if s % 97 == 0 else 0.0) for s in steps]
    run = RunCurves(steps_per_epoch=400)
    run.extend(steps[:500], losses[:500])
    run.extend(steps[500:], losses[500:])  # in two goes, as a live run delivers them
    run.epochs = [EpochPoint(e, 400 * e, 0.9 / e, 1.0 / e, 0.5, 0.4) for e in (1, 2, 3)]
    big = 10_000  # no reduction: every point
    curves = loss_curves(run, PlotControls(hidden=frozenset()), big)
    assert curves["raw"] == (steps, losses) and curves["smoothed"] == (steps, ema(losses, 0.9))
    assert curves["test loss"] == ([400, 800, 1200], [1.0, 0.5, 1 / 3])
    assert curves["train loss"] == ([400, 800, 1200], [0.9, 0.45, 0.3])
    for strength, keep in (("off", 0.0), ("light", 0.6), ("strong", 0.99)):
        run.resmooth(keep)
        assert loss_curves(run, PlotControls(smoothing=strength), big)["smoothed"] == (steps, ema(losses, keep) if keep
                                                                                        else losses)
    run.resmooth(0.9)
    last = loss_curves(run, PlotControls(window=200), big)
    assert last["raw"] == (steps[-200:], losses[-200:])
    assert last["smoothed"] == (steps[-200:], ema(losses, 0.9)[-200:])  # smoothed over the run, then cut
    assert last["test loss"] == ([1200], [1 / 3]) and "train loss" not in last  # hidden by default
    shown = loss_curves(run, PlotControls(window=200), Buckets.SIZE)
    assert shown["raw"] == reduced(steps[-200:], losses[-200:])
    epochs = loss_curves(run, PlotControls(x_axis="epoch"), big)
    assert epochs["raw"] == ([s / 400 for s in steps], losses) and epochs["test loss"][0] == [1, 2, 3]
    log = loss_curves(run, PlotControls(log_y=True), big)
    assert log["raw"][1] == [v for v in losses if v > 0] and min(losses) <= 0
    off = loss_curves(run, PlotControls(hidden=frozenset({"raw", "test loss"})), big)
    assert set(off) == {"smoothed", "train loss"}


async def test_each_key_changes_what_is_drawn_and_the_state_is_kept(tmp_path):
    run_dir = write_long_run(tmp_path / "runs", steps=STEPS, epochs=EPOCHS)
    steps, losses, epochs = recorded(run_dir)
    app = TransferLabApp(RunConfig(dataset="digits", pretrained="none", device="cpu", runs_dir=str(tmp_path / "runs")))
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause()
        dash = await replay(pilot, app, run_dir)
        loss, lr, acc = dash.query_one(LossPlot), dash.query_one(LrPlot), dash.query_one(AccuracyPlot)
        bar = str(dash.query_one(KeyBar).render())
        assert all(k in bar for k in ("y Log y", "c Curves", "m Smoothing", "w Window", "P Plots export"))
        def drawn(plot):  # what plotext was given to draw: labelled line -> (xs, ys) (their dots have no label)
            m = plot.plt.monitor
            return {label: xy for label, xy in zip(m.label, zip(m.x, m.y)) if label is not None}

        assert set(drawn(loss)) == {"raw", "smoothed", "test loss"} and loss.plt.monitor.yscale[0] == "linear"

        await pilot.press("m")  # medium -> strong: smoothed again from every recorded step
        assert drawn(loss)["smoothed"] == reduced(steps, ema(losses, 0.99)) and "smoothing strong" in loss.heading()
        await pilot.press("w")  # the last 200 steps
        assert drawn(loss)["raw"] == reduced(steps[-200:], losses[-200:])
        assert drawn(loss)["smoothed"] == reduced(steps[-200:], ema(losses, 0.99)[-200:])
        assert drawn(loss)["test loss"] == ([STEPS], [epochs[-1].test_loss])
        await pilot.press("t")  # x in epochs
        assert drawn(loss)["raw"][0] == [x / (STEPS // EPOCHS) for x in reduced(steps[-200:], losses[-200:])[0]]
        assert loss.plt.monitor.xlabel[0] == "epoch" and loss.title == "loss per epoch"
        await pilot.press("y")
        assert loss.plt.monitor.yscale[0] == "log"
        await pilot.press("l")  # the lr plot: log too
        assert lr.display and lr.plt.monitor.yscale[0] == "log" and "log y · last 200 steps" in lr.heading()
        assert lr.plt.monitor.x[0] == [x / (STEPS // EPOCHS) for x in reduced(steps[-200:], losses[-200:])[0]]
        await pilot.press("l")

        await pilot.press("c")
        assert isinstance(app.screen, CurvesScreen)
        await pilot.press("1", "6", "escape")  # raw, test accuracy: off
        assert app.screen is dash and dash.controls.hidden == {"raw", "test acc", "train loss"}
        assert "raw" not in drawn(loss) and set(drawn(acc)) == {"train"}

        controls = dash.controls
        await pilot.press("escape")  # the controls stay for the next run shown
        again = await replay(pilot, app, run_dir)
        assert again.controls == controls and "log y" in again.query_one(LossPlot).heading()
        await pilot.press("escape")
        await pilot.press("f3")  # and on the runs screen's overlay
        runs = app.screen
        assert isinstance(runs, RunsScreen) and runs.query_one("#overlay-loss", LossPlot).controls == controls
        await pilot.press("w")
        assert app.plot_controls.window == 1000 and runs.query_one("#overlay-loss", LossPlot).controls.window == 1000


async def test_the_palette_has_every_plot_key(tmp_path):
    app = TransferLabApp(RunConfig(dataset="digits", pretrained="none", device="cpu", runs_dir=str(tmp_path / "runs")))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f2")
        await pilot.pause()
        commands = {c.title: c for c in app.get_system_commands(app.screen)}
        assert {"Plots: log y", "Plots: curves", "Plots: smoothing", "Plots: window", "Plots: steps/epochs",
                "Plots: plots export", "Plots: csv export"} <= set(commands)
        app.call_later(commands["Plots: smoothing"].callback)  # as the palette runs a command
        await pilot.pause()
        assert app.screen.query_one(LossPlot).controls.smoothing == "strong"
        bar = str(app.screen.query_one(KeyBar).render())
        assert len(bar) <= 78 and "f1 Form" in bar and "f3 Runs" in bar  # the spare keys make room


def svg_texts(path):
    return [el.text or "" for el in ET.parse(path).iter() if el.tag.endswith("text")]


async def test_exports_write_what_is_shown_and_failures_are_one_toast(tmp_path, monkeypatch):
    from PIL import Image

    run_dir = write_long_run(tmp_path / "runs", steps=STEPS, epochs=EPOCHS)
    figures = []
    real_figure = core.plots_export.figure
    monkeypatch.setattr(core.plots_export, "figure", lambda panels: figures.append(real_figure(panels)) or figures[-1])
    monkeypatch.setattr(core.plots_export, "stamp", lambda: "20260101-120000")  # all in the same second
    app = TransferLabApp(RunConfig(dataset="digits", pretrained="none", device="cpu", runs_dir=str(tmp_path / "runs")))
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.pause()
        dash = await replay(pilot, app, run_dir)
        await pilot.press("y", "w")
        toasts = lambda: [n.message for n in app._notifications]  # noqa: E731
        for _ in range(2):  # twice in the same second: the second export does not overwrite the first
            await pilot.press("P")
            await app.workers.wait_for_complete()
            await pilot.pause()
        svgs, pngs = sorted((run_dir / "exports").glob("plots-*.svg")), sorted((run_dir / "exports").glob("*.png"))
        assert len(svgs) == len(pngs) == 2 and len(toasts()) == 2
        assert {line for toast in toasts() for line in toast.splitlines()} == {str(p) for p in svgs + pngs}
        assert svgs[1].name == "plots-20260101-120000.svg" and svgs[0].name == "plots-20260101-120000-2.svg"
        assert any("log y · last 200 steps" in text for text in svg_texts(svgs[1]))
        with Image.open(pngs[1]) as png:
            assert png.format == "PNG" and 800 <= png.size[0] <= 2000 and 300 <= png.size[1] <= 1000
        loss_axes = figures[0].axes[0]
        assert loss_axes.get_yscale() == "log"
        lines = {line.get_label(): line for line in loss_axes.get_lines()}
        expected = loss_curves(dash.query_one(LossPlot).run("run"), dash.controls, core.plots_export.EXPORT_POINTS)
        assert set(lines) == set(expected) == {"raw", "smoothed", "test loss"}
        for name, (xs, ys) in expected.items():
            assert list(lines[name].get_xdata()) == list(xs) and list(lines[name].get_ydata()) == list(ys)
        assert len(expected["raw"][0]) == 200  # the last 200 steps, every one

        await pilot.press("C")
        await app.workers.wait_for_complete()
        await pilot.pause()
        (csv,) = (run_dir / "exports").glob("metrics-*.csv")
        assert str(csv) in toasts()[-1]
        write_metrics_csv(run_dir, tmp_path / "cli.csv")  # what `transferlab export RUN --csv` writes
        assert csv.read_bytes() == (tmp_path / "cli.csv").read_bytes()

        before = len(toasts())
        real_open = open

        def full_disk(path, mode="r", *args, **kwargs):
            if "x" in mode:
                raise OSError(28, "No space left on device")
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr("builtins.open", full_disk)
        await pilot.press("P")
        await app.workers.wait_for_complete()
        await pilot.pause()
        monkeypatch.setattr("builtins.open", real_open)
        (run_dir / "exports").rename(run_dir / "exports.old")
        (run_dir / "exports").write_text("a file where the folder would be")
        await pilot.press("C")
        await app.workers.wait_for_complete()
        await pilot.pause()
        failed = toasts()[before:]
        assert len(failed) == 2 and all(len(t.splitlines()) == 1 and t.startswith("Export failed") for t in failed)
        assert "No space left on device" in failed[0]
        assert len(list((run_dir / "exports.old").glob("plots-*"))) == 4  # nothing left of the failed one
        assert app.screen is dash and dash.is_mounted


def test_matplotlib_is_not_imported_when_the_app_starts():
    code = ("import asyncio, sys\n"
            "from core.config import RunConfig\n"
            "from tui.app import TransferLabApp\n"
            "async def main():\n"
            "    app = TransferLabApp(RunConfig(dataset='digits', pretrained='none', device='cpu', runs_dir='tests/data/runs'))\n"
            "    async with app.run_test(size=(100, 32)) as pilot:\n"
            "        for key in ('f2', 'y', 'f3'):\n"
            "            await pilot.press(key)\n"
            "        await pilot.pause(0.3)\n"
            "asyncio.run(main())\n"
            "print('matplotlib' in sys.modules, 'tui.dashboard' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False True", out.stderr[-2000:]
