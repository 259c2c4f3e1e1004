"""Changes at the next epoch boundary (issue 9.5): more or fewer epochs, learning rates scaled,
asked from the dashboard or from another process; applied between epochs, recorded in
metrics.jsonl, config.json and settings-history.jsonl, and kept by a resume."""
import json
import threading

from core import events as ev
from core.config import RunConfig
from core.runner import Local, attach
from core.store import read_events, read_run


def tiny(tmp_path, **changes):
    cfg = RunConfig(dataset="digits", pretrained="none", image_size=16, batch_size=16, epochs=2, limit_train=64,
                    limit_test=32, device="cpu", runs_dir=str(tmp_path / "runs"))
    return cfg.replace(**changes)


def asking(cfg, *changes):
    """A Local run of `cfg` that asks each of `changes` (Run.change's arguments) after its first step."""
    def ask(event):
        if isinstance(event, ev.StepEnded) and (event.epoch, event.step) == (1, 1):
            for change in changes:
                run.change(**change)

    run = Local(cfg, listeners=[ask])
    return run


def test_epochs_and_learning_rates_change_after_the_epoch_they_are_asked_in(tmp_path):
    run = asking(tiny(tmp_path), dict(epochs=3, lr_scale=0.5))
    result = run.run()
    assert result.status == ev.COMPLETED and result.epochs_done == 3
    events = read_events(run.run_dir)
    (changed,) = [e for e in events if isinstance(e, ev.SettingsChanged)]
    assert changed.epoch == 1 and changed.summary == "epochs 2 -> 3; learning rates x0.5 (lr 0.0005)"
    lrs = {e.epoch: e.lrs["all"] for e in events if isinstance(e, ev.StepEnded)}
    assert lrs == {1: 0.001, 2: 0.0005, 3: 0.0005}
    config = json.loads((run.run_dir / "config.json").read_text())
    assert (config["epochs"], config["lr"]) == (3, 0.0005)
    (line,) = (run.run_dir / "settings-history.jsonl").read_text().splitlines()
    assert json.loads(line)["after_epoch"] == 1 and json.loads(line)["config"] == config
    summary = read_run(run.run_dir).summary
    assert (summary["epochs"], summary["epochs_done"], summary["lr"]) == (3, 3, 0.0005)


def test_fewer_epochs_never_below_the_epoch_done_and_from_another_process(tmp_path):
    """A request through the run's folder (as `transferlab`'s dashboard in another process makes
    it): 1 epoch asked during epoch 1 of 3: the run ends after epoch 1."""
    box = []

    def ask(event):
        if isinstance(event, ev.StepEnded) and event.epoch == 1 and event.step == 1:
            attach(box[0].run_dir).change(epochs=1)

    run = Local(tiny(tmp_path, epochs=3, limit_train=320), listeners=[ask])
    box.append(run)
    result = run.run()
    assert result.status == ev.COMPLETED and result.epochs_done == 1
    (changed,) = [e for e in read_events(run.run_dir) if isinstance(e, ev.SettingsChanged)]
    assert changed.summary == "epochs 3 -> 1"
    assert not (run.run_dir / "change.json").exists()


def test_a_resumed_run_keeps_the_changed_settings(tmp_path):
    """Stopped after the change: the resume trains to the new epochs at the new learning rate."""
    box = []

    def ask_then_stop(event):
        if isinstance(event, ev.StepEnded) and (event.epoch, event.step) == (1, 1):
            box[0].change(epochs=3, lr_scale=0.1)
        if isinstance(event, ev.StepEnded) and (event.epoch, event.step) == (2, 2):
            box[0].stop()

    run = Local(tiny(tmp_path), listeners=[ask_then_stop])
    box.append(run)
    assert run.run().status == ev.STOPPED
    resumed = Local(resume=run.run_dir)
    result = resumed.run()
    assert result.status == ev.COMPLETED and result.epochs_done == 3
    events = ev.as_one_run(read_events(run.run_dir))
    steps = [e for e in events if isinstance(e, ev.StepEnded)]
    assert {round(s.lrs["all"], 10) for s in steps if s.epoch > 1} == {0.0001}
    assert [s.global_step for s in steps] == list(range(1, 3 * 4 + 1))


