"""Live runs seen and steered from outside their process: heartbeat.json, control.json (core.live),
`transferlab stop`, and running vs interrupted in read_run."""
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import cli_env, transferlab_cmd
from core import cli, live
from core.store import read_run
from core.runner import attach
from test_cli import Training

RECORDED = Path(__file__).parent / "data" / "runs"


def running_run(tmp_path, pid=None, heartbeat=None):
    """A copy of a recorded run whose summary says "running" (written by `pid`, default this
    process), with `heartbeat` (a dict, merged over this process's identity) as heartbeat.json."""
    src = sorted(RECORDED.iterdir())[0]
    run = tmp_path / "runs" / src.name
    shutil.copytree(src, run)
    summary = json.loads((run / "summary.json").read_text())
    summary.update(status="running", pid=os.getpid() if pid is None else pid)
    (run / "summary.json").write_text(json.dumps(summary))
    if heartbeat is not None:
        (run / live.HEARTBEAT_FILE).write_text(json.dumps({**live.identity(), "updated": time.time(), **heartbeat}))
    return run


def dead_pid():
    """A pid that no process has now: a child that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def training(tmp_path):
    """A `transferlab train` subprocess (test_cli.Training), killed if a test leaves it running."""
    started = []
    yield lambda: started.append(Training(tmp_path)) or started[-1]
    for t in started:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait(timeout=30)


def status(run):
    return read_run(run).summary["status"]


# ---------------------------------------------------------------------------------------------
# running or interrupted


def test_a_fresh_heartbeat_of_this_process_reads_running(tmp_path):
    assert status(running_run(tmp_path, heartbeat={})) == "running"


def test_pid_reuse_reads_interrupted(tmp_path):
    """The heartbeat's pid exists (it is ours) but started at another time: another process."""
    ticks = live.start_ticks(os.getpid())
    assert ticks is not None
    run = running_run(tmp_path, heartbeat={"start_ticks": ticks + 1})
    assert status(run) == "interrupted"


def test_a_stale_heartbeat_of_a_live_process_reads_interrupted(tmp_path):
    """The process lives but its training thread stopped beating (a hung or crashed worker)."""
    run = running_run(tmp_path, heartbeat={"updated": time.time() - live.STALE_SECONDS - 1})
    assert status(run) == "interrupted"


def test_another_host_is_judged_by_freshness_alone(tmp_path):
    # a stale heartbeat from another host, whose pid happens to be alive here: interrupted
    stale = running_run(tmp_path / "a", heartbeat={"host": "elsewhere", "boot_id": "other-boot",
                                                    "updated": time.time() - live.STALE_SECONDS - 1})
    assert status(stale) == "interrupted"
    # a fresh heartbeat from another host, whose pid does not exist here: running
    fresh = running_run(tmp_path / "b", pid=dead_pid(), heartbeat={"host": "elsewhere", "pid": dead_pid(),
                                                                   "boot_id": "other-boot"})
    assert status(fresh) == "running"


def test_same_host_after_a_reboot_reads_interrupted(tmp_path):
    run = running_run(tmp_path, heartbeat={"boot_id": "an-earlier-boot"})
    assert status(run) == "interrupted"


def test_a_stalled_host_is_not_tidied_until_surely_gone(tmp_path):
    """Interrupted, but its half-written checkpoint stays while the other host could still write it."""
    run = running_run(tmp_path, heartbeat={"host": "elsewhere", "updated": time.time() - live.STALE_SECONDS - 1})
    partial = run / "checkpoints" / ".last.tmp-1"
    partial.mkdir(parents=True)
    assert status(run) == "interrupted" and partial.is_dir()
    beat = json.loads((run / live.HEARTBEAT_FILE).read_text())
    beat["updated"] = time.time() - live.GONE_SECONDS - 1
    (run / live.HEARTBEAT_FILE).write_text(json.dumps(beat))
    assert status(run) == "interrupted" and not partial.exists()


