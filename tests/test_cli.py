import json
import subprocess
import sys

import pytest

from conftest import cli_env, transferlab_cmd


def run_cli(*args, cwd):
    return subprocess.run([*transferlab_cmd(), *args], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    proc = run_cli("train", "--dataset", "digits", "--epochs", "1", "--image-size", "16", "--pretrained", "none",
                   "--limit-train", "48", "--limit-test", "32", "--batch-size", "16", "--device", "cpu", cwd=cwd)
    return cwd, proc


def test_train_completes_and_writes_the_run_folder(trained):
    cwd, proc = trained
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "completed after 1 epoch(s)" in proc.stdout and "final test accuracy 0." in proc.stdout
    assert "epoch 1/1: train loss" in proc.stdout
    (run_dir,) = (cwd / "runs").iterdir()
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoints/last/model.safetensors", "checkpoints/best/meta.json"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and 0 <= summary["final_test_acc"] <= 1
    assert json.loads((run_dir / "config.json").read_text())["image_size"] == 16


def test_runs_lists_it_and_compare_shows_it(trained):
    cwd, _ = trained
    (run_dir,) = (cwd / "runs").iterdir()
    listing = run_cli("runs", cwd=cwd)
    assert listing.returncode == 0 and "finetune" in listing.stdout and "completed" in listing.stdout
    assert run_dir.name[:15] in listing.stdout
    compare = run_cli("compare", run_dir.name, cwd=cwd)
    assert compare.returncode == 0 and "transfer learning comparison" in compare.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"{summary['final_test_acc']:.4f}" in compare.stdout
    missing = run_cli("compare", "no-such-run", cwd=cwd)
    assert missing.returncode == 2 and "no run 'no-such-run'" in missing.stderr


def test_bad_values_exit_2_with_one_line_each(tmp_path):
    proc = run_cli("train", "--lr", "-1", "--epochs", "zero", "--strategy", "magic", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert lines == ["error: --epochs must be a whole number, got 'zero'"]
    proc = run_cli("train", "--lr", "-1", "--strategy", "magic", "--momentum", "2", cwd=tmp_path)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 3
    assert "error: --lr must be a positive number, got -1.0" in lines
    assert not (tmp_path / "runs").exists()


def test_unknown_flag_and_missing_data_are_clear(tmp_path):
    proc = run_cli("train", "--colour", "red", cwd=tmp_path)
    assert proc.returncode == 2 and "unrecognized arguments: --colour red" in proc.stderr
    proc = run_cli("train", "--dataset", "imagefolder:nowhere", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 1 and "needs a train/ folder" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["train", "--lr", "-1e-3"], "--lr must be a positive number, got -0.001"),
    (["train", "--seed", str(2**63)], "--seed must be between 0 and 4294967295"),
    (["train", "--runs-dir", "a\x00b"], "--runs-dir must not contain a NUL character"),
    (["train", "--dataset", "[/x]"], "got '[/x]'"),  # text from the user is never read as markup
])
def test_bad_values_get_one_line_and_exit_2(argv, message, capsys):
    from core import cli

    assert cli.main(argv) == cli.EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "Traceback" not in err


