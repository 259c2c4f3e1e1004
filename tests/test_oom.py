"""Out of (GPU) memory: the run ends "failed" saying so; the CLI prints the same run with half the
batch, the app offers it in one key, showing the new settings first. The error is injected: no
GPU here (the text is OneFlow 0.9's, from its allocator)."""
import json

import pytest

from core import cli
from core import events as ev
from core.store import list_runs

OOM = "Error: CUDA out of memory. Tried to allocate 114.0 MB\nError Type: oneflow.ErrorProto.out_of_memory_error"
TINY = ["--dataset", "digits", "--pretrained", "none", "--image-size", "16", "--batch-size", "16",
        "--limit-train", "48", "--limit-test", "32", "--epochs", "1", "--device", "cpu"]


@pytest.fixture
def out_of_memory(monkeypatch):
    """The first epoch of the next run(s) runs out of memory while `armed` holds something."""
    import core.trainer

    armed = [True]
    real = core.trainer.Trainer._train_epoch

    def epoch(self, *args, **kwargs):
        if armed:
            raise RuntimeError(OOM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(core.trainer.Trainer, "_train_epoch", epoch)
    return armed


def test_the_cli_says_out_of_memory_and_prints_the_half_batch_command(tmp_path, capsys, out_of_memory):
    runs_dir = tmp_path / "runs"
    assert cli.main(["train", *TINY, "--runs-dir", str(runs_dir), "--lr", "0.01"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    (run,) = list_runs(runs_dir)
    assert run.summary["status"] == "failed" and run.summary["message"].startswith("out of memory: ")
    assert "batch of 16 images of 16 px with resnet18" in run.summary["message"]
    (line,) = [line for line in err.splitlines() if line.startswith("the same run with half the batch: ")]
    assert "--batch-size 8" in line and "--lr 0.005" in line and "Traceback" not in err
    assert "out_of_memory_error" in (run.path / "error.txt").read_text()  # the whole text is kept


async def test_the_app_offers_half_the_batch_in_one_key(tmp_path, out_of_memory):
    from test_tui import start_run, tiny, wait_until
    from tui.app import TransferLabApp
    from tui.dialogs import ConfirmScreen

    app = TransferLabApp(tiny(tmp_path, strategy="discriminative"))
    async with app.run_test(size=(100, 32)) as pilot:
        await start_run(pilot, lambda: app.live is not None and app.live.status == ev.FAILED)
        dash = app.screen
        await wait_until(pilot, lambda: dash.check_action("half_batch", ()))
        await pilot.press("h")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        question = app.screen.question
        assert "batch size 8 (was 16)" in question and "learning rate 0.0005 (was 0.001)" in question
        assert "backbone 5e-05 (was 0.0001)" in question
        out_of_memory.clear()
        await pilot.press("y")
        await wait_until(pilot, lambda: app.live.status == ev.COMPLETED)
    first, second = list_runs(tmp_path / "runs")
    assert first.summary["status"] == "failed" and second.summary["status"] == "completed"
    assert (second.config.batch_size, second.config.lr, second.config.lr_backbone) == (8, 0.0005, 0.00005)
    assert {**second.config.to_dict(), "batch_size": 0, "lr": 0, "lr_backbone": 0} == \
        {**first.config.to_dict(), "batch_size": 0, "lr": 0, "lr_backbone": 0}


def test_other_failures_offer_nothing(tmp_path, capsys, monkeypatch):
    import core.trainer

    def epoch(self, *args, **kwargs):
        raise RuntimeError("Error: something else went wrong")

    monkeypatch.setattr(core.trainer.Trainer, "_train_epoch", epoch)
    assert cli.main(["train", *TINY, "--runs-dir", str(tmp_path / "runs")]) == cli.EXIT_FAILED
    assert "half the batch" not in capsys.readouterr().err


def test_half_of_an_odd_batch_scales_the_learning_rates_by_the_batches_ratio(tiny_cfg):
    """The linear scaling rule: 3 -> 1 images per step is a third of the learning rate, not half."""
    from core.trainer import halved

    smaller = halved(tiny_cfg.replace(batch_size=3, lr=0.03, lr_backbone=0.003))
    assert smaller.batch_size == 1
    assert smaller.lr == pytest.approx(0.01) and smaller.lr_backbone == pytest.approx(0.001)
    assert halved(tiny_cfg.replace(batch_size=64, lr=0.01)).lr == pytest.approx(0.005)
    assert halved(tiny_cfg.replace(batch_size=1)) is None



async def an_experiment_out_of_memory(app, pilot, tmp_path):
    """Start an experiment (frozen, scratch) whose first run runs out of memory; wait until it paused."""
    from test_tui import tiny, wait_until

    await pilot.pause()
    assert await app.start_experiment(tiny(tmp_path), ["frozen", "scratch"])
    await wait_until(pilot, lambda: app.experiment is None and app.live is not None
                     and app.live.status == ev.FAILED)


async def press_h(app, pilot):
    """`h` on the dashboard once it offers half the batch; returns once it asks."""
    from test_tui import wait_until
    from tui.dialogs import ConfirmScreen

    dash = app.dashboard
    await wait_until(pilot, lambda: app.screen is dash and dash.check_action("half_batch", ()))
    await pilot.press("h")
    await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))


async def test_in_an_experiment_half_the_batch_runs_the_whole_experiment_again(tmp_path, out_of_memory):
    """Its runs are compared only at one batch size: `h` after a run of an experiment ran out of
    memory starts the experiment again as a new one, every strategy at half the batch (it
    started one run outside the experiment)."""
    from core import experiment as X
    from test_tui import tiny, wait_until
    from tui.app import TransferLabApp

    app = TransferLabApp(tiny(tmp_path))
    async with app.run_test(size=(100, 32)) as pilot:
        await an_experiment_out_of_memory(app, pilot, tmp_path)
        await press_h(app, pilot)
        question = app.screen.question
        (first,) = [exp for _, exp, _ in X.list_experiments(tmp_path / "runs")]
        assert f"experiment {first.id} (frozen, scratch) again" in question and "batch size 8 (was 16)" in question
        out_of_memory.clear()
        await pilot.press("y")
        await wait_until(pilot, lambda: len(X.list_experiments(tmp_path / "runs")) == 2
                         and all(e.complete() for _, e, _ in X.list_experiments(tmp_path / "runs")
                                 if e is not None and e.id != first.id), timeout=300)
    (second,) = [e for _, e, _ in X.list_experiments(tmp_path / "runs") if e.id != first.id]
    assert second.strategies == ["frozen", "scratch"] and second.settings.batch_size == 8
    by_id = {run.run_id: run for run in list_runs(tmp_path / "runs")}
    assert [by_id[second.runs[s]].config.batch_size for s in second.strategies] == [8, 8]
    assert len(by_id) == 3  # the failed run, and the new experiment's two: no run outside it


async def test_half_the_batch_of_an_experiment_stays_in_its_runs_folder(tmp_path, out_of_memory):
    """The new experiment goes where the old one is (its runs folder, as `Experiment.config` says),
    not to the runs folder written in its settings: that one is where it was created, gone when
    the runs folder was moved (or another folder, for a relative path from elsewhere)."""
    from core import experiment as X
    from core.store import atomic_write_json
    from test_tui import tiny, wait_until
    from tui.app import TransferLabApp

    runs, elsewhere = tmp_path / "runs", tmp_path / "moved-from" / "runs"
    app = TransferLabApp(tiny(tmp_path))
    async with app.run_test(size=(100, 32)) as pilot:
        await an_experiment_out_of_memory(app, pilot, tmp_path)
        (first,) = [exp for _, exp, _ in X.list_experiments(runs)]
        data = json.loads((first.path / X.FILE).read_text())
        data["settings"]["runs_dir"] = str(elsewhere)  # created there, then the folder was moved here
        atomic_write_json(first.path / X.FILE, data)
        await press_h(app, pilot)
        await pilot.press("y")  # still out of memory: the new experiment's first run fails at once
        await wait_until(pilot, lambda: len(X.list_experiments(runs)) + len(X.list_experiments(elsewhere)) == 2
                         and app.experiment is None and not app.busy)
    assert not elsewhere.exists()
    assert [e.settings.batch_size for _, e, _ in X.list_experiments(runs)] == [16, 8]
