"""SVG snapshots of the main screens (pytest-textual-snapshot), from runs recorded in tests/data."""
import pytest

from core.config import RunConfig
from tui.app import TransferLabApp

from conftest import ROOT

RUNS = "tests/data/runs"  # relative, so the pictures do not depend on where the repo lives


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


def make_app():
    cfg = RunConfig(dataset="digits", pretrained="none", image_size=32, device="cpu", runs_dir=RUNS)
    return TransferLabApp(cfg, ["CIFAR-10 is not in data/cifar-10-batches-py: using the built-in digits data."])


def test_form(snap_compare):
    async def ready(pilot):
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=(100, 30), run_before=ready)


def test_form_80x24_with_errors(snap_compare):
    async def broken(pilot):
        await pilot.pause()
        pilot.app.screen.query_one("#f-lr").value = "-1"
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=broken)


def test_dashboard_after_a_run(snap_compare):
    async def open_run(pilot):
        await pilot.pause()
        await pilot.press("f3")
        await pilot.pause()
        await pilot.press("down", "enter")  # the older run: finetune
        await pilot.pause(0.5)

    assert snap_compare(make_app(), terminal_size=(100, 32), run_before=open_run)


def test_runs_overlay(snap_compare):
    async def overlay(pilot):
        await pilot.pause()
        await pilot.press("f3")
        await pilot.pause()
        await pilot.press("space", "down", "space")
        await pilot.pause(0.5)

    assert snap_compare(make_app(), terminal_size=(110, 32), run_before=overlay)
