"""Regenerate screenshots/ from real small runs on digits (CPU, a few minutes): `make screenshots`.

1. form.svg, form-80x24.svg: the form as a fresh offline CPU machine opens it.
2. a scratch run trains; its best checkpoint is the "pretrained" backbone of the other strategies
   (a local state-dict source, since ImageNet weights cannot be downloaded here).
3. dashboard-live.svg: the dashboard mid-run (finetune, in the app's worker), with the machine panel.
4. runs-overlay.svg and runs-compare.svg: all four strategies overlaid and compared.
5. insight.svg: the per-class results (heat map, table, most confidently wrong images) of a run.

`python scripts/screenshots.py --demo-runs RUNS` (after `make demo`, RUNS its runs folder) writes
demo-compare.svg instead: the demo's real comparison.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.config import RunConfig  # noqa: E402
from core.suggest import machine_defaults  # noqa: E402
from core.trainer import train  # noqa: E402
from tui.app import TransferLabApp  # noqa: E402
from tui.insight import InsightScreen, WrongCard  # noqa: E402

OUT = ROOT / "screenshots"


async def wait_until(pilot, condition, timeout=600.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError("screenshot run took too long")
        await pilot.pause(0.1)


async def shoot_form(cfg: RunConfig, notes, size, name: str) -> None:
    app = TransferLabApp(cfg, notes)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause(0.3)
        app.save_screenshot(name, str(OUT))


async def shoot_live(cfg: RunConfig) -> None:
    app = TransferLabApp(cfg)
    async with app.run_test(size=(130, 36)) as pilot:  # wide enough for the machine panel's column
        await pilot.pause()
        await pilot.press("ctrl+r")
        dash = lambda: app.screen  # noqa: E731
        await wait_until(pilot, lambda: len(getattr(dash(), "results", [])) >= 1
                         and dash().last_step is not None and dash().last_step.epoch == 2
                         and dash().last_step.step >= 3)
        await pilot.pause(0.5)
        app.save_screenshot("dashboard-live.svg", str(OUT))
        await wait_until(pilot, lambda: app.live.status not in ("starting", "running"))


async def shoot_runs(cfg: RunConfig) -> None:
    app = TransferLabApp(cfg)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.pause()
        await pilot.press("f3")
        await pilot.pause()
        for _ in range(4):
            await pilot.press("space", "down")
        await pilot.pause(0.6)
        app.save_screenshot("runs-overlay.svg", str(OUT))
        await pilot.press("c")
        await pilot.pause(0.3)
        app.save_screenshot("runs-compare.svg", str(OUT))
        await pilot.press("escape")
        await pilot.pause(0.3)
        await pilot.press("i")  # the per-class results of the run under the cursor
        await wait_until(pilot, lambda: isinstance(app.screen, InsightScreen) and app.screen.results is not None
                         and app.screen.query(WrongCard))
        await pilot.pause(0.8)
        app.save_screenshot("insight.svg", str(OUT))


async def shoot_demo(runs_dir: Path) -> None:
    """demo-compare.svg: the runs of `make demo` (the four transfer runs, newest of each strategy
    after the pretraining) overlaid and compared, from its runs folder."""
    from core.report import newest_per_strategy
    from core.store import list_runs
    from tui.runs import CompareScreen

    runs = newest_per_strategy([r for r in list_runs(runs_dir) if not r.unreadable and r.config.classes])
    from core.experiment import ORDER

    transfer = sorted((r for r in runs if r.config.pretrained not in ("none", "imagenet")),
                      key=lambda r: ORDER.index(r.config.strategy))
    app = TransferLabApp(RunConfig(runs_dir=str(runs_dir)))
    async with app.run_test(size=(130, 36)) as pilot:
        await pilot.pause()
        await pilot.press("f3")
        await pilot.pause(0.5)
        app.mode_screen("runs").select_only({r.run_id for r in transfer})
        await pilot.pause(0.8)
        app.push_screen(CompareScreen(transfer, title="make demo: digits 0-4 -> 5-9, 100 images"))
        await pilot.pause(0.5)
        app.save_screenshot("demo-compare.svg", str(OUT))


def main() -> None:
    OUT.mkdir(exist_ok=True)
    if sys.argv[1:2] == ["--demo-runs"]:  # after `make demo`: its comparison only
        asyncio.run(shoot_demo(Path(sys.argv[2]).resolve()))
        print("wrote demo-compare.svg")
        return
    work = Path(tempfile.mkdtemp(prefix="transferlab-shots-"))
    os.chdir(work)  # relative data and runs folders, as a user starting in an empty folder sees them
    try:
        fresh, notes = machine_defaults(RunConfig())
        asyncio.run(shoot_form(fresh, notes, (100, 30), "form.svg"))
        asyncio.run(shoot_form(fresh, notes, (80, 24), "form-80x24.svg"))
        base = RunConfig(dataset="digits", image_size=32, batch_size=32, epochs=3, limit_train=480,
                         limit_test=200, device="cpu", runs_dir="runs")
        scratch = train(base.replace(strategy="scratch", pretrained="none", lr=0.01))
        print("scratch:", scratch.status, scratch.final_test_acc, flush=True)
        (run_dir,) = Path("runs").iterdir()
        source = str(run_dir / "checkpoints" / "best")
        tuned = base.replace(pretrained=source)
        asyncio.run(shoot_live(tuned.replace(strategy="finetune")))
        for strategy, lr in (("discriminative", 0.01), ("frozen", 0.01)):
            result = train(tuned.replace(strategy=strategy, lr=lr))
            print(f"{strategy}:", result.status, result.final_test_acc, flush=True)
        asyncio.run(shoot_runs(base))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("wrote", ", ".join(sorted(p.name for p in OUT.glob("*.svg"))))


if __name__ == "__main__":
    main()
