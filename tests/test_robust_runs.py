"""What a hostile pass over background runs and experiments found, each fixed and kept fixed."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import cli_env, transferlab_cmd
from core import cli
from core import experiment as X
from core.config import RunConfig
from core.store import read_run

TINY = ["--dataset", "digits", "--pretrained", "none", "--image-size", "16", "--batch-size", "16",
        "--limit-train", "48", "--limit-test", "32", "--epochs", "1", "--device", "cpu"]


def one_error_line(capsys):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "libibverbs" not in line]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_an_experiment_in_a_runs_folder_that_cannot_be_written_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code = cli.main(["experiment", *TINY, "--runs-dir", str(tmp_path / "afile"), "--strategies", "frozen"])
    assert code == cli.EXIT_FAILED and "afile" in one_error_line(capsys)


def test_an_experiment_is_continued_only_in_its_runs_folder_and_by_one_process(tmp_path, capsys):
    runs = tmp_path / "runs"
    exp = X.create(RunConfig(dataset="digits", runs_dir=str(runs)), ["frozen"])
    elsewhere = tmp_path / "copy"
    os.makedirs(elsewhere)
    (elsewhere / X.FILE).write_text((exp.path / X.FILE).read_text())
    assert cli.main(["experiment", "--continue", str(elsewhere), "--runs-dir", str(runs)]) == cli.EXIT_FAILED
    assert "is not an experiment of the runs folder" in one_error_line(capsys)
    assert cli.main(["experiment", "--continue", "", "--runs-dir", str(runs)]) == cli.EXIT_USAGE
    assert "--continue needs an experiment" in capsys.readouterr().err
    exp.hold()  # as another process running it would
    try:
        assert cli.main(["experiment", "--continue", exp.id, "--runs-dir", str(runs)]) == cli.EXIT_FAILED
        assert "is being run by another process" in one_error_line(capsys)
    finally:
        exp.release()
    assert not [p for p in runs.iterdir() if p.name != X.EXPERIMENTS]  # nothing was trained


def test_a_suspended_training_process_is_running_not_interrupted(tmp_path):
    """Ctrl-Z or SIGSTOP: no heartbeat, but the process will go on: nobody may resume its run."""
    from core import live
    from test_live import running_run

    proc = subprocess.Popen(["sleep", "60"])
    try:
        run = running_run(tmp_path, pid=proc.pid, heartbeat={"pid": proc.pid, "start_ticks": live.start_ticks(proc.pid),
                                                              "updated": time.time() - live.STALE_SECONDS - 5})
        assert read_run(run).summary["status"] == "interrupted"  # stale, not stopped: it no longer trains
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        assert read_run(run).summary["status"] == "running"
    finally:
        proc.kill()
        proc.wait()


def test_output_into_a_closed_pipe_does_not_end_the_run(tmp_path):
    """`transferlab train | head -1`: once head has gone, the run trains on, unprinted, and ends
    recorded as completed (rich's broken-pipe SystemExit once ended it unrecorded, exit 1)."""
    shell = " ".join(transferlab_cmd() + ["train", *TINY, "--limit-train", "160"]) + " | head -1"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", shell], cwd=tmp_path, env=cli_env(), capture_output=True,
                          text=True, timeout=300)
    (run,) = (tmp_path / "runs").iterdir()
    assert read_run(run).summary["status"] == "completed", proc.stderr
    assert proc.returncode == 0 and "Traceback" not in proc.stderr


def test_ctrl_c_while_a_detached_run_starts_ends_it_too(tmp_path):
    proc = subprocess.Popen([*transferlab_cmd(), "train", "--detach", *TINY], cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "runs").glob(".launch-*.json")):  # the child is starting
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == cli.EXIT_ABORTED and "Traceback" not in err, err
    assert "interrupted" in err
    time.sleep(1.0)
    runs = [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]
    assert all(read_run(r).summary["status"] != "running" for r in runs)  # none left training unnamed
    assert not list((tmp_path / "runs").glob(".launch-*"))


def test_a_child_killed_while_loading_is_one_line_saying_so(tmp_path):
    from core.launch import Detached

    log = tmp_path / "x.log"
    log.write_text("")
    assert Detached(1, log, exit_code=-9).reason() == [
        "error: the background process ended before its run started (killed by signal 9)"]


def test_comparisons_ignore_settings_that_cannot_matter():
    base = RunConfig(dataset="digits", pretrained="imagenet")
    assert X.mismatches([base, base.replace(data_root="/elsewhere")]) == []  # digits is built in
    assert X.mismatches([base.replace(strategy="frozen", pretrained="none"),
                         base.replace(strategy="scratch")]) == []  # scratch loads no weights
    assert X.mismatches([base.replace(dataset="cifar10"), base.replace(dataset="cifar10", data_root="/x")]) == \
        ["data_root"]


@pytest.mark.parametrize("flags", [["--nproc-per-node", "0"], ["--nproc-per-node", "3"]])
def test_bad_process_counts_with_detach_are_usage_errors(tmp_path, capsys, flags):
    assert cli.main(["train", "--detach", *TINY, *flags, "--runs-dir", str(tmp_path / "runs")]) == cli.EXIT_USAGE
    assert one_error_line(capsys).startswith("error: ")
