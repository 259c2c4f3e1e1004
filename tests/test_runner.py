"""core.runner: one place owns a run's life. Runs started in the background (alone, on two
processes, resumed) from the CLI and from the app, followed by the same dashboard as a run in
the app's own thread."""
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import cli_env, transferlab_cmd
from core import events as ev
from core.config import RunConfig
from core.errors import SetupError
from core.live import pid_alive

TINY = dict(dataset="digits", pretrained="none", image_size=16, limit_train=48, limit_test=32, batch_size=16,
            device="cpu", epochs=1)
LONG = dict(TINY, limit_train=1024, batch_size=8, epochs=2)
"""Long enough (~20 s on 2 cores) to be stopped mid-run."""


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def wait_for(condition, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def runs_in(runs_dir: Path):
    return sorted(p for p in runs_dir.iterdir() if not p.name.startswith("."))


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*transferlab_cmd(), *args], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=600)


def flags(settings: dict):
    out = []
    for key, value in settings.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def test_detach_on_two_processes_then_resume_in_the_background(tmp_path):
    """train --detach --nproc-per-node 2: the launcher and both ranks in the background, one run
    folder, completed; then --resume --detach --epochs 2 continues it in the background, keeping
    the first life's output beside the new one."""
    proc = cli("train", "--detach", "--nproc-per-node", "2", *flags(TINY), "--no-hflip", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"run (\S+) started in the background on 2 processes \(pid (\d+)\)", proc.stdout)
    assert match, proc.stdout
    run_dir, pid = tmp_path / "runs" / match.group(1), int(match.group(2))
    wait_for(lambda: summary(run_dir)["status"] != "running" and not pid_alive(pid), "end of the 2-process run")
    assert summary(run_dir)["status"] == "completed", (run_dir / "output.log").read_text()
    started = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if r["event"] == "RunStarted"]
    assert started[0]["steps_per_epoch"] == 3  # ceil(48 / 16): the global batch
    assert "2 processes (OneFlow's launcher, DDP): batch 16 in all, 8 per process" in started[0]["notes"]
    assert (run_dir / "ranks.log").exists() and "completed after 1 epoch" in (run_dir / "output.log").read_text()

    proc = cli("train", "--resume", run_dir.name, "--detach", "--epochs", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"run {run_dir.name} resumed in the background" in proc.stdout
    wait_for(lambda: summary(run_dir)["status"] != "running" and summary(run_dir)["epochs_done"] == 2,
             "end of the resumed run")
    assert summary(run_dir)["status"] == "completed"
    assert "completed after 2 epoch" in (run_dir / "output.log").read_text()
    assert "completed after 1 epoch" in (run_dir / "output.1.log").read_text()  # the first life's output
    assert runs_in(tmp_path / "runs") == [run_dir] and not list((tmp_path / "runs").glob(".launch-*"))


def test_detach_with_several_nodes_is_refused_in_one_line(tmp_path):
    proc = cli("train", "--detach", "--nproc-per-node", "2", "--nnodes", "2", *flags(TINY), cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "--nnodes" in errors[0], proc.stderr


def test_a_background_run_stopped_before_it_started_ends_its_process(tmp_path):
    """Stop while the child still loads: it is told by a signal and ends; nothing is left."""
    from core.runner import Background

    run = Background(RunConfig(runs_dir=str(tmp_path / "runs"), **TINY))
    errors = []

    def go():
        try:
            run.run()
        except SetupError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=go)
    thread.start()
    wait_for(lambda: run.child is not None, "child", timeout=30)
    run.stop()
    thread.join(120)
    assert not thread.is_alive() and run.done.is_set()
    assert run.child.process.wait(30) in (130, -15)  # its handler, or SIGTERM's default before Python set one
    assert errors == ["stopped before it started: nothing was written"]
    assert runs_in(tmp_path / "runs") == [] and not list((tmp_path / "runs").glob(".launch-*"))


def test_a_background_run_that_cannot_start_is_its_one_line(tmp_path):
    from core.runner import Background

    run = Background(RunConfig(runs_dir=str(tmp_path / "runs"), **dict(TINY, pretrained=str(tmp_path / "nope"))))
    with pytest.raises(SetupError) as caught:
        run.run()
    assert "does not exist" in str(caught.value) and "error:" not in str(caught.value)
    assert runs_in(tmp_path / "runs") == [] and not list((tmp_path / "runs").glob(".launch-*"))


async def test_the_app_starts_a_background_run_follows_stops_and_leaves_one(tmp_path):
    """From the app: a run in the background is shown by the same dashboard (plots, ETA), `s`
    stops it through its folder; a second one keeps training after ctrl+q (no question asked:
    it is not in this process) and completes."""
    from tui.app import TransferLabApp, background_note
    from tui.dashboard import DashboardScreen
    from tui.plots import LossPlot

    cfg = RunConfig(runs_dir=str(tmp_path / "runs"), **LONG)
    app = TransferLabApp(cfg)
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.pause()
        assert await app.start_run(cfg, background=True)
        dash = app.screen
        assert isinstance(dash, DashboardScreen) and not dash.run.here
        assert dash.sub_title == "dashboard (run in another process)"
        plot = dash.query_one(LossPlot)
        deadline = time.monotonic() + 300
        while plot.points() < 2:
            assert time.monotonic() < deadline and app.live.status in ("starting", "running"), app.live.status
            await pilot.pause(0.2)
        assert app.live.status == "running" and "ETA" in str(dash.query_one("#stats").render())
        run_dir = app.live.run.run_dir
        assert app.live.run.pid != os.getpid() and summary(run_dir)["pid"] != os.getpid()
        await pilot.press("s")
        while app.live.status == "running":
            assert time.monotonic() < deadline
            await pilot.pause(0.2)
        assert app.live.status == ev.STOPPED and summary(run_dir)["status"] == "stopped"
        assert not dash.check_action("stop", ())

    shorter = cfg.replace(limit_train=256, epochs=1)  # long enough to be running at ctrl+q
    app = TransferLabApp(shorter)
    ended = []

    async def second_run():
        async with app.run_test(size=(100, 32)) as pilot:
            await pilot.pause()
            await app.start_run(shorter, background=True)
            while app.live.status != "running":
                await pilot.pause(0.2)
            await pilot.press("ctrl+q")
            await pilot.pause(0.5)
            ended.append(not app.is_running)

    await second_run()
    assert ended == [True]  # no dialog: the run is not in this process
    run = app.live.run
    app.live.run.close()
    second = run.run_dir
    assert second != run_dir and summary(second)["status"] == "running"
    assert f"transferlab attach {second.name} --runs-dir" in background_note(run, cfg.runs_dir)
    wait_for(lambda: summary(second)["status"] != "running", "end of the run left in the background")
    assert summary(second)["status"] == "completed"


def test_a_followed_run_gets_its_history_apart_and_an_eta_from_this_life(tmp_path):
    """Attached to a resumed run: its earlier life goes to the history callbacks (what was redone
    after the checkpoint dropped), this life to the listeners from its start; the ETA counts from
    this life's start, not from the first life's (the store's `started` includes that time)."""
    from core.runner import attach
    from test_live import running_run

    run_dir = running_run(tmp_path, heartbeat={})
    cfg = RunConfig(dataset="digits", epochs=2)
    started = ev.RunStarted(run_dir.name, str(run_dir), cfg.to_dict(), "cpu", 10, 10, 10, 100, 10, 20)
    step = lambda n: ev.StepEnded(1, n, n, 1.0 / n, {"all": 0.1}, 100.0)
    lives = [started, step(1), step(2), step(3), ev.RunFinished("stopped", seconds=600.0),
             ev.RunResumed(run_dir.name, 1, 2, 2, 0, 2), started, step(3), step(4)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(ev.to_record(e)) + "\n" for e in lives))
    record = json.loads((run_dir / "summary.json").read_text())
    record["started"] = time.time() - 600.0 - 30.0  # 600 s in the first life, 30 s in this one
    (run_dir / "summary.json").write_text(json.dumps(record))
    history, seen = [], []
    run = attach(run_dir, listeners=[seen.append], history=[history.extend])
    thread = threading.Thread(target=run.run)
    thread.start()
    wait_for(lambda: len(seen) >= 4, "this life's events", timeout=10)
    run.close()
    thread.join(5)
    assert history == [*lives[:3], lives[4]]  # step 3 of the first life was redone after the checkpoint (step 2)
    assert seen == lives[5:]
    assert 25.0 < time.time() - run.started < 40.0
    assert not thread.is_alive() and run.done.is_set() and run.result is None
