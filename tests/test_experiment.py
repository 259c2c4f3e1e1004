"""Experiments (core.experiment, `transferlab experiment`): the strategies queued with identical
settings, an interrupted experiment continued, comparisons only of comparable runs."""
import json
import os
import signal

import pytest

from core import cli
from core import experiment as X
from core.store import list_runs, read_run

TINY = ["--dataset", "digits", "--pretrained", "none", "--image-size", "16", "--batch-size", "16",
        "--limit-train", "48", "--limit-test", "32", "--epochs", "1", "--device", "cpu"]


def the_experiment(runs_dir):
    (folder, exp, why), = X.list_experiments(runs_dir)
    assert exp is not None, why
    return exp


def test_two_strategies_run_one_after_another_and_are_compared(tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    code = cli.main(["experiment", *TINY, "--runs-dir", str(runs_dir), "--strategies", "scratch,frozen"])
    out, err = capsys.readouterr()
    assert code == 0, err
    exp = the_experiment(runs_dir)
    assert exp.strategies == ["frozen", "scratch"]  # the tutorial's order: scratch, the baseline, last
    runs = {r.config.strategy: r for r in list_runs(runs_dir)}
    assert sorted(runs) == ["frozen", "scratch"] and exp.runs == {s: r.run_id for s, r in runs.items()}
    for run in runs.values():  # identical settings but the strategy
        assert run.summary["status"] == "completed"
        assert {**run.config.to_dict(), "strategy": "-"} == {**runs["frozen"].config.to_dict(), "strategy": "-"}
    assert "run 1 of 2: frozen" in err and "run 2 of 2: scratch" in err
    diff = runs["frozen"].summary["final_test_acc"] - runs["scratch"].summary["final_test_acc"]
    assert f"{diff:+.4f}" in out and "img/s" in out and "differs" not in out


def test_an_interrupted_experiment_continues_where_it_stopped(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the second run: it stops with a checkpoint and the experiment pauses; --continue
    keeps the completed run, resumes the stopped one in its own folder, and compares."""
    runs_dir = tmp_path / "runs"
    real = X.Recorder.__call__

    def interrupt_scratch(self, event):
        real(self, event)
        if self.strategy == "scratch" and type(event).__name__ == "StepEnded" and event.global_step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C: a graceful stop after this step

    monkeypatch.setattr(X.Recorder, "__call__", interrupt_scratch)
    code = cli.main(["experiment", *TINY, "--runs-dir", str(runs_dir), "--strategies", "frozen,scratch"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_STOPPED, err
    exp = the_experiment(runs_dir)
    assert f"continue it with: transferlab experiment --continue {exp.id}" in err
    frozen, scratch = (read_run(runs_dir / exp.runs[s]) for s in ("frozen", "scratch"))
    assert frozen.summary["status"] == "completed" and scratch.summary["status"] == "stopped"
    frozen_summary = (frozen.path / "summary.json").read_text()

    monkeypatch.setattr(X.Recorder, "__call__", real)
    code = cli.main(["experiment", "--continue", exp.id[-8:], "--runs-dir", str(runs_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "run 1 of 1: scratch (resumed)" in err
    assert the_experiment(runs_dir).runs == exp.runs  # the same two run folders
    assert len(list_runs(runs_dir)) == 2 and (frozen.path / "summary.json").read_text() == frozen_summary
    assert read_run(scratch.path).summary["status"] == "completed"
    assert "RunResumed" in (scratch.path / "metrics.jsonl").read_text()
    assert exp.runs["scratch"] in out and exp.runs["frozen"] in out


def test_a_crafted_experiment_file_is_one_line_and_reads_nothing_outside(tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    folder = runs_dir / X.EXPERIMENTS / "20260101-000000-digits"
    folder.mkdir(parents=True)
    good = {"id": folder.name, "created": 0, "settings": {"dataset": "digits"}, "strategies": ["frozen"], "runs": {}}
    for bad, expected in [({"runs": {"frozen": "../../outside"}}, "runs must map"),
                          ({"strategies": ["frozen", "bogus"]}, "unknown 'bogus'"),
                          ({"settings": {"epochs": -1}}, "epochs"),
                          ({"settings": "x"}, "settings")]:
        (folder / X.FILE).write_text(json.dumps({**good, **bad}))
        code = cli.main(["experiment", "--continue", folder.name, "--runs-dir", str(runs_dir)])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "libibverbs" not in line]
        assert code == cli.EXIT_FAILED and len(err) == 1 and expected in err[0], err
    (folder / X.FILE).write_text("[" * 100_000)
    assert cli.main(["experiment", "--continue", folder.name, "--runs-dir", str(runs_dir)]) == cli.EXIT_FAILED
    assert "not readable JSON" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--strategies", "frozen,frozen"], "each may be given once"),
    (["--strategies", "nope"], "unknown 'nope'"),
    (["--strategies", ","], "name at least one"),
    (["--strategy", "frozen"], "--strategy: an experiment trains --strategies"),
    (["--continue", "x", "--epochs", "2"], "--continue takes the experiment's own settings"),
])
def test_bad_experiment_flags_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert cli.main(["experiment", *argv, "--runs-dir", str(tmp_path / "runs")]) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs" / X.EXPERIMENTS).exists()


def test_comparisons_never_subtract_runs_of_other_settings(tmp_path, capsys):
    """The newest run of each strategy, with another image size for scratch: the table says in
    what they differ instead of a difference."""
    runs_dir = str(tmp_path / "runs")
    assert cli.main(["train", *TINY, "--runs-dir", runs_dir, "--strategy", "frozen"]) == 0
    assert cli.main(["train", *TINY, "--runs-dir", runs_dir, "--strategy", "scratch", "--image-size", "24"]) == 0
    capsys.readouterr()
    assert cli.main(["compare", "--runs-dir", runs_dir]) == 0
    out = capsys.readouterr().out
    assert "these runs differ in image_size: their accuracies are not comparable" in out
    (frozen_row,) = [line for line in out.splitlines() if "frozen" in line]
    assert "differs: image_size" in frozen_row and "+0." not in frozen_row and "-0." not in frozen_row


async def test_the_app_runs_an_experiment_pauses_it_and_continues_it(tmp_path):
    """ctrl+e on the form: the strategies one after another on the dashboard ("run i of n"); `s`
    pauses the experiment; `x` on the runs screen continues it; at the end its runs are
    overlaid and compared."""
    from core.config import RunConfig
    from tui.app import TransferLabApp
    from tui.dialogs import PathScreen
    from tui.runs import CompareScreen, RunsScreen
    from test_tui import wait_until

    # the frozen run first: 150 steps (400 images took 1.2 s with the feature cache and core.cpu_conv,
    # and the stop missed it once in a full test run)
    cfg = RunConfig(dataset="digits", pretrained="none", image_size=16, batch_size=8, limit_train=1200,
                    limit_test=32, epochs=1, device="cpu", runs_dir=str(tmp_path / "runs"))
    app = TransferLabApp(cfg)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.pause()
        await pilot.press("ctrl+e")
        await wait_until(pilot, lambda: isinstance(app.screen, PathScreen))
        app.screen.query_one("Input").value = "scratch,frozen"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.live is not None and app.live.status == "running")
        dash = app.mode_screen("dashboard")
        await wait_until(pilot, lambda: "run 1 of 2, experiment ETA" in str(dash.query_one("#stats").render()))
        assert app.live.cfg.strategy == "frozen"
        await pilot.press("s")
        await wait_until(pilot, lambda: app.live.status == "stopped")
        await pilot.pause(0.5)
        assert app.live.cfg.strategy == "frozen"  # paused: the second run did not start
        exp = the_experiment(tmp_path / "runs")
        assert list(exp.runs) == ["frozen"]
        await pilot.press("f3")
        await wait_until(pilot, lambda: isinstance(app.screen, RunsScreen))
        runs = app.screen
        assert str(runs.query_one("#runs-table").get_row(exp.runs["frozen"])[9]) == exp.id
        await pilot.press("x")
        await wait_until(pilot, lambda: isinstance(app.screen, CompareScreen), timeout=300)
        compare = app.screen
        await wait_until(pilot, lambda: any(t.row_count == 2 for t in compare.query("#compare-table")))
        exp = the_experiment(tmp_path / "runs")
        assert sorted(exp.runs) == ["frozen", "scratch"]
        assert all(read_run(tmp_path / "runs" / r).summary["status"] == "completed" for r in exp.runs.values())
        assert runs.selected == set(exp.runs.values())


def _cli(*argv, timeout=300):
    import subprocess

    from conftest import cli_env, transferlab_cmd

    return subprocess.run([*transferlab_cmd(), *argv], capture_output=True, text=True, env=cli_env(),
                          timeout=timeout)


def _wait_for(condition, timeout=240.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_detached_experiment_is_stopped_by_its_id_and_continued_in_the_background(tmp_path):
    """`experiment --detach` returns once its first run trains, in a process of its own;
    `stop EXP` stops its current run (the experiment pauses: its process ends); `--continue
    --detach` resumes that run and trains the rest; the first output is kept beside the new."""
    runs_dir = str(tmp_path / "runs")
    slow = [*TINY, "--limit-train", "400", "--batch-size", "8", "--epochs", "2"]
    started = _cli("experiment", *slow, "--strategies", "frozen,scratch", "--runs-dir", runs_dir, "--detach")
    assert started.returncode == 0, started.stderr
    exp = the_experiment(runs_dir)
    assert f"experiment {exp.id} started in the background" in started.stdout
    assert f"transferlab stop {exp.id} --runs-dir {runs_dir}" in started.stdout
    assert exp.held_elsewhere() and [s for s, _ in exp.running()] == ["frozen"]
    stopped = _cli("stop", exp.id, "--runs-dir", runs_dir)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    _wait_for(lambda: not exp.held_elsewhere())
    assert "paused at frozen" in (exp.path / "output.log").read_text()
    assert [(s, status) for s, _, status in exp.reread().statuses()] == [("frozen", "stopped")]

    again = _cli("experiment", "--continue", exp.id, "--runs-dir", runs_dir, "--detach")
    assert again.returncode == 0 and f"experiment {exp.id} continued in the background" in again.stdout, again.stderr
    _wait_for(lambda: not exp.held_elsewhere())
    exp = exp.reread()
    assert exp.complete(), (exp.path / "output.log").read_text()
    assert "paused at frozen" in (exp.path / "output.1.log").read_text()
    log = (exp.path / "output.log").read_text()
    assert "run 1 of 2: frozen (resumed)" in log and "run 2 of 2: scratch" in log and "vs scratch" in log


def test_a_detached_experiment_that_cannot_start_says_why_and_leaves_nothing(tmp_path):
    runs_dir = tmp_path / "runs"
    result = _cli("experiment", *TINY, "--pretrained", str(tmp_path / "missing"), "--runs-dir", str(runs_dir),
                  "--detach")
    assert result.returncode == cli.EXIT_FAILED
    assert result.stderr.count("error:") == 1 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert list((runs_dir / X.EXPERIMENTS).iterdir()) == []  # the new experiment had nothing to continue


def test_an_experiment_on_two_processes_records_each_run_as_it_starts(tmp_path, monkeypatch, capsys):
    """--nproc-per-node 2: each run through OneFlow's launcher; the experiment's file names the
    run as soon as rank 0 started it (so an interrupted experiment resumes it)."""
    runs_dir = tmp_path / "runs"
    seen = []
    real = X.Experiment.record

    def record(self, strategy, run_id):
        real(self, strategy, run_id)
        seen.append(read_run(runs_dir / run_id).summary["status"])

    monkeypatch.setattr(X.Experiment, "record", record)
    code = cli.main(["experiment", *TINY, "--strategies", "frozen", "--runs-dir", str(runs_dir),
                     "--nproc-per-node", "2"])
    assert code == 0, capsys.readouterr().err
    exp = the_experiment(runs_dir)
    (run,) = exp.records()
    assert run.summary["status"] == "completed" and seen == ["running"]
    assert "2 processes (OneFlow's launcher, DDP)" in (run.path / "metrics.jsonl").read_text()


async def test_the_app_runs_an_experiment_in_the_background_and_follows_it_run_by_run(tmp_path):
    """ctrl+e with "in background": the experiment's own process trains; the dashboard follows
    each run as it starts ("run i of n"), then the comparison; the process has ended."""
    from core.config import RunConfig
    from textual.widgets import Select
    from tui.app import TransferLabApp
    from tui.dialogs import PathScreen
    from tui.runs import CompareScreen
    from test_tui import wait_until

    cfg = RunConfig(dataset="digits", pretrained="none", image_size=16, batch_size=8, limit_train=96,
                    limit_test=32, epochs=1, device="cpu", runs_dir=str(tmp_path / "runs"))
    app = TransferLabApp(cfg)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.pause()
        app.screen.query_one("#f-background", Select).value = True
        await pilot.pause()
        await pilot.press("ctrl+e")
        await wait_until(pilot, lambda: isinstance(app.screen, PathScreen))
        app.screen.query_one("Input").value = "frozen,scratch"
        await pilot.press("enter")
        dash = app.mode_screen("dashboard")
        await wait_until(pilot, lambda: app.live is not None and "run 1 of 2" in str(dash.query_one("#stats").render()),
                         timeout=180)
        assert not app.live.run.here and app.experiment_child is not None
        await wait_until(pilot, lambda: isinstance(app.screen, CompareScreen), timeout=300)
        exp = the_experiment(tmp_path / "runs")
        assert exp.complete() and not exp.held_elsewhere()
        assert app.experiment_child.process.wait(60) == 0
        compare = app.screen
        await wait_until(pilot, lambda: any(t.row_count == 2 for t in compare.query("#compare-table")))


async def test_attaching_to_a_run_of_a_detached_experiment_follows_the_experiment(tmp_path):
    """`transferlab attach EXP` (the app opened on one of its runs) while another process trains
    the experiment: the dashboard follows its runs one after another, then compares them."""
    from tui.app import TransferLabApp
    from tui.runs import CompareScreen
    from core.config import RunConfig
    from test_tui import wait_until

    runs_dir = str(tmp_path / "runs")
    started = _cli("experiment", *TINY, "--limit-train", "320", "--batch-size", "8", "--strategies", "frozen,scratch",
                   "--runs-dir", runs_dir, "--detach")
    assert started.returncode == 0, started.stderr
    run_dir = cli.run_or_experiment(runs_dir, the_experiment(runs_dir).id)
    app = TransferLabApp(RunConfig(runs_dir=runs_dir), attach=run_dir)
    async with app.run_test(size=(120, 36)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, CompareScreen), timeout=300)
        exp = the_experiment(runs_dir)
        assert exp.complete() and app.experiment is None
        compare = app.screen
        await wait_until(pilot, lambda: any(t.row_count == 2 for t in compare.query("#compare-table")))