def test_bad_runs_dir_is_one_line_before_data_and_model_load(tmp_path):
    (tmp_path / "afile").write_text("x")
    nowhere = ["--dataset", "imagefolder:nowhere", "--device", "cpu"]  # data that would fail to load
    for runs_dir, message in (("afile", "runs folder afile is a file, not a folder"),
                              ("afile/runs", "runs folder afile/runs cannot be created: afile is a file")):
        proc = run_cli("train", *nowhere, "--runs-dir", runs_dir, cwd=tmp_path)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: {message}: choose another --runs-dir"], proc.stderr
    (tmp_path / "nul.json").write_text(json.dumps({"runs_dir": "ru\u0000ns"}))
    proc = run_cli("train", *nowhere, "--config", "nul.json", cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    # refused by the runs folder check (exit 1), or earlier by the settings' validation (exit 2)
    assert proc.returncode in (1, 2) and len(errors) == 1 and "NUL" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# signals, for real


class Training:
    """`transferlab train` in a subprocess, long enough to be signalled mid-run."""

    def __init__(self, cwd):
        import os
        import threading

        env = cli_env()
        env["PYTHONUNBUFFERED"] = "1"
        self.cwd = cwd
        self.proc = subprocess.Popen(
            [*transferlab_cmd(), "train", "--dataset", "digits", "--pretrained", "none", "--image-size", "16",
             "--batch-size", "8", "--limit-train", "1024", "--limit-test", "32", "--epochs", "2",
             "--device", "cpu"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        self.os = os

    def wait_for(self, condition, what, timeout=300):
        import time

        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"ended before {what}: " + "".join(self.lines)
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            time.sleep(0.02)

    def run_dir(self):
        runs = self.cwd / "runs"
        return next(runs.iterdir()) if runs.is_dir() and any(runs.iterdir()) else None

    def wait_for_a_step(self):
        def stepped():
            metrics = (self.run_dir() or self.cwd) / "metrics.jsonl"
            return metrics.exists() and '"StepEnded"' in metrics.read_text()

        self.wait_for(stepped, "StepEnded in metrics.jsonl")

    def signal(self, sig):
        self.os.kill(self.proc.pid, sig)

    def finish(self):
        code = self.proc.wait(timeout=300)
        return code, json.loads((self.run_dir() / "summary.json").read_text()), "".join(self.lines)


@pytest.mark.parametrize("sig, said", [("SIGINT", "Ctrl-C: stopping after this step"),
                                       ("SIGTERM", "SIGTERM: stopping after this step")])
def test_ctrl_c_or_sigterm_stops_gracefully_with_exit_3(tmp_path, sig, said):
    import signal

    t = Training(tmp_path)
    t.wait_for_a_step()
    t.signal(getattr(signal, sig))
    code, summary, out = t.finish()
    assert code == 3, out
    assert summary["status"] == "stopped" and "checkpoint saved" in summary["message"]
    assert said in out and "Traceback" not in out
    ck = t.run_dir() / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last"] and (ck / "last" / "meta.json").exists()


@pytest.mark.parametrize("when", ["mid-step", "writing the checkpoint"])
def test_a_second_ctrl_c_aborts_at_once_with_exit_130(tmp_path, when):
    import signal

    t = Training(tmp_path)
    t.wait_for_a_step()
    t.signal(signal.SIGINT)
    t.wait_for(lambda: any("Ctrl-C: stopping" in line for line in t.lines), "the stop message")
    if when == "writing the checkpoint":
        ck = t.run_dir() / "checkpoints"
        t.wait_for(lambda: ck.is_dir() and any(p.name.startswith(".last.tmp-") for p in ck.iterdir()),
                   "the stop's checkpoint being written")
    t.signal(signal.SIGINT)
    code, summary, out = t.finish()
    assert code == 130, out
    assert summary["status"] == "aborted" and "Traceback" not in out
    ck = t.run_dir() / "checkpoints"
    assert not ck.exists() or not [p for p in ck.iterdir() if ".tmp-" in p.name]  # no partial checkpoint
    if when == "writing the checkpoint":
        assert not (ck / "last").exists()  # the abort came before the checkpoint was complete


TINY = ["--dataset", "digits", "--pretrained", "none", "--image-size", "16", "--limit-train", "48",
        "--limit-test", "32", "--batch-size", "16", "--device", "cpu"]


def test_detach_starts_the_run_in_its_own_session_and_returns(tmp_path):
    import os
    import re
    import time

    proc = run_cli("train", "--detach", *TINY, "--epochs", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"run (\S+) started in the background \(pid (\d+)\)", proc.stdout)
    assert match, proc.stdout
    run_dir, pid = tmp_path / "runs" / match.group(1), int(match.group(2))
    try:
        assert os.getsid(pid) == pid != os.getsid(0)  # a session of its own: no terminal to lose
    except ProcessLookupError:
        pass  # it already finished
    deadline = time.monotonic() + 300
    while json.loads((run_dir / "summary.json").read_text())["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert "completed after 2 epoch(s)" in (run_dir / "output.log").read_text()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [run_dir.name]  # no launch leftovers


def test_detach_that_cannot_start_says_why_in_one_line(tmp_path):
    proc = run_cli("train", "--detach", *TINY, "--pretrained", str(tmp_path / "missing"), cwd=tmp_path)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not exist" in errors[0] and "Traceback" not in proc.stderr
    assert list((tmp_path / "runs").iterdir()) == []  # no run folder, no launch leftovers


def test_a_setup_error_quoting_markup_or_newlines_is_one_plain_line(tmp_path, capsys):
    from core import cli

    code = cli.main(["train", *TINY, "--runs-dir", str(tmp_path / "runs"),
                     "--pretrained", str(tmp_path / "[/x]\nsecond line")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "libibverbs" not in line]
    assert code == cli.EXIT_FAILED and len(lines) == 1, err
    assert "[/x] second line" in lines[0] and "does not exist" in lines[0]


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])
def test_ctrl_c_while_starting_up_ends_with_one_line(tmp_path, delay):
    """A Ctrl-C while Python, oneflow and the data load once gave a traceback or, reaching the
    spinner's thread during oneflow's import, exit 255 with no word."""
    import signal
    import time

    proc = subprocess.Popen([*transferlab_cmd(), "train", *TINY, "--limit-train", "400", "--epochs", "1"],
                            cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert "Traceback" not in out + err and "Error" not in err, err
    if proc.returncode == 130:  # still starting up (on a slow machine training may have begun: exit 3)
        assert "interrupted" in err
    else:
        assert proc.returncode == 3, (proc.returncode, err)


def test_command_line_says_how_the_run_is_started():
    from core.cli import command_line, launcher_line
    from core.config import RunConfig
    from core.distributed import Topology

    cfg = RunConfig(dataset="digits", epochs=2)
    assert command_line(cfg) == "transferlab train --dataset digits --epochs 2"
    assert command_line(cfg, detach=True) == "transferlab train --dataset digits --epochs 2 --detach"
    assert command_line(cfg, processes=3) == "transferlab train --dataset digits --epochs 2 --nproc-per-node 3"
    assert command_line(cfg, processes=1) == command_line(cfg)
    line = launcher_line(Topology(nproc_per_node=3))
    assert " -m oneflow.distributed.launch --nproc_per_node 3 --nnodes 1 --node_rank 0 " in line
    assert line.endswith(" -m tui train --config 'RUNS/.launch-ddp-*.json'")


def test_classes_the_dataset_lacks_are_one_line_and_no_run_folder(tmp_path, capsys):
    from core import cli

    code = cli.main(["train", *TINY, "--runs-dir", str(tmp_path / "runs"), "--classes", "5-9,12"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "libibverbs" not in line]
    assert code == cli.EXIT_FAILED and "Traceback" not in err
    assert lines == ["error: classes: digits has no class 12; it has 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 (indices 0-9)"]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert cli.main(["train", *TINY, "--classes", "3-1"]) == cli.EXIT_USAGE
    assert "error: --classes range 3-1 is empty: write 1-3" in capsys.readouterr().err


def test_no_thread_takes_ctrl_c_while_oneflow_is_imported(tmp_path):
    """When oneflow's import starts, every thread of the process blocks SIGINT (numpy's BLAS
    workers, started earlier, included), so a Ctrl-C waits for the main thread's handler: a BLAS
    thread that took it mid-import ran oneflow's half-installed handler (exit -6 or -11, no word)."""
    code = ("import glob, sys\n"
            "masks = []\n"
            "class Spy:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'oneflow._oneflow_internal' and not masks:  # early in oneflow's import\n"
            "            for status in glob.glob('/proc/self/task/*/status'):\n"
            "                fields = dict(l.split(':', 1) for l in open(status).read().splitlines() if ':' in l)\n"
            "                masks.append((fields['Pid'].strip(), int(fields['SigBlk'], 16) & 2))\n"
            "sys.meta_path.insert(0, Spy())\n"
            "from tui.__main__ import main\n"
            f"main(['train', '--dataset', 'digits', '--classes', '5-9,12', '--runs-dir', {str(tmp_path)!r}])\n"
            "print('masks', masks)\n")
    out = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("masks")]
    masks = eval(line[len("masks"):])  # noqa: S307 (our own subprocess's list of tuples)
    assert len(masks) >= 2, out.stdout + out.stderr  # the main thread and numpy's BLAS worker(s)
    assert [pid for pid, blocked in masks if not blocked] == [], masks


def _interrupted_import():
    """What a Ctrl-C inside a C extension's import raised (seen on CI: scipy's, as scikit-learn
    loads the digits): an ImportError caused by the KeyboardInterrupt."""
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as ctrl_c:
            raise ImportError("initialization failed") from ctrl_c
    except ImportError as exc:
        return exc


def test_a_ctrl_c_that_became_an_import_error_while_the_data_loads_ends_with_one_line(tmp_path, monkeypatch, capsys):
    from core import cli, data

    def load_digits():
        raise _interrupted_import()

    monkeypatch.setattr(data, "load_digits", load_digits)
    code = cli.main(["train", *TINY, "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ABORTED and "interrupted before training started" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_an_import_error_of_its_own_is_not_taken_for_a_ctrl_c():
    from core.errors import interrupted

    assert interrupted(_interrupted_import()) and interrupted(KeyboardInterrupt())
    assert interrupted(ImportError("KeyboardInterrupt: oneflow's import"))  # how oneflow's says it
    assert not interrupted(ImportError("No module named 'sklearn'")) and not interrupted(ValueError("x"))
