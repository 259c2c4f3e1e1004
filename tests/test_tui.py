"""Pilot tests of the Textual app: real runs on tiny digits subsets, in the app's worker."""
import asyncio
import os

import pytest

from textual.widgets import Button, Input, RichLog, Select

from core import events as ev
from core.config import RunConfig
from core.store import list_runs
from core.trainer import train
from tui.app import TransferLabApp
from tui.dashboard import DashboardScreen
from tui.dialogs import ChoiceScreen, ConfirmScreen
from tui.plots import AccuracyPlot, LossPlot
from tui.runs import CompareScreen, RunsScreen

from conftest import ROOT

SIZE = (100, 32)


def tiny(tmp_path, **changes):
    cfg = RunConfig(dataset="digits", pretrained="none", image_size=16, batch_size=16, epochs=1,
                    limit_train=48, limit_test=32, device="cpu", runs_dir=str(tmp_path / "runs"))
    return cfg.replace(**changes)


async def wait_until(pilot, condition, timeout=120.0, poll=0.05):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out"
        await pilot.pause(poll)


async def start_run(pilot, until):
    """Press Start (ctrl+r) on the form, then wait until `until()` holds."""
    await pilot.pause()
    await pilot.press("ctrl+r")
    await wait_until(pilot, until)


def log_text(screen):
    """The dashboard log with all white space removed (the log wraps long lines anywhere)."""
    return "".join("".join(line.text for line in screen.query_one("#log", RichLog).lines).split())


def squash(text):
    return "".join(text.split())