async def test_the_dashboard_asks_for_more_epochs_with_plus(tmp_path):
    from test_tui import start_run, wait_until
    from tui.app import TransferLabApp

    app = TransferLabApp(tiny(tmp_path, epochs=1, limit_train=480, batch_size=8))
    async with app.run_test(size=(100, 32)) as pilot:
        await start_run(pilot, lambda: app.live is not None and app.live.status == "running")
        dash = app.screen
        await pilot.press("plus")
        await pilot.press("plus")
        await wait_until(pilot, lambda: app.live.status == ev.COMPLETED, timeout=300)
        log = "".join(line.text for line in dash.query_one("#log").lines)
        assert "asked: 3 epochs from the next epoch boundary" in log
        assert "after epoch 1: epochs 1 -> 3" in log
    (run,) = [r for r in (tmp_path / "runs").iterdir()]
    assert read_run(run).summary["epochs_done"] == 3


def test_unfreeze_now_makes_a_frozen_backbone_train_from_the_next_epoch(tmp_path):
    run = asking(tiny(tmp_path, strategy="frozen", lr_backbone=0.0002), dict(unfreeze=True))
    assert run.run().status == ev.COMPLETED
    events = read_events(run.run_dir)
    (changed,) = [e for e in events if isinstance(e, ev.SettingsChanged)]
    assert changed.summary == "the backbone trains from epoch 2 at lr 0.0002"
    groups = {e.epoch: sorted(e.lrs) for e in events if isinstance(e, ev.StepEnded)}
    assert groups == {1: ["head"], 2: ["backbone", "head"]}
    assert json.loads((run.run_dir / "config.json").read_text())["unfreeze_epoch"] == 2


def test_a_change_that_would_make_the_settings_invalid_is_refused_and_the_run_stays_readable(tmp_path):
    """Fewer epochs than the warmup, learning rates scaled down to 0: each refused at the
    boundary in validate's words (config.json must stay valid: the runs list and a resume read it)."""
    run = asking(tiny(tmp_path, warmup_epochs=2.0), dict(epochs=1), dict(lr_scale=1e-200),
                 dict(lr_scale=1e-200))  # scales multiply: 1e-400 is 0.0
    result = run.run()
    assert result.status == ev.COMPLETED and result.epochs_done == 2
    (changed,) = [e for e in read_events(run.run_dir) if isinstance(e, ev.SettingsChanged)]
    assert changed.summary == ("epochs 2 -> 1 refused: warmup_epochs must be between 0 and epochs (1), got 2.0; "
                               "learning rates x0 (lr 0) refused: lr must be a positive number, got 0.0")
    record = read_run(run.run_dir)
    assert not record.unreadable and (record.config.epochs, record.config.lr) == (2, 0.001)


async def test_after_a_refused_change_plus_counts_from_the_runs_epochs(tmp_path):
    """- asks 2 epochs of a run whose warmup lasts 3: refused at the boundary; + then asks 4 (from
    the run's 3 epochs, not from the 2 asked before)."""
    from test_tui import start_run, wait_until
    from tui.app import TransferLabApp

    app = TransferLabApp(tiny(tmp_path, epochs=3, warmup_epochs=3.0, limit_train=96, batch_size=8))
    async with app.run_test(size=(100, 32)) as pilot:
        await start_run(pilot, lambda: app.live is not None and app.live.status == "running")
        dash = app.screen
        await pilot.press("minus")
        log = lambda: "".join(line.text for line in dash.query_one("#log").lines)
        await wait_until(pilot, lambda: "refused" in log(), timeout=300)
        await pilot.press("plus")
        await wait_until(pilot, lambda: app.live.status == ev.COMPLETED, timeout=300)
        assert "asked: 4 epochs from the next epoch boundary" in log()
    (run,) = [r for r in (tmp_path / "runs").iterdir()]
    assert read_run(run).summary["epochs_done"] == 4


def test_unfreeze_asked_during_the_last_epoch_says_there_is_none_left(tmp_path):
    """The dashboard logs "asked: the backbone unfrozen"; the boundary must answer it."""
    run = asking(tiny(tmp_path, strategy="frozen", epochs=1), dict(unfreeze=True))
    assert run.run().status == ev.COMPLETED
    (changed,) = [e for e in read_events(run.run_dir) if isinstance(e, ev.SettingsChanged)]
    assert changed.summary == "unfreeze: no epoch left to train" and changed.config["unfreeze_epoch"] == 0
