"""`transferlab train --nproc-per-node 2`: OneFlow's launcher + DDP on the CPU over loopback.

The data sizes are chosen so that the last global batch of the test set holds a single image
(33 = 2 x 16 + 1): one rank then has no image of its own in that batch (the weight-0 path of
core.distributed.Dist.shard). In the training set that image joins the batch before (core.data.batches):
2 global batches of 16 and 17 images, the second split unevenly (9 and 8)."""
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_env, transferlab_cmd

SETTINGS = ["--dataset", "digits", "--pretrained", "none", "--image-size", "16", "--batch-size", "16",
            "--limit-train", "33", "--limit-test", "33", "--device", "cpu", "--strategy", "frozen",
            "--no-hflip", "--no-vflip", "--lr", "0.05"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(runs_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*transferlab_cmd(), "train", *SETTINGS, "--runs-dir", str(runs_dir), "--nproc-per-node", "2",
         "--master-port", str(free_port()), *extra], env=cli_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def records(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def only_run(runs_dir: Path) -> Path:
    runs = [p for p in runs_dir.iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("ddp") / "runs"
    t0 = time.monotonic()
    proc = start(runs_dir, "--epochs", "1")
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out, runs_dir, time.monotonic() - t0


def test_two_processes_complete_one_run_folder_with_the_global_step_count(ddp_run):
    code, out, runs_dir, _ = ddp_run
    assert code == 0, out
    run = only_run(runs_dir)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert not [p for p in runs_dir.iterdir() if p.name.startswith(".launch")]  # launch files tidied
    recs = records(run)
    steps = [r for r in recs if r["event"] == "StepEnded"]
    assert recs[0]["steps_per_epoch"] == 2 == len(steps)  # 16 + 17 images: the global batch
    # frozen: the feature cache is for one process; each rank recomputes, and the log says so
    assert [n for n in recs[0]["notes"] if "frozen backbone" in n] == [
        "frozen backbone: its features are recomputed at every step (the feature cache works in a single "
        "process; each of the 2 processes computes the features of its share)"]
    assert (run / "checkpoints" / "last").is_dir()
    assert out.count("completed after 1 epoch") == 1, out  # rank 0 alone reports


def _single_process_eval(run: Path):
    """Test loss, accuracy and confusion matrix (numpy) of the saved weights, evaluated in this
    process on the whole test set."""
    from core.config import RunConfig, load
    from core.backend import flow
    from core.data import BatchTransform
    from core.trainer import prepare
    from core.weights import load_checkpoint

    cfg = load(run / "config.json", RunConfig())
    p = prepare(cfg)
    state, _, _ = load_checkpoint(run / "checkpoints" / "last", with_optimizer=False)
    p.model.load_state_dict(state)
    p.model.eval()
    t = BatchTransform(flow, "cpu", p.test.images.shape[1:3], cfg.image_size, cfg.normalize, False, False)
    with flow.no_grad():
        out = p.model(t(p.test.images, False, None))
        y = flow.tensor(p.test.labels)
        loss = float(flow.nn.functional.cross_entropy(out, y).item())
        acc = float((out.argmax(dim=1) == y).sum().item()) / len(p.test)
        matrix = np.zeros((len(p.test.classes),) * 2, np.int64)
        np.add.at(matrix, (p.test.labels, out.numpy().argmax(axis=1)), 1)
    return loss, acc, matrix


def test_test_accuracy_counts_every_test_image_once(ddp_run):
    _, out, runs_dir, _ = ddp_run
    run = only_run(runs_dir)
    epoch = next(r for r in records(run) if r["event"] == "EpochEnded")
    (classes,) = [r for r in records(run) if r["event"] == "ClassResults"]
    loss, acc, matrix = _single_process_eval(run)
    assert classes["matrix"] == matrix.tolist()  # summed over the ranks: every test image once
    assert all(w["index"] % 2 == 0 for w in classes["wrong"])  # rank 0's share of each batch
    assert epoch["test_acc"] == pytest.approx(acc, abs=1e-9)
    assert epoch["test_loss"] == pytest.approx(loss, abs=1e-5)


def test_weights_and_losses_equal_a_single_process_on_the_same_global_batches(ddp_run, tmp_path):
    """Frozen strategy, no flips: each step of 2 ranks must equal one step of 1 process on the
    same global batch (the last one of 17 images, split unevenly, included)."""
    from core.cli import main
    from core.weights import load_checkpoint

    _, _, runs_dir, _ = ddp_run
    run = only_run(runs_dir)
    assert main(["train", *SETTINGS, "--epochs", "1", "--runs-dir", str(tmp_path / "single")]) == 0
    single = only_run(tmp_path / "single")
    ddp_state, _, _ = load_checkpoint(run / "checkpoints" / "last", with_optimizer=False)
    one_state, _, _ = load_checkpoint(single / "checkpoints" / "last", with_optimizer=False)
    for name in ("fc.weight", "fc.bias"):
        assert np.abs(ddp_state[name].numpy() - one_state[name].numpy()).max() < 1e-5, name
    losses = lambda r: [x["loss"] for x in records(r) if x["event"] == "StepEnded"]  # noqa: E731
    assert np.allclose(losses(run), losses(single), atol=1e-5), (losses(run), losses(single))
    # and the weights moved: the comparison is not between two untrained heads
    assert not np.allclose(ddp_state["fc.bias"].numpy(), 0)


def test_a_batch_not_divisible_by_the_processes_is_one_line(tmp_path):
    proc = subprocess.run([*transferlab_cmd(), "train", *SETTINGS, "--batch-size", "15", "--nproc-per-node", "2",
                           "--runs-dir", str(tmp_path / "runs")], env=cli_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "not divisible by the 2 processes" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def _rank_pid(runs_dir: Path, rank: int) -> int:
    """The pid of the training process of `rank` whose launch file is in `runs_dir`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in kv)
        except OSError:
            continue
        if env.get("RANK") == str(rank) and str(runs_dir) in env.get("TRANSFERLAB_DDP_LAUNCH", ""):
            return int(entry.name)
    raise LookupError(rank)


def _wait_for_steps(runs_dir: Path, proc: subprocess.Popen, timeout: float = 180) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        runs = [p for p in runs_dir.iterdir() if not p.name.startswith(".")] if runs_dir.exists() else []
        if runs and (runs[0] / "metrics.jsonl").exists() and '"StepEnded"' in (runs[0] / "metrics.jsonl").read_text():
            return runs[0]
        time.sleep(0.2)
    raise TimeoutError


def test_a_rank_that_dies_ends_the_run_failed_within_seconds(tmp_path):
    runs_dir = tmp_path / "runs"
    proc = start(runs_dir, "--epochs", "50")
    try:
        run = _wait_for_steps(runs_dir, proc)
        os.kill(_rank_pid(runs_dir, 1), signal.SIGKILL)
        killed = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "ended unexpectedly" in summary["message"], summary
    assert took < 15, took
    with pytest.raises(LookupError):
        _rank_pid(runs_dir, 0)  # no rank left behind


def test_ctrl_c_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path):
    runs_dir = tmp_path / "runs"
    proc = start(runs_dir, "--epochs", "50")
    try:
        run = _wait_for_steps(runs_dir, proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped", summary
    assert (run / "checkpoints" / "last").is_dir()
    with pytest.raises(LookupError):
        _rank_pid(runs_dir, 1)


def test_a_node_other_than_0_has_no_run_folder_and_reports_its_launchers_exit(tmp_path):
    from core import events as ev
    from core.distributed import _outcome

    log = tmp_path / "x.log"
    log.write_text("error: something\n")
    done = _outcome(tmp_path / "x.run", log, 0, False, node_rank=1)
    assert done.status == ev.COMPLETED and done.run_dir is None
    log.write_text("error: no data here\n")
    failed = _outcome(tmp_path / "x.run", log, 1, True, node_rank=1)
    assert failed.status == ev.FAILED and failed.errors == ["error: no data here"]
    assert _outcome(tmp_path / "x.run", log, 1, False).status == ev.FAILED  # node 0, no run: failed