async def test_invalid_values_show_messages_and_block_start(tmp_path):
    app = TransferLabApp(tiny(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        form = app.screen
        form.query_one("#f-lr", Input).value = "-1"
        form.query_one("#f-epochs", Input).value = "two"
        await pilot.pause()
        problems = str(form.query_one("#problems").render())
        assert "epochs must be a whole number, got 'two'" in problems
        assert form.query_one("#start", Button).disabled
        assert form.query_one("#row-epochs").has_class("-invalid")
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert app.live is None and isinstance(app.screen, type(form))
        form.query_one("#f-epochs", Input).value = "1"
        await pilot.pause()
        assert "lr must be a positive number, got -1.0" in str(form.query_one("#problems").render())
        form.query_one("#f-lr", Input).value = "0.01"
        await pilot.pause()
        assert not form.query_one("#start", Button).disabled
        assert "ready to start" in str(form.query_one("#problems").render())
        assert "--lr 0.01" in str(form.query_one("#command").render())


async def test_backbone_lr_only_for_discriminative(tmp_path):
    app = TransferLabApp(tiny(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        form = app.screen
        assert form.query_one("#f-lr_backbone").disabled
        form.query_one("#f-strategy", Select).value = "discriminative"
        await pilot.pause()
        assert not form.query_one("#f-lr_backbone").disabled
        assert "discriminative" in str(form.query_one("#strategy-help").render())
        await wait_until(pilot, lambda: "trainable parameters" in str(form.query_one("#params").render()))


async def test_tiny_run_from_form_to_finished_dashboard(tmp_path):
    app = TransferLabApp(tiny(tmp_path, epochs=2))
    async with app.run_test(size=SIZE) as pilot:
        await start_run(pilot, lambda: app.live is not None and app.live.status == ev.COMPLETED)
        await pilot.pause(0.3)
        dash = app.screen
        assert isinstance(dash, DashboardScreen)
        loss, acc = dash.query_one(LossPlot), dash.query_one(AccuracyPlot)
        assert loss.points() == 6  # 3 steps x 2 epochs
        assert [len(acc.series[k][0]) for k in ("train", "test")] == [2, 2]
        assert squash("final test accuracy 0.") in log_text(dash)
        (run,) = list_runs(tmp_path / "runs")
        assert run.summary["status"] == "completed" and (run.path / "checkpoints" / "best").is_dir()
        assert "completed" in str(dash.query_one("#stats").render())
        # back to the form with the same settings, to tweak and run again
        await pilot.press("e")
        await pilot.pause()
        assert app.screen.query_one("#f-epochs", Input).value == "2"


async def test_graceful_stop_mid_run(tmp_path):
    app = TransferLabApp(tiny(tmp_path, epochs=30, limit_train=32))
    async with app.run_test(size=SIZE) as pilot:
        await start_run(pilot, lambda: app.screen.last_step is not None)
        await pilot.press("s")
        await wait_until(pilot, lambda: app.live.status == ev.STOPPED)
        await app.workers.wait_for_complete()
        (run,) = list_runs(tmp_path / "runs")
        assert run.summary["status"] == "stopped"
        assert (run.path / "checkpoints" / "last" / "meta.json").exists()
        assert run.summary["epochs_done"] < 30
        await pilot.pause(0.2)
        assert squash("stopped") in log_text(app.screen)


async def test_setup_error_is_shown_and_app_stays_usable(tmp_path):
    app = TransferLabApp(tiny(tmp_path, dataset=f"imagefolder:{tmp_path / 'nowhere'}"))
    async with app.run_test(size=SIZE) as pilot:
        await start_run(pilot, lambda: app.live.status == "not started")
        await pilot.pause()
        assert squash("needs a train/ folder") in log_text(app.screen)
        assert not (tmp_path / "runs").exists() or not list_runs(tmp_path / "runs")
        await pilot.press("f1")
        await pilot.pause()
        app.screen.query_one("#f-dataset", Input).value = "digits"
        await start_run(pilot, lambda: app.live.status == ev.COMPLETED)


async def test_exception_inside_the_worker_fails_the_run_not_the_app(tmp_path, monkeypatch):
    import core.trainer

    def exploding(self, epoch):
        raise RuntimeError("simulated crash in the training loop")

    monkeypatch.setattr(core.trainer.Trainer, "_evaluate", exploding)
    app = TransferLabApp(tiny(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await start_run(pilot, lambda: app.live.status == ev.FAILED)
        await pilot.pause(0.2)
        assert squash("simulated crash in the training loop") in log_text(app.screen)
        (run,) = list_runs(tmp_path / "runs")
        assert run.summary["status"] == "failed" and (run.path / "error.txt").exists()
        await pilot.press("f3")
        await pilot.pause()
        assert isinstance(app.screen, RunsScreen) and app.screen.query_one("#runs-table").row_count == 1


async def test_quit_during_a_run_asks_then_stops_gracefully(tmp_path):
    app = TransferLabApp(tiny(tmp_path, epochs=30, limit_train=32))
    async with app.run_test(size=SIZE) as pilot:
        await start_run(pilot, lambda: app.live.status == "running")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Stop run" in titles and "Start run" not in titles
        await pilot.press("ctrl+q")
        await pilot.pause()
        assert isinstance(app.screen, ChoiceScreen)
        await pilot.press("c")  # cancel: nothing happens
        await pilot.pause(0.3)
        assert app.is_running and app.running and not isinstance(app.screen, ChoiceScreen)
        await pilot.press("ctrl+q")
        await pilot.pause()
        await pilot.press("s")
        await wait_until(pilot, lambda: app.live.status == ev.STOPPED)
    (run,) = list_runs(tmp_path / "runs")
    assert run.summary["status"] == "stopped"


def make_runs(tmp_path):
    train(tiny(tmp_path, strategy="finetune"))
    train(tiny(tmp_path, strategy="scratch"))
    return list_runs(tmp_path / "runs")


async def test_runs_screen_lists_overlays_and_compares(tmp_path):
    runs = make_runs(tmp_path)
    app = TransferLabApp(tiny(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Start run" in titles and "Stop run" not in titles
        await pilot.press("f3")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, RunsScreen)
        assert screen.query_one("#runs-table").row_count == 2
        await pilot.press("space", "down", "space")
        await pilot.pause()
        assert screen.selected == {r.run_id for r in runs}
        loss = screen.query_one("#overlay-loss", LossPlot)
        acc = screen.query_one("#overlay-acc", AccuracyPlot)
        await wait_until(pilot, lambda: len(loss.smooth) == 2, timeout=10)  # curves are read in a thread
        assert len(acc.series) == 2
        await pilot.press("c")
        await pilot.pause()
        assert isinstance(app.screen, CompareScreen)
        table = app.screen.query_one("#compare-table")
        assert table.row_count == 2
        finetune_row = [table.get_row_at(i) for i in range(2) if table.get_row_at(i)[0] == "finetune"][0]
        expected = runs[0].summary["final_test_acc"] - runs[1].summary["final_test_acc"]
        assert finetune_row[3] == f"{expected:+.4f}"
        await pilot.press("escape")
        await pilot.press("enter")
        await pilot.pause()
        replay = app.screen
        assert isinstance(replay, DashboardScreen) and replay.pushed and replay.run is None
        await wait_until(pilot, lambda: replay.results, timeout=10)  # metrics are read in a thread
        assert replay.query_one(LossPlot).points() == 3


def test_cli_flags_prefill_the_tui():
    from core.cli import main

    seen = {}

    def fake_launch(cfg, explicit):
        seen["cfg"], seen["explicit"] = cfg, explicit
        return 0

    assert main(["--dataset", "digits", "--epochs", "1"], launch_tui=fake_launch) == 0
    assert seen["cfg"].dataset == "digits" and seen["cfg"].epochs == 1
    assert seen["explicit"] == {"dataset", "epochs"}
    assert main(["tui", "--runs-dir", "elsewhere"], launch_tui=fake_launch) == 0
    assert seen["cfg"].runs_dir == "elsewhere"
    assert main(["--epochs", "x"], launch_tui=fake_launch) == 2


def test_machine_defaults_keep_what_the_user_gave(monkeypatch, tmp_path):
    import core.suggest as S

    monkeypatch.setattr(S, "reachable", lambda url, timeout=2.0: False)
    cfg, notes = S.machine_defaults(RunConfig(data_root=str(tmp_path)))
    assert (cfg.dataset, cfg.pretrained, cfg.image_size) == ("digits", "none", S.CPU_IMAGE_SIZE)
    assert len(notes) == 3 and "cifar-10-python.tar.gz" in notes[0] and "offline" in notes[1]
    kept, notes = S.machine_defaults(RunConfig(data_root=str(tmp_path), image_size=64), keep={"image_size", "dataset"})
    assert (kept.dataset, kept.image_size) == ("cifar10", 64) and len(notes) == 1


async def test_presets_save_and_load_and_bad_files_lose_nothing(tmp_path, monkeypatch):
    from core import config as C

    monkeypatch.chdir(tmp_path)
    app = TransferLabApp(tiny(tmp_path, epochs=4))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause()
        path_input = app.screen.query_one("#path", Input)
        path_input.value = "mine.toml"
        await pilot.press("enter")
        await pilot.pause()
        assert C.load(tmp_path / "mine.toml") == tiny(tmp_path, epochs=4)
        (tmp_path / "other.json").write_text('{"epochs": 9, "strategy": "frozen"}')
        (tmp_path / "broken.json").write_text('{"epochs": "many"}')
        # each of these once ended the app (exit status 0): now a toast, and the form keeps its values
        (tmp_path / "latin1.toml").write_bytes(b"\xff\xfeepochs = 2")
        (tmp_path / "deep.json").write_text("[" * 100_000)
        (tmp_path / "deep.toml").write_text("a = " + "[" * 1_000)
        (tmp_path / "huge.json").write_text('{"lr": 1' + "0" * 400 + "}")
        (tmp_path / "choice.json").write_text('{"epochs": 7, "backbone": "vgg"}')
        form = app.screen
        bad = ("broken.json", "latin1.toml", "deep.json", "deep.toml", "huge.json", "choice.json")
        for name, expected_epochs in [(b, "4") for b in bad] + [("other.json", "9")]:
            await pilot.press("ctrl+o")
            await pilot.pause()
            app.screen.query_one("#path", Input).value = name
            await pilot.press("enter")
            await pilot.pause()
            assert app.is_running and app.screen is form
            assert form.query_one("#f-epochs", Input).value == expected_epochs
        assert form.query_one("#f-strategy", Select).value == "frozen"
        toasts = [str(n.message) for n in app._notifications]
        assert any("not a text file" in t for t in toasts) and any("nested too deeply" in t for t in toasts)
        assert any("lr is too large" in t for t in toasts) and any("backbone must be one of" in t for t in toasts)


async def test_abort_asks_first_then_ends_the_run(tmp_path):
    app = TransferLabApp(tiny(tmp_path, epochs=30, limit_train=32))
    async with app.run_test(size=SIZE) as pilot:
        await start_run(pilot, lambda: app.live.status == "running")
        await pilot.press("a")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await pilot.pause(0.5)
        assert app.live.status == "running"
        await pilot.press("a")
        await pilot.pause()
        await pilot.press("y")
        await wait_until(pilot, lambda: app.live.status == ev.ABORTED)
        await app.workers.wait_for_complete()
    (run,) = list_runs(tmp_path / "runs")
    assert run.summary["status"] == "aborted" and run.summary["epochs_done"] < 30


async def test_screens_are_built_at_start_and_switch_in_one_whole_frame(tmp_path):
    """F2/F3 draw the whole new screen in their first frame, with no 50 ms hold (Textual's default
    after a mode switch is to hold repaints, then draw only the changed widgets over the old screen)."""
    from textual._compositor import LayoutUpdate

    app = TransferLabApp(tiny(tmp_path))
    frames = []
    display = app._display

    def record(screen, renderable):
        if renderable is not None and not app._batch_count:
            frames.append((screen, renderable))
        display(screen, renderable)

    app._display = record
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.mode_screen("dashboard") and app.mode_screen("runs"))
        for key in ("f2", "f3", "f1"):  # the first show of each screen
            await pilot.press(key)
            await pilot.pause()
        for key, screen_type in (("f3", RunsScreen), ("f2", DashboardScreen), ("f3", RunsScreen)):
            frames.clear()
            await pilot.press(key)
            screen, first = frames[0]
            assert isinstance(screen, screen_type)
            assert isinstance(first, LayoutUpdate) and first.region.size == app.size
            await pilot.pause()


class _Node:
    pass


def _old_cycle():
    """A reference cycle in the oldest generation (only a full collection frees it)."""
    import gc
    import weakref

    node = _Node()
    node.self = node
    gc.collect(1)  # survivors of a young collection move to the oldest generation
    return weakref.ref(node)


async def test_garbage_collection_runs_on_the_ui_schedule_and_is_restored(tmp_path, monkeypatch):
    """The app collects garbage itself: young cycles on a short timer, old ones on a long one
    (shortened here); the interpreter's own collector is back on after the app exits."""
    import gc
    import weakref

    import tui.app

    def young_cycle():
        node = _Node()
        node.self = node
        return weakref.ref(node)

    for full_seconds, make in ((1000.0, young_cycle), (0.5, _old_cycle)):
        monkeypatch.setattr(tui.app, "GC_FULL_SECONDS", full_seconds)
        app = TransferLabApp(tiny(tmp_path))
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: not gc.isenabled())
            assert gc.get_freeze_count() > 0
            gone = make()
            await wait_until(pilot, lambda: gone() is None, timeout=10)
        assert gc.isenabled() and gc.get_freeze_count() == 0


def test_full_collection_waits_for_a_pause_in_typing(tmp_path):
    import gc
    import time

    from tui.app import GC_FULL_LATEST_SECONDS, GC_FULL_SECONDS, GC_KEYS_QUIET_SECONDS

    app = TransferLabApp(tiny(tmp_path))
    gc.disable()
    try:
        now = time.monotonic()
        for last_full, last_key, collected in (
                (now - GC_FULL_SECONDS - 1, now, False),  # due, but a key was just pressed
                (now - GC_FULL_SECONDS - 1, now - GC_KEYS_QUIET_SECONDS - 1, True),  # due and quiet
                (now - GC_FULL_LATEST_SECONDS - 1, now, True),  # typing, but overdue
                (now - 1, now - 100, False)):  # quiet, but not due
            gone = _old_cycle()
            app._last_full_gc, app._last_key = last_full, last_key
            app._collect()
            assert (gone() is None) == collected
            gc.collect()
    finally:
        gc.enable()


async def test_plots_draw_exactly_what_plotext_draws(tmp_path):
    """The plots turn plotext's character grid into text directly: same characters, same colours
    as decoding the ANSI canvas that plotext builds (what PlotextPlot shows)."""
    from rich.text import Text

    app = TransferLabApp(tiny(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        await pilot.pause()
        loss, acc = app.screen.query_one(LossPlot), app.screen.query_one(AccuracyPlot)
        for step in range(400):
            loss.add("run", step, 2.0 / (1 + step) + (step % 7) * 0.01)
        for epoch, (train_acc, test_acc) in enumerate([(0.3, 0.25), (0.6, 0.5), (0.8, 0.7)], 1):
            acc.add("train", epoch, train_acc)
            acc.add("test", epoch, test_acc)
        for plot in (loss, acc):
            plot.redraw_now()
            ours = plot.build_text()
            theirs = Text.from_ansi(plot.plt.build())
            assert ours.plain == theirs.plain
            styles = [ours.get_style_at_offset(app.console, i) for i in range(len(ours))]
            assert styles == [theirs.get_style_at_offset(app.console, i) for i in range(len(theirs))]
            assert len({style.color for style in styles}) >= 3  # axes and at least two curves


def test_the_app_ending_on_an_error_exits_non_zero(tmp_path, monkeypatch):
    """run_app (what `transferlab` runs) returns Textual's return code: 1 after an unhandled error."""
    from tui import app as app_module

    def broken_mount(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(TransferLabApp, "on_mount", broken_mount)
    headless(monkeypatch)
    monkeypatch.setattr("core.suggest.machine_defaults", lambda cfg, keep=(): (cfg, []))
    assert app_module.run_app(tiny(tmp_path), set()) == 1


def headless(monkeypatch):
    """TransferLabApp.run_async without a terminal (as run_test does), for tests of run_app."""
    real = TransferLabApp.run_async
    monkeypatch.setattr(TransferLabApp, "run_async", lambda self: real(self, headless=True, size=SIZE))


async def test_unreadable_runs_show_as_such_and_their_keys_give_a_toast(tmp_path):
    import shutil

    from conftest import ROOT

    runs = tmp_path / "runs"
    recorded = sorted((ROOT / "tests" / "data" / "runs").iterdir())
    for src in recorded:
        shutil.copytree(src, runs / src.name)
    bad = runs / "20261129-235959-finetune-digits"  # the newest: first in the table
    shutil.copytree(recorded[1], bad)
    (bad / "config.json").write_text('{"epochs": "many"}')
    (bad / "metrics.jsonl").write_text('{"event": "StepEnded", "loss": "abc"}\n')
    markup = runs / "20261129-000000-[red]x"  # a folder name that is not markup either
    shutil.copytree(recorded[0], markup)
    (markup / "summary.json").write_text("[]")
    app = TransferLabApp(tiny(tmp_path))
    toasts = []
    notify = app.notify
    app.notify = lambda message, **kw: (toasts.append(message), notify(message, **kw))[1]
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("f3")
        await pilot.pause()
        screen = app.screen
        table = screen.query_one("#runs-table")
        assert table.row_count == 4
        rows = {table.get_row_at(i)[1]: table.get_row_at(i) for i in range(4)}
        assert rows[bad.name][7] == "unreadable" and rows[bad.name][2] == "?"
        assert rows[recorded[1].name][7] == "completed"
        assert rows["20261129-000000-\\[red]x"][7] == "unreadable"  # shown as it is named
        assert table.get_row_at(0)[1] == bad.name and table.cursor_row == 0
        for key in ("space", "enter", "e"):
            await pilot.press(key)
            await pilot.pause()
            assert app.screen is screen
        assert screen.selected == set()
        why = f"{bad.name} is unreadable: config.json: epochs must be a whole number, got 'many'"
        assert toasts.count(why) == 3
        await pilot.press("c")  # compares the readable runs
        await pilot.pause()
        assert isinstance(app.screen, CompareScreen) and app.screen.query_one("#compare-table").row_count == 2


async def test_a_run_folder_that_cannot_be_written_is_a_could_not_start(tmp_path, monkeypatch):
    import errno
    import os

    from core import store

    real = store.write_bytes

    def read_only_config(fd, data):
        if "/.config.json." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real(fd, data)

    monkeypatch.setattr(store, "write_bytes", read_only_config)
    app = TransferLabApp(tiny(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await start_run(pilot, lambda: app.live.status == "not started")
        await pilot.pause()
        assert squash("cannot write the run folder") in log_text(app.screen)
        assert squash("Read-only file system") in log_text(app.screen)
        assert list(os.scandir(tmp_path / "runs")) == []


def run_app_with(monkeypatch, cfg, script):
    """run_app(cfg) headless, with `script(app, pilot)` at the keys; returns (exit status, app)."""
    from tui import app as app_module

    seen = {}
    real = TransferLabApp.run_async

    async def auto_pilot(pilot):
        seen["app"] = pilot.app
        await script(pilot.app, pilot)

    monkeypatch.setattr(TransferLabApp, "run_async",
                        lambda self: real(self, headless=True, size=SIZE, auto_pilot=auto_pilot))
    monkeypatch.setattr("core.suggest.machine_defaults", lambda cfg, keep=(): (cfg, []))
    monkeypatch.setattr(app_module, "redirect_output", lambda path: seen.setdefault("redirected", path))
    monkeypatch.setattr(app_module, "exit_when_the_run_ends", lambda app: seen.setdefault("watchdog", True))
    return app_module.run_app(cfg, set()), seen


LONGER = dict(epochs=3, limit_train=288)  # long enough to be running when the interface ends


def test_keep_training_in_the_background_ends_the_interface_and_the_run_completes(tmp_path, monkeypatch):
    async def script(app, pilot):
        await start_run(pilot, lambda: app.live.status == "running")
        await pilot.press("ctrl+q")
        await pilot.pause()
        await pilot.press("b")

    code, seen = run_app_with(monkeypatch, tiny(tmp_path, **LONGER), script)
    (run,) = list_runs(tmp_path / "runs")
    assert code == 0 and run.summary["status"] == "completed" and run.summary["epochs_done"] == 3
    live = seen["app"].live
    assert live.status == "running" and live.result.status == ev.COMPLETED  # the interface had ended first
    assert seen["redirected"] == str(run.path / "output.log")


def test_losing_the_terminal_ends_the_interface_and_the_run_completes(tmp_path, monkeypatch):
    import signal

    async def script(app, pilot):
        await start_run(pilot, lambda: app.live.status == "running")
        os.kill(os.getpid(), signal.SIGHUP)

    code, seen = run_app_with(monkeypatch, tiny(tmp_path, **LONGER), script)
    (run,) = list_runs(tmp_path / "runs")
    assert code == 0 and run.summary["status"] == "completed" and run.summary["epochs_done"] == 3
    assert seen["app"].lost_terminal and seen["app"].live.status == "running" and seen["watchdog"]


def test_an_error_in_the_interface_stops_the_run_with_a_checkpoint_and_says_why(tmp_path, monkeypatch):
    async def script(app, pilot):
        await start_run(pilot, lambda: app.live.status == "running")
        app.call_later(lambda: 1 / 0)  # an unhandled error in the interface

    code, seen = run_app_with(monkeypatch, tiny(tmp_path, **LONGER), script)
    (run,) = list_runs(tmp_path / "runs")
    assert code == 1
    assert run.summary["status"] == "stopped" and "the interface ended on an error" in run.summary["message"]
    assert (run.path / "checkpoints" / "last" / "meta.json").exists()


async def test_keys_and_the_quit_dialog_fit_80_columns(tmp_path):
    from tui.keybar import KeyBar

    # aborted below: a run far longer than the test (LONGER's 3 epochs ended under the dialog once)
    app = TransferLabApp(tiny(tmp_path, **{**LONGER, "epochs": 100}))
    async with app.run_test(size=(80, 24)) as pilot:
        await start_run(pilot, lambda: app.live.status == "running")
        bar = str(app.screen.query_one(KeyBar).render())
        # with every dashboard key shown, f1 f2 f3 lose their words (tui/keybar.py), no key is cut off
        assert len(bar) <= 78 and all(k in bar for k in ("s Stop", "a Abort", "i Classes", "f1", "f3", "^q Quit"))
        await pilot.press("ctrl+q")
        await pilot.pause()
        dialog = app.screen
        assert isinstance(dialog, ChoiceScreen)
        for button in dialog.query("Button"):
            label = str(button.label)
            assert button.region.right <= 80 and button.size.width >= len(label), label
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, ChoiceScreen) and app.running
        app.live.run.abort()
        await app.workers.wait_for_complete()
        for mode, keys in (("form", ("^r Start", "^e Experiment", "^l LR", "f3")),
                           ("runs", ("space Select", "x Experiment", "R Resume", "f1", "f2", "f3"))):
            await app.switch_mode(mode)
            await pilot.pause()
            bar = str(app.screen.query_one(KeyBar).render())
            assert len(bar) <= 78 and all(k in bar for k in keys), bar


async def test_text_in_square_brackets_is_shown_as_typed_never_read_as_markup(tmp_path, monkeypatch):
    """"[/x]" in a field, a preset or an error once ended the app (MarkupError)."""
    from textual.content import Content

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.toml").write_text('lr = "[/x]"\n')
    app = TransferLabApp(tiny(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        form = app.screen
        form.query_one("#f-data_root", Input).value = "[/x]"
        await pilot.pause()
        assert app.is_running and "--data-root'[/x]'" in squash(str(form.query_one("#command").render()))
        form.query_one("#f-epochs", Input).value = "[b]two[/b]"
        await pilot.pause()
        assert "got '[b]two[/b]'" in str(form.query_one("#problems").render())
        await pilot.press("ctrl+o")
        await pilot.pause()
        app.screen.query_one("#path", Input).value = "m.toml"
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert app.is_running and any("got '[/x]'" in str(n.message) for n in app._notifications)
        for n in app._notifications:  # each toast's text as Textual's Toast.render makes it
            assert "[/x]" in str(Content.from_markup(n.message) if n.markup else Content(n.message))


def test_attach_opens_the_app_on_a_run_or_says_why_not(tmp_path, capsys):
    import shutil

    from core.cli import main

    seen = {}

    def launch(cfg, explicit, attach=None):
        seen.update(runs_dir=cfg.runs_dir, attach=attach)
        return 0

    runs = tmp_path / "runs"
    assert main(["attach", "--runs-dir", str(runs)], launch_tui=launch) == 2
    assert "no run is running in" in capsys.readouterr().err and not seen
    src = sorted((ROOT / "tests" / "data" / "runs").iterdir())[0]
    shutil.copytree(src, runs / src.name)
    assert main(["attach", src.name[:15], "--runs-dir", str(runs)], launch_tui=launch) == 0
    assert seen == {"runs_dir": str(runs), "attach": runs / src.name}


async def test_the_app_opened_on_a_run_shows_its_dashboard(tmp_path):
    import shutil

    src = sorted((ROOT / "tests" / "data" / "runs").iterdir())[0]
    shutil.copytree(src, tmp_path / "runs" / src.name)
    app = TransferLabApp(tiny(tmp_path), attach=tmp_path / "runs" / src.name)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.results, timeout=30)
        assert app.screen.pushed and app.screen.query_one(LossPlot).points() > 0


def test_killing_the_terminal_mid_run_the_run_completes_and_the_process_exits(tmp_path):
    """In a real terminal (tmux): the pane is killed while the run trains; the run goes on to
    "completed" and the process then exits (a SIGCONT that comes with the hangup once restarted
    Textual's input thread, which spun forever and kept the process alive)."""
    import shutil
    import subprocess
    import time

    from conftest import cli_env, transferlab_cmd

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    sock, runs = f"tl-{os.getpid()}", tmp_path / "runs"
    tmux = ["tmux", "-L", sock]
    cmd = " ".join([*transferlab_cmd(), "tui", "--dataset", "digits", "--pretrained", "none", "--image-size", "16",
                    "--limit-train", "192", "--limit-test", "32", "--batch-size", "16", "--epochs", "2",
                    "--device", "cpu", "--runs-dir", str(runs)])
    env = " ".join(f"{k}={v}" for k, v in cli_env().items() if k == "PYTHONPATH")
    subprocess.run([*tmux, "new-session", "-d", "-x", "100", "-y", "30", f"exec env {env} {cmd}"], check=True)
    try:
        pid = int(subprocess.run([*tmux, "display", "-p", "#{pane_pid}"], capture_output=True, text=True).stdout)

        def wait(condition, what, timeout=120):
            deadline = time.monotonic() + timeout
            while not condition():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                time.sleep(0.2)

        screen = lambda: subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True).stdout
        wait(lambda: "ready to start" in screen(), "the form")
        subprocess.run([*tmux, "send-keys", "C-r"], check=True)
        wait(lambda: any('"StepEnded"' in p.read_text() for p in runs.glob("*/metrics.jsonl")), "a step")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)

    def alive():
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False

    deadline = time.monotonic() + 240
    while alive():
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail("the process did not exit after its run")
        time.sleep(0.5)
    (run,) = list_runs(runs)
    assert run.summary["status"] == "completed" and run.summary["epochs_done"] == 2


def record_starts(app, monkeypatch):
    """app.start_run replaced by a recorder: the form's calls, no run."""
    calls = []

    async def start_run(cfg=None, resume=None, **launch):
        calls.append((cfg, launch))
        return True

    monkeypatch.setattr(app, "start_run", start_run)
    return calls


async def test_launch_options_validate_as_you_type_and_block_start(tmp_path, monkeypatch):
    from core.distributed import DistributedError, check_batch

    app = TransferLabApp(tiny(tmp_path))  # batch size 16
    calls = record_starts(app, monkeypatch)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        form = app.screen
        processes = form.query_one("#f-processes", Input)
        with pytest.raises(DistributedError) as refused:
            check_batch(16, 3)
        for text, message in [("two", "processes must be a whole number, got 'two'"),
                              ("0", "processes must be between 1 and 64, got 0"),
                              ("65", "processes must be between 1 and 64, got 65"),
                              ("3", str(refused.value))]:
            processes.value = text
            await pilot.pause()
            assert squash(message) in squash(str(form.query_one("#problems").render())), text
            assert form.query_one("#start", Button).disabled
            assert form.query_one("#row-processes").has_class("-invalid")
            assert str(form.query_one("#command").render()) == ""
            await pilot.press("ctrl+r")
            await pilot.pause()
            assert calls == []
        processes.value = "4"
        await pilot.pause()
        assert "ready to start" in str(form.query_one("#problems").render())
        assert not form.query_one("#row-processes").has_class("-invalid")
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert [launch for _, launch in calls] == [{"background": True, "processes": 4}]


async def test_several_processes_force_the_background_and_one_gives_the_choice_back(tmp_path):
    from tui.form import BACKGROUND_NOTE

    app = TransferLabApp(tiny(tmp_path))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        form = app.screen
        background, processes = form.query_one("#f-background", Select), form.query_one("#f-processes", Input)
        note, fields = form.query_one("#launch-note"), form.query_one("#fields")
        said = lambda: str(note.render())
        assert background.value is False and not background.disabled and said() == ""
        for chosen in (False, True):
            background.value = chosen
            await pilot.pause()
            processes.value = "2"
            await pilot.pause()
            assert background.value is True and background.disabled and said() == BACKGROUND_NOTE
            assert form.background
            await pilot.pause()
            assert fields.scrollable_content_region.contains_region(note.region)  # scrolled into view
            processes.value = "1"
            await pilot.pause()
            assert background.value is chosen and not background.disabled and said() == ""


async def test_start_passes_the_launch_options_and_the_command_shows_them(tmp_path, monkeypatch):
    app = TransferLabApp(tiny(tmp_path))
    calls = record_starts(app, monkeypatch)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        form = app.screen
        background, processes = form.query_one("#f-background", Select), form.query_one("#f-processes", Input)
        command = lambda: squash(str(form.query_one("#command").render()))
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert "--detach" not in command() and "--nproc-per-node" not in command()
        background.value = True
        await pilot.pause()
        assert command().endswith("--detach")
        await pilot.press("ctrl+r")
        await pilot.pause()
        processes.value = "2"
        await pilot.pause()
        assert "--detach--nproc-per-node2" in command() and "-moneflow.distributed.launch--nproc_per_node2" in command()
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert [launch for _, launch in calls] == [{"background": False, "processes": 1},
                                                   {"background": True, "processes": 1},
                                                   {"background": True, "processes": 2}]
        assert all(cfg == tiny(tmp_path) for cfg, _ in calls)


async def test_loading_settings_leaves_the_launch_options_as_they_were(tmp_path):
    app = TransferLabApp(tiny(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        form = app.screen
        form.query_one("#f-processes", Input).value = "2"
        await pilot.pause()
        form.load_config(tiny(tmp_path, epochs=5, batch_size=32), note="Loaded a preset.")
        await pilot.pause()
        await app.edit_config(tiny(tmp_path, epochs=6, batch_size=8))  # "edit & rerun" from a dashboard
        await pilot.pause()
        assert form.query_one("#f-epochs", Input).value == "6"
        assert form.query_one("#f-processes", Input).value == "2" and form.processes == 2
        assert form.query_one("#f-background", Select).value is True and form.background
        assert "--nproc-per-node2" in squash(str(form.query_one("#command").render()))


async def test_the_classes_row_validates_as_you_type_and_sizes_the_head(tmp_path):
    app = TransferLabApp(tiny(tmp_path, strategy="frozen"))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        form = app.screen
        form.query_one("#f-classes", Input).value = "5-9,7"
        await pilot.pause()
        assert "classes lists 7 more than once" in str(form.query_one("#problems").render())
        assert form.query_one("#row-classes").has_class("-invalid") and form.query_one("#start", Button).disabled
        form.query_one("#f-classes", Input).value = "5-9"
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert not form.query_one("#row-classes").has_class("-invalid") and form.cfg.classes == "5-9"
        assert "--classes 5-9" in str(form.query_one("#command").render())
        assert f"trainable parameters {512 * 5 + 5:,} of" in str(form.query_one("#params").render())


@pytest.mark.parametrize("lr", ["1.7e308", "1e-320"])
async def test_a_valid_but_extreme_learning_rate_does_not_end_the_app_through_its_preview(tmp_path, lr):
    """Both are positive finite numbers (valid); plotext cannot scale an axis to them (inf, and
    ticks that overflow): the preview says so instead of raising in the middle of a repaint."""
    from tui.plots import LrPlot

    app = TransferLabApp(tiny(tmp_path))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        form = app.screen
        form.query_one("#f-lr", Input).value = lr
        await pilot.pause(0.6)
        assert form.problems == [] and app.is_running
        assert "cannot plot these values" in str(form.query_one(LrPlot).render())
        form.query_one("#f-lr", Input).value = "0.01"
        await pilot.pause(0.6)
        assert "cannot plot" not in str(form.query_one(LrPlot).render())


async def test_the_form_holds_every_digit_of_a_setting_it_is_given(tmp_path):
    """A preset's or a flag's lr of 0.000123456789 (or warmup 0.1234567) once showed, and ran, as
    0.000123457 (:g keeps 6 digits); the command shown must run the same values too."""
    from core.cli import command_line

    given = tiny(tmp_path, lr=0.000123456789, warmup_epochs=0.1234567, epochs=2)
    app = TransferLabApp(given)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        form = app.screen
        assert form.cfg == given and form.query_one("#f-lr", Input).value == "0.000123456789"
        form.load_config(given.replace(lr_backbone=1 / 3))
        await pilot.pause()
        assert form.cfg.lr_backbone == 1 / 3
        assert "--lr 0.000123456789 " in command_line(form.cfg)