def test_without_heartbeat_the_pid_decides(tmp_path):
    assert status(running_run(tmp_path / "a")) == "running"
    assert status(running_run(tmp_path / "b", pid=dead_pid())) == "interrupted"


@pytest.mark.parametrize("text", ["[]", "{", '{"pid": "1", "host": "x", "updated": 1}', "\xff", "{}" + " " * 70000])
def test_a_malformed_heartbeat_is_ignored(tmp_path, text):
    run = running_run(tmp_path)
    (run / live.HEARTBEAT_FILE).write_text(text, encoding="latin-1")
    assert live.read_heartbeat(run) is None
    assert status(run) == "running"  # the pid check, as for a run without heartbeat


# ---------------------------------------------------------------------------------------------
# the trainer's side, in process


class Control:
    def __init__(self):
        self.stopping = self.aborting = False

    def request_stop(self):
        self.stopping = True

    def request_abort(self):
        self.aborting = True


def wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_live_run_beats_obeys_requests_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(live, "HEARTBEAT_SECONDS", 0.2)
    monkeypatch.setattr(live, "CONTROL_POLL_SECONDS", 0.05)
    run = tmp_path / "run"
    run.mkdir()
    (run / live.CONTROL_FILE).write_text(json.dumps({"action": "abort", "requested": time.time() - 60}))
    control = Control()
    watcher = live.LiveRun(control)
    watcher.start(run)
    first = live.read_heartbeat(run)
    assert first is not None and first.pid == os.getpid()
    assert wait_until(lambda: live.read_heartbeat(run).updated > first.updated)
    time.sleep(0.2)
    assert not control.aborting  # a request older than the run is not for it
    live.request(run, "stop")
    assert wait_until(lambda: control.stopping) and not control.aborting
    live.request(run, "abort")
    assert wait_until(lambda: control.aborting)
    watcher.stop()
    assert not (run / live.HEARTBEAT_FILE).exists() and not (run / live.CONTROL_FILE).exists()


def test_the_heartbeat_stops_with_the_training_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(live, "HEARTBEAT_SECONDS", 0.1)
    monkeypatch.setattr(live, "CONTROL_POLL_SECONDS", 0.05)
    run = tmp_path / "run"
    run.mkdir()
    watcher = live.LiveRun(Control())
    trainer = threading.Thread(target=watcher.start, args=(run,))
    trainer.start()
    trainer.join()  # the training thread died without a RunFinished
    assert wait_until(lambda: not watcher._thread.is_alive(), timeout=2)
    before = live.read_heartbeat(run).updated
    time.sleep(0.3)
    assert live.read_heartbeat(run).updated == before


# ---------------------------------------------------------------------------------------------
# transferlab stop


