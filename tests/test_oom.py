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
