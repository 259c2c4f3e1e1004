import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """FlowVision's weight cache points at an empty temporary folder in every test."""
    monkeypatch.setenv("FLOWVISION_CACHE", str(tmp_path_factory.mktemp("fvcache")))


@pytest.fixture
def tiny_cfg(tmp_path):
    """A CPU-sized digits run: ResNet-18, no pretrained weights, small images and subsets."""
    from core.config import RunConfig

    return RunConfig(dataset="digits", pretrained="none", image_size=16, batch_size=16, epochs=1,
                     limit_train=64, limit_test=32, device="cpu", runs_dir=str(tmp_path / "runs"))


def cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env


def transferlab_cmd():
    exe = Path(sys.executable).with_name("transferlab")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tui"]


def write_long_run(runs_dir, steps=20_000, epochs=10, run_id="20260101-000000-finetune-digits"):
    """A finished run folder with `steps` steps, written as the run store writes one (config.json,
    metrics.jsonl of core.events records, summary.json): for replay tests and benchmarks/replay.py."""
    import json
    import math

    from core import events as ev
    from core.config import RunConfig

    cfg = RunConfig(dataset="digits", epochs=epochs)
    path = Path(runs_dir) / run_id
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    per_epoch = steps // epochs
    records = [ev.RunStarted(run_id, str(path), cfg.to_dict(), "cpu", 11_181_642, 11_181_642, 10, 1438, 359,
                             per_epoch)]
    for epoch in range(1, epochs + 1):
        for step in range(1, per_epoch + 1):
            g = (epoch - 1) * per_epoch + step
            loss = 2.3 * math.exp(-g / 4000) + 0.1 * math.sin(g) ** 2
            records.append(ev.StepEnded(epoch, step, g, loss, {"all": 0.001}, 400.0 + g % 17))
        acc = 1 - 0.9 * math.exp(-epoch / 3)
        records.append(ev.EpochEnded(epoch, 0.5, acc, 0.6, acc - 0.05, 12.0))
        records.append(ev.CheckpointSaved(epoch, str(path / "checkpoints" / "last"), "last"))
    records.append(ev.RunFinished(ev.COMPLETED, "", 0.95 - 0.05, acc - 0.05, 120.0 * epochs, epochs))
    with open(path / "metrics.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(ev.to_record(record)) + "\n")
    (path / "summary.json").write_text(json.dumps({
        "run_id": run_id, "status": "completed", "started": 1767225600.0, "pid": 1, "strategy": cfg.strategy,
        "dataset": cfg.dataset, "backbone": cfg.backbone, "epochs": epochs, "lr": cfg.lr,
        "lr_backbone": cfg.lr_backbone, "best_test_acc": acc - 0.05, "final_test_acc": acc - 0.05,
        "epochs_done": epochs, "seconds": 120.0 * epochs, "device": "cpu", "message": ""}, indent=2))
    return path