def test_stop_refuses_unknown_and_finished_runs_in_one_line(tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(RECORDED, runs)
    assert cli.main(["stop", "no-such", "--runs-dir", str(runs)]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == f"error: no run 'no-such' in {runs}"
    assert cli.main(["stop", "scratch", "--runs-dir", str(runs)]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == "error: run 20261129-054241-scratch-digits is not running (status: completed)"
    assert not list(runs.glob("*/control.json"))


def test_stop_of_a_run_that_does_not_end_says_so_and_leaves_the_request(tmp_path, capsys):
    run = running_run(tmp_path, heartbeat={})
    code = cli.main(["stop", run.name, "--abort", "--wait", "0.5", "--runs-dir", str(run.parent)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == cli.EXIT_FAILED and f"run {run.name} has not ended after 0.5 s; the request stays" in err
    assert json.loads((run / live.CONTROL_FILE).read_text())["action"] == "abort"


def run_cli(*args, cwd):
    return subprocess.run([*transferlab_cmd(), *args], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("abort", [False, True])
def test_stop_from_another_process_ends_the_run(tmp_path, training, abort):
    t = training()
    t.wait_for_a_step()
    run = t.run_dir()
    listing = run_cli("runs", cwd=tmp_path)
    assert f"{run.name} " in listing.stdout and " running " in listing.stdout, listing.stdout
    asked = time.monotonic()
    stop = run_cli("stop", run.name[-12:], *(["--abort"] if abort else []), cwd=tmp_path)
    code, summary, out = t.finish()
    took = time.monotonic() - asked
    steps = sum('"StepEnded"' in line for line in (run / "metrics.jsonl").read_text().splitlines())
    print(f"stop{' --abort' if abort else ''}: run ended {took:.2f} s after the command started "
          f"(the command itself {stop.stdout.split(' after ')[-1].split(':')[0].strip()}; {steps} steps done)")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    if abort:
        assert code == 130 and summary["status"] == "aborted" and "aborted on request" in stop.stdout, out
    else:
        assert code == 3 and summary["status"] == "stopped" and "stopped on request" in stop.stdout, out
        assert (run / "checkpoints" / "last" / "meta.json").exists()
    assert not (run / live.HEARTBEAT_FILE).exists() and not (run / live.CONTROL_FILE).exists()
    assert "Traceback" not in out + stop.stderr


def test_a_killed_run_reads_interrupted(tmp_path, training):
    import signal

    t = training()
    t.wait_for_a_step()
    run = t.run_dir()
    assert (run / live.HEARTBEAT_FILE).exists()
    assert " running " in run_cli("runs", cwd=tmp_path).stdout
    t.signal(signal.SIGKILL)
    t.proc.wait(timeout=30)
    listing = run_cli("runs", cwd=tmp_path).stdout
    assert " interrupted " in listing and " running " not in listing, listing
    stop = run_cli("stop", run.name, cwd=tmp_path)
    assert stop.returncode == 2 and stop.stderr.strip() == f"error: run {run.name} is not running (status: interrupted)"


# ---------------------------------------------------------------------------------------------
# following metrics.jsonl as it grows


def step_line(n):
    from core import events as ev

    return json.dumps(ev.to_record(ev.StepEnded(1, n, n, 1.0 / n, {"all": 0.1}, 100.0))) + "\n"


def test_the_follower_reads_only_what_is_new_and_waits_for_a_line_being_written(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    follower = live.MetricsFollower(tmp_path)
    assert follower.read() == []  # no file yet
    metrics.write_text(step_line(1) + step_line(2))
    assert [e.step for e in follower.read()] == [1, 2]
    assert follower.read() == []
    third = step_line(3)
    with open(metrics, "a") as f:
        f.write(third[:20])  # a line being written
        f.flush()
        assert follower.read() == []
        f.write(third[20:] + "not json\n" + step_line(4))
    assert [e.step for e in follower.read()] == [3, 4]
    with open(metrics, "a") as f:  # a line torn by a kill, then the writer's fresh line
        f.write(step_line(5)[:30] + "\n" + step_line(6))
    assert [e.step for e in follower.read()] == [6]


def test_the_follower_skips_an_endless_line_without_holding_it(tmp_path, monkeypatch):
    monkeypatch.setattr(live, "FOLLOW_CHUNK", 1000)
    monkeypatch.setattr(live, "MAX_LINE", 3000)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(step_line(1) + "x" * 10_000 + "\n" + step_line(2))
    follower, seen = live.MetricsFollower(tmp_path), []
    for _ in range(20):
        seen += follower.read()
        assert len(follower._partial) <= 3000 + 1000
    assert [e.step for e in seen] == [1, 2] and not follower.behind


def test_the_follower_refuses_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "metrics.jsonl")
    assert live.MetricsFollower(tmp_path).read() == []  # and returns: a FIFO would block an open


# ---------------------------------------------------------------------------------------------
# the app attaches to a run of another process


async def pilot_wait(pilot, condition, timeout=60.0):
    import asyncio

    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await pilot.pause(0.02)


def row_status(screen, run_id):
    table = screen.query_one("#runs-table")
    return str(table.get_row(run_id)[7])


async def test_the_runs_screen_attaches_to_a_run_training_elsewhere_and_stops_it(tmp_path, training):
    """A real `transferlab train` in another process: enter on the runs screen follows it live,
    `s` stops it through its folder (the process exits 3), the dashboard sees it end."""
    from core.config import RunConfig
    from tui.app import TransferLabApp
    from tui.dashboard import DashboardScreen
    from tui.plots import LossPlot
    from tui.runs import RunsScreen

    t = training()
    t.wait_for_a_step()
    run = t.run_dir()
    app = TransferLabApp(RunConfig(runs_dir=str(tmp_path / "runs")))
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.press("f3")
        await pilot_wait(pilot, lambda: isinstance(app.screen, RunsScreen))
        assert row_status(app.screen, run.name) == "running"
        pressed = time.monotonic()
        await pilot.press("enter")
        await pilot_wait(pilot, lambda: isinstance(app.screen, DashboardScreen))
        dash = app.screen
        plot = dash.query_one(LossPlot)
        await pilot_wait(pilot, lambda: plot.points() > 0)
        print(f"attach: {1000 * (time.monotonic() - pressed):.0f} ms from enter to the first plotted point")
        assert dash.run is not None and dash.status == "running" and dash.sub_title == "run (attached)"
        seen = plot.points()
        await pilot_wait(pilot, lambda: plot.points() > seen)  # it follows the file as it grows
        assert "ETA" in str(dash.query_one("#stats").render())
        await pilot.press("s")
        await pilot_wait(pilot, lambda: dash.status == "stopped")
        assert not dash.check_action("stop", ())
        code, summary, out = t.finish()
        assert code == 3 and summary["status"] == "stopped", out
        await pilot.press("escape")
        await pilot_wait(pilot, lambda: isinstance(app.screen, RunsScreen))
        await pilot_wait(pilot, lambda: row_status(app.screen, run.name) == "stopped", timeout=10)


async def test_an_attached_run_that_dies_is_seen_interrupted_and_abort_asks_first(tmp_path, monkeypatch):
    from core import events as ev
    from core.config import RunConfig
    from tui.app import TransferLabApp
    from tui.dashboard import DashboardScreen
    from tui.dialogs import ConfirmScreen
    from tui.plots import LossPlot

    run = running_run(tmp_path, heartbeat={})
    cfg = RunConfig(dataset="digits", epochs=2)
    started = ev.RunStarted(run.name, str(run), cfg.to_dict(), "cpu", 10, 10, 10, 100, 10, 20)
    (run / "metrics.jsonl").write_text(json.dumps(ev.to_record(started)) + "\n" + step_line(1) + step_line(2))
    app = TransferLabApp(RunConfig(runs_dir=str(tmp_path / "runs")))
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.pause()
        app.push_screen(DashboardScreen(run=attach(run)))
        await pilot_wait(pilot, lambda: isinstance(app.screen, DashboardScreen))
        reads, real_read = [], live.MetricsFollower.read
        monkeypatch.setattr(live.MetricsFollower, "read", lambda self: reads.append(1) or real_read(self))
        await pilot_wait(pilot, lambda: len(reads) > 2)
        await pilot.press("escape")  # leaving the screen ends its follower thread
        await pilot.pause(0.5)
        count = len(reads)
        await pilot.pause(1.0)
        assert len(reads) == count
        app.push_screen(DashboardScreen(run=attach(run)))
        await pilot_wait(pilot, lambda: isinstance(app.screen, DashboardScreen))
        await pilot.pause()
        dash = app.screen
        await pilot_wait(pilot, lambda: dash.query_one(LossPlot).points() == 2)
        await pilot.press("a")
        await pilot_wait(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await pilot_wait(pilot, lambda: (run / live.CONTROL_FILE).exists())
        assert live.read_request(run) == "abort"
        beat = json.loads((run / live.HEARTBEAT_FILE).read_text())
        beat["updated"] -= live.STALE_SECONDS + 1  # the process stopped beating without a last line
        (run / live.HEARTBEAT_FILE).write_text(json.dumps(beat))
        await pilot_wait(pilot, lambda: dash.status == "interrupted", timeout=10)
        log = "".join("".join(line.text for line in dash.query_one("#log").lines).split())
        assert "interrupted:therunnolongertrains" in log
        assert not dash.check_action("abort", ())


async def test_the_runs_screen_sees_a_run_die_without_a_key(tmp_path):
    """A process that dies changes no file; the runs screen, while shown, still sees its heartbeat
    go stale and shows the run interrupted."""
    from core.config import RunConfig
    from tui.app import TransferLabApp
    from tui.runs import RunsScreen

    run = running_run(tmp_path, heartbeat={})
    app = TransferLabApp(RunConfig(runs_dir=str(tmp_path / "runs")))
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.press("f3")
        await pilot_wait(pilot, lambda: isinstance(app.screen, RunsScreen))
        await pilot.pause()
        assert row_status(app.screen, run.name) == "running"
        beat = json.loads((run / live.HEARTBEAT_FILE).read_text())
        old = beat["updated"] - live.STALE_SECONDS - 1
        (run / live.HEARTBEAT_FILE).write_text(json.dumps({**beat, "updated": old}))
        os.utime(run / live.HEARTBEAT_FILE, (old, old))
        await pilot_wait(pilot, lambda: row_status(app.screen, run.name) == "interrupted", timeout=10)


def test_stop_that_cannot_write_its_request_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    run = running_run(tmp_path, heartbeat={})

    def refused(path, text):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("core.store.atomic_write_text", refused)
    assert cli.main(["stop", run.name, "--runs-dir", str(run.parent)]) == cli.EXIT_FAILED
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot write the request in {run}: Read-only file system"


@pytest.mark.parametrize("name", [live.CHANGE_FILE, live.CONTROL_FILE, live.HEARTBEAT_FILE])
def test_a_fifo_in_place_of_a_run_file_is_not_read_and_never_blocks(tmp_path, name):
    """change.json, control.json, heartbeat.json are written by anyone: a FIFO there would hang
    the heartbeat thread (the run then reads as interrupted) or the runs list."""
    os.mkfifo(tmp_path / name)
    box = []
    reader = threading.Thread(target=lambda: box.append(live._read_small_json(tmp_path / name)), daemon=True)
    reader.start()
    reader.join(timeout=5)
    blocked = reader.is_alive()
    if blocked:  # let the blocked open return, so that no thread is left hanging
        os.close(os.open(tmp_path / name, os.O_WRONLY | os.O_NONBLOCK))
    assert not blocked and box == [None]


def test_change_requests_from_many_threads_at_once_all_count(tmp_path):
    """The dashboard asks from a thread per key press: spammed keys must not lose requests (each
    request reads, merges and rewrites change.json)."""
    threads = [threading.Thread(target=live.request_change, args=(tmp_path,), kwargs={"lr_scale": 1.5})
               for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert live._read_change(tmp_path / live.CHANGE_FILE)["lr_scale"] == pytest.approx(1.5 ** 20)


def test_a_change_request_left_by_an_earlier_life_of_the_run_is_dropped(tmp_path):
    """A run killed before its boundary leaves change.json behind: its resume (maybe with
    --epochs given anew) must not take it up, as it does not take up an old control.json."""
    from core.trainer import RunControl

    control = RunControl()
    runner = live.LiveRun(control)
    runner.run_dir = tmp_path
    (tmp_path / live.CHANGE_FILE).write_text(json.dumps({"epochs": 1, "requested": runner.created - 60}))
    runner._poll_change()
    assert control.take_changes() == {} and not (tmp_path / live.CHANGE_FILE).exists()
    live.request_change(tmp_path, epochs=7)
    runner._poll_change()
    assert control.take_changes() == {"epochs": 7}
