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
