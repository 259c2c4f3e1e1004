import json
import subprocess

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
