"""The run store under faults: the runs folder checked up front, atomic run ids, disk full or
read-only during a run, leftovers of a kill, malformed run folders (with a fuzz test), strict
metrics JSON and a duration kept current."""
import errno
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import ROOT
from core import events as ev
from core import store
from core.config import RunConfig
from core.store import RunsDirError, check_runs_dir, list_runs, read_events, read_run

RECORDED = ROOT / "tests" / "data" / "runs"


def recorded_runs(dest: Path) -> list:
    """Copies of the two recorded runs in tests/data (good runs), oldest first."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for src in sorted(RECORDED.iterdir()):
        shutil.copytree(src, dest / src.name)
        out.append(dest / src.name)
    return out


def strict_loads(text):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def fail_writes(monkeypatch, when=lambda path: True, error=errno.ENOSPC, times=1, after=0, half=False):
    """Make the store's one write function fail: writes to files whose path satisfies `when`,
    after `after` such writes went through, `times` times (None: for ever). With `half`, half of
    the bytes are written first (a line torn by a full disk). Returns the paths that failed."""
    real = store.write_bytes
    state = {"seen": 0, "left": times}
    failed = []

    def write_bytes(fd, data):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if when(path):
            state["seen"] += 1
            if state["seen"] > after and (state["left"] is None or state["left"] > 0):
                if state["left"] is not None:
                    state["left"] -= 1
                failed.append(path)
                if half:
                    real(fd, bytes(data[: len(data) // 2]))
                raise OSError(error, os.strerror(error))
        real(fd, data)

    monkeypatch.setattr(store, "write_bytes", write_bytes)
    return failed


# ---------------------------------------------------------------------------------------------
# the runs folder, checked before data and model load


def test_runs_dir_that_is_a_file_under_a_file_or_holds_a_nul_is_refused(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(RunsDirError, match="is a file, not a folder"):
        check_runs_dir(afile)
    with pytest.raises(RunsDirError, match=f"cannot be created: {afile} is a file"):
        check_runs_dir(afile / "runs" / "deeper")
    with pytest.raises(RunsDirError, match="holds a NUL byte"):
        check_runs_dir(str(tmp_path / "ru\0ns"))
    with pytest.raises(RunsDirError, match=r"runs folder .{100,120}\.\.\.: File name too long"):
        check_runs_dir(tmp_path / ("x" * 300))
    with pytest.raises(RunsDirError, match="cannot list the runs folder ~no-such-user/runs"):
        list_runs("~no-such-user/runs")
    assert afile.read_text() == "x"


def test_missing_runs_dir_passes_and_is_not_created(tmp_path):
    assert check_runs_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []  # the write probe was removed too
    with pytest.raises(RunsDirError, match=r"has only [\d.]+ MB free"):
        check_runs_dir(tmp_path, min_free=1 << 62)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (root only; skipped where mounting is not permitted)."""
    mounted = []

    def mount(size, options=""):
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_or_read_only_runs_dir_is_refused(tmpfs):
    small = tmpfs("2m")
    with pytest.raises(RunsDirError, match=r"the runs folder .*/runs has only 2\.0 MB free .*at least 50 MB"):
        check_runs_dir(small / "runs")
    read_only = tmpfs("2m", ",ro")
    with pytest.raises(RunsDirError, match="cannot write in the runs folder .*: Read-only file system"):
        check_runs_dir(read_only)


def test_a_run_folder_that_cannot_be_written_at_start_is_a_setup_error(tmp_path, monkeypatch):
    failed = fail_writes(monkeypatch, when=lambda p: "config.json" in p, error=errno.EROFS)
    with pytest.raises(RunsDirError, match="cannot write the run folder .*: Read-only file system"):
        store.RunWriter(RunConfig(runs_dir=str(tmp_path)))
    assert failed and list(tmp_path.iterdir()) == []  # no half-made run folder is left


# ---------------------------------------------------------------------------------------------
# run ids


def test_ten_runs_started_in_the_same_second_all_get_their_own_folder(tmp_path, monkeypatch):
    import pathlib
    import time

    monkeypatch.setattr(store.time, "strftime", lambda fmt, *a: "20261129-120000")
    for name in ("exists", "mkdir", "stat"):  # a slow file system: 2 ms per metadata call
        real = getattr(pathlib.Path, name)
        monkeypatch.setattr(pathlib.Path, name, lambda self, *a, _real=real, **k: (time.sleep(0.002), _real(self, *a, **k))[1])
    start = threading.Barrier(10)
    writers, errors = [], []

    def start_run():
        start.wait()
        try:
            writers.append(store.RunWriter(RunConfig(runs_dir=str(tmp_path))))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start_run) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    assert errors == []
    ids = sorted(w.run_id for w in writers)
    stem = "20261129-120000-finetune-cifar10"
    assert ids == sorted([stem] + [f"{stem}-{n}" for n in range(2, 11)])
    for w in writers:  # each writer wrote its own folder
        assert json.loads((w.path / "summary.json").read_text())["run_id"] == w.run_id
        w.close()


# ---------------------------------------------------------------------------------------------
# faults during a run


def run_dir_of(tmp_path):
    (path,) = (tmp_path / "runs").iterdir()
    return path


def test_disk_full_writing_a_checkpoint_fails_the_run_and_keeps_the_previous_one(tiny_cfg, tmp_path, monkeypatch):
    from core.trainer import train

    # the second checkpoint's files fail (epoch 2's checkpoints/.last.tmp-*)
    failed = fail_writes(monkeypatch, when=lambda p: "/.last.tmp-" in p, after=1)
    result = train(tiny_cfg.replace(epochs=2, limit_train=32))
    path = run_dir_of(tmp_path)
    assert failed and "/.last.tmp-" in failed[0]
    assert result.status == ev.FAILED and result.epochs_done == 2
    assert result.message == f"could not write a checkpoint to {path / 'checkpoints'}: No space left on device"
    summary = strict_loads((path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["message"] == result.message
    assert sorted(p.name for p in (path / "checkpoints").iterdir()) == ["best", "last"]  # no .last.tmp-*
    assert json.loads((path / "checkpoints" / "last" / "meta.json").read_text())["epoch"] == 1
    assert (path / "checkpoints" / "last" / "model.safetensors").is_file()
    finished = strict_loads((path / "metrics.jsonl").read_text().splitlines()[-1])
    assert finished["event"] == "RunFinished" and finished["status"] == "failed"
    assert not (path / "error.txt").exists()  # a full disk is not a bug: no traceback


def test_disk_full_mid_line_of_metrics_fails_the_run_and_keeps_the_file_readable(tiny_cfg, tmp_path, monkeypatch):
    from core.trainer import train

    failed = fail_writes(monkeypatch, when=lambda p: p.endswith("metrics.jsonl"), after=2, half=True)
    result = train(tiny_cfg.replace(limit_train=64))
    path = run_dir_of(tmp_path)
    assert failed and result.status == ev.FAILED
    assert result.message == f"could not write {path / 'metrics.jsonl'}: No space left on device"
    run = read_run(path)
    assert run.summary["status"] == "failed" and run.summary["message"] == result.message
    events = read_events(path)  # the torn line is skipped; the line after it starts afresh
    assert [type(e).__name__ for e in events] == ["RunStarted", "StepEnded", "RunFinished"]
    assert events[-1].status == ev.FAILED


def test_read_only_summary_mid_run_fails_the_run_and_still_records_how_it_ended(tiny_cfg, tmp_path, monkeypatch):
    from core.trainer import train

    # the summary's write at the end of epoch 1 fails once (the folder "turned read-only"); it
    # was written when the run was created and when it started
    failed = fail_writes(monkeypatch, when=lambda p: "/.summary.json." in p, error=errno.EROFS, after=2)
    result = train(tiny_cfg.replace(epochs=2, limit_train=32))
    path = run_dir_of(tmp_path)
    assert len(failed) == 1
    assert result.status == ev.FAILED and result.epochs_done == 1
    assert result.message == f"could not write {path / 'summary.json'}: Read-only file system"
    assert not [p for p in path.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert read_run(path).summary["status"] == "failed"


def test_no_room_for_a_temporary_copy_still_records_how_the_run_ended(tiny_cfg, tmp_path, monkeypatch):
    from core.trainer import train

    # from epoch 1's end on, no temporary summary can be written: the last one is rewritten in place
    fail_writes(monkeypatch, when=lambda p: "/.summary.json." in p, after=2, times=None)
    result = train(tiny_cfg.replace(limit_train=32))
    path = run_dir_of(tmp_path)
    assert result.status == ev.FAILED and result.message.endswith("summary.json: No space left on device")
    summary = strict_loads((path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["message"] == result.message


def test_every_write_failing_from_some_point_on_ends_the_run_cleanly(tiny_cfg, tmp_path, monkeypatch):
    from core.trainer import train

    fail_writes(monkeypatch, after=6, times=None)  # ENOSPC on every write after the 6th
    result = train(tiny_cfg.replace(epochs=2, limit_train=32))
    path = run_dir_of(tmp_path)
    assert result.status == ev.FAILED and "No space left on device" in result.message
    assert not [p for p in path.rglob(".*")]  # no temporary files or folders left anywhere
    assert read_run(path).problems == []  # what was written is still a readable run


def test_real_disk_full_during_a_checkpoint(tiny_cfg, tmpfs):
    """A real full disk (a 150 MB tmpfs): the first checkpoints/last (~90 MB) fits, its copy to
    best does not."""
    from core.trainer import train

    runs = tmpfs("150m") / "runs"
    result = train(tiny_cfg.replace(runs_dir=str(runs), limit_train=32))
    (path,) = runs.iterdir()
    assert result.status == ev.FAILED, result
    assert result.message == f"could not write a checkpoint to {path / 'checkpoints'}: No space left on device"
    assert sorted(p.name for p in (path / "checkpoints").iterdir()) == ["last"]  # .best.tmp-* removed
    assert read_run(path).summary["status"] == "failed"
    assert json.loads((path / "checkpoints" / "last" / "meta.json").read_text())["epoch"] == 1
    assert strict_loads((path / "metrics.jsonl").read_text().splitlines()[-1])["status"] == "failed"


def test_real_disk_full_while_writing_the_first_checkpoint(tiny_cfg, tmpfs):
    """A 60 MB tmpfs: room for the run's files and the model's weights, not the optimizer's."""
    from core.trainer import train

    runs = tmpfs("60m") / "runs"
    result = train(tiny_cfg.replace(runs_dir=str(runs), limit_train=32))
    (path,) = runs.iterdir()
    assert result.status == ev.FAILED, result
    assert result.message == f"could not write a checkpoint to {path / 'checkpoints'}: No space left on device"
    assert list((path / "checkpoints").iterdir()) == []  # the partial .last.tmp-* is gone
    assert read_run(path).summary["status"] == "failed"


# ---------------------------------------------------------------------------------------------
# leftovers of a kill


def checkpoint(folder: Path, epoch: int) -> Path:
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "tensor_0").write_bytes(b"w" * 100)
    (folder / "meta.json").write_text(json.dumps({"epoch": epoch}))
    return folder


def test_leftovers_of_a_kill_are_recovered_or_removed_when_the_run_is_read(tmp_path):
    lost, kept = recorded_runs(tmp_path / "runs")
    ck = lost / "checkpoints"
    checkpoint(ck / "last.old", 1)  # killed between the two renames: last is gone
    checkpoint(ck / ".last.tmp-123", 2)  # the new one, maybe incomplete
    checkpoint(ck / "best", 1)
    checkpoint(ck / ".best.tmp-456", 2)
    (lost / ".summary.json.abc123").write_text("{")
    (ck / "best" / ".meta.json.x1y2").write_text("{")
    checkpoint(kept / "checkpoints" / "last", 3)
    checkpoint(kept / "checkpoints" / "last.old", 2)  # killed while removing the old one

    runs = list_runs(tmp_path / "runs")
    assert [r.problems for r in runs] == [[], []]
    assert sorted(p.name for p in ck.iterdir()) == ["best", "last"]
    assert json.loads((ck / "last" / "meta.json").read_text()) == {"epoch": 1}  # back from last.old
    assert sorted(p.name for p in lost.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl", "summary.json"]
    assert sorted(p.name for p in (ck / "best").iterdir()) == ["meta.json", "model"]
    assert sorted(p.name for p in (kept / "checkpoints").iterdir()) == ["last"]
    assert json.loads((kept / "checkpoints" / "last" / "meta.json").read_text()) == {"epoch": 3}


@pytest.mark.parametrize("linked", ["checkpoints", "checkpoints/last", "run"])
def test_tidying_never_follows_a_link_out_of_the_run_folder(tmp_path, linked):
    """A crafted run folder whose checkpoints (or itself) is a link to elsewhere: listing it must
    not remove or move anything there."""
    from core.store import read_run

    run, _ = recorded_runs(tmp_path / "runs")
    victim = tmp_path / "victim"
    checkpoint(victim / "last.old", 1)
    checkpoint(victim / "best", 1)
    (victim / "last.old" / "IMPORTANT").write_text("keep")
    (victim / ".summary.json.important").write_text("keep")
    (victim / "best" / ".last.tmp-1").mkdir()
    before = sorted(str(p.relative_to(victim)) for p in victim.rglob("*"))
    if linked == "run":
        shutil.rmtree(run)
        shutil.copytree(RECORDED / run.name, victim / "inner")
        (victim / "inner" / "checkpoints").mkdir()
        checkpoint(victim / "inner" / "checkpoints" / "last.old", 1)
        before = sorted(str(p.relative_to(victim)) for p in victim.rglob("*"))
        run.symlink_to(victim / "inner")
    elif linked == "checkpoints":
        (run / "checkpoints").symlink_to(victim)
    else:
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last").symlink_to(victim)
    list_runs(tmp_path / "runs")
    read_run(run)
    assert sorted(str(p.relative_to(victim)) for p in victim.rglob("*")) == before


def test_a_kill_between_the_renames_of_a_checkpoint_loses_nothing(tmp_path, monkeypatch):
    (run,) = recorded_runs(tmp_path / "runs")[:1]
    ck = run / "checkpoints"
    checkpoint(ck / "last", 1)
    checkpoint(ck / ".last.tmp-9", 2)
    real_replace = os.replace
    calls = []

    def killed_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed after last -> last.old, before tmp -> last
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        store.replace_dir(ck / ".last.tmp-9", ck / "last")
    monkeypatch.setattr(store.os, "replace", real_replace)
    assert not (ck / "last").exists() and (ck / "last.old").is_dir()
    read_run(run)
    assert sorted(p.name for p in ck.iterdir()) == ["last"]
    assert json.loads((ck / "last" / "meta.json").read_text()) == {"epoch": 1}


def test_a_live_run_is_never_tidied(tmp_path):
    (run,) = recorded_runs(tmp_path / "runs")[:1]
    summary = json.loads((run / "summary.json").read_text())
    summary.update(status="running", pid=os.getpid())
    (run / "summary.json").write_text(json.dumps(summary))
    partial = checkpoint(run / "checkpoints" / ".last.tmp-1", 1)
    assert read_run(run).summary["status"] == "running"
    assert partial.is_dir()


# ---------------------------------------------------------------------------------------------
# malformed runs


BAD_FILES = {
    "summary is a list": ("summary.json", b"[]", "summary.json must hold an object, got []"),
    "summary is null": ("summary.json", b"null", "summary.json must hold an object, got None"),
    "accuracy is a string": ("summary.json", b'{"status": "completed", "best_test_acc": "abc"}',
                             "summary.json: best_test_acc must be a finite number, got 'abc'"),
    "duration is NaN": ("summary.json", b'{"status": "completed", "seconds": NaN}',
                        "summary.json: seconds must be a finite number, got nan"),
    "huge number": ("summary.json", b'{"status": "completed", "epochs_done": 1' + b"0" * 400 + b"}",
                    "summary.json: epochs_done must be a whole number"),
    "unknown status": ("summary.json", b'{"status": {"a": [1]}}', "summary.json: status must be a string"),
    "not UTF-8": ("summary.json", b'{"status": "\xff\xfe"}', "summary.json is not UTF-8 text"),
    "deep nesting": ("summary.json", b"[" * 100_000, "summary.json is nested too deeply"),
    "config is a string": ("config.json", b'"finetune"', "config.json must hold settings, got 'finetune'"),
    "config has a wrong type": ("config.json", b'{"epochs": "many"}', "config.json: epochs must be a whole number"),
    "config is invalid": ("config.json", b'{"strategy": "[/]"}', "config.json: strategy must be one of"),
    "config is a folder": ("config.json", None, "config.json is not a regular file"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_malformed_run_is_listed_as_unreadable_and_the_others_show(tmp_path, capsys, case):
    from core.cli import cmd_compare, cmd_runs

    name, content, why = BAD_FILES[case]
    bad, good = recorded_runs(tmp_path / "runs")
    if content is None:
        (bad / name).unlink()
        (bad / name).mkdir()
    else:
        (bad / name).write_bytes(content)

    runs = list_runs(tmp_path / "runs")
    assert [r.run_id for r in runs] == [bad.name, good.name]
    assert runs[0].unreadable and runs[0].summary["status"] == "unreadable" and why in runs[0].reason
    assert (runs[0].config is None) == (name == "config.json")  # never default settings
    assert not runs[1].unreadable and runs[1].summary["status"] == "completed"

    assert cmd_runs(str(tmp_path / "runs")) == 0
    out = capsys.readouterr().out
    assert good.name in out and "completed" in out
    (bad_row,) = [line for line in out.splitlines() if bad.name in line and "│" in line]
    assert "unreadable" in bad_row
    assert f"unreadable: {bad.name}: {why}" in out
    assert cmd_compare(str(tmp_path / "runs"), []) == 0  # newest of each strategy: the good one
    out = capsys.readouterr().out
    assert good.name in out and bad.name not in out
    assert cmd_compare(str(tmp_path / "runs"), [bad.name, good.name]) == 0
    assert f"unreadable: {bad.name}: {why}" in capsys.readouterr().out


def test_events_of_the_wrong_shape_or_type_are_skipped(tmp_path):
    (run,) = recorded_runs(tmp_path / "runs")[:1]
    good = read_events(run)
    step = next(json.dumps(ev.to_record(e)) for e in good if isinstance(e, ev.StepEnded))
    junk = [step.replace('"loss": ', '"loss": "abc", "x": '), "[]", "null", '"StepEnded"', "NaN",
            step.replace('"epoch": 1', '"epoch": 1.5'), step.replace('"lrs": {', '"lrs": {"bad": null, '),
            step.replace('"loss": ', '"loss": NaN, "y": '), step.replace('"step": ', '"step": true, "z": '),
            '{"event": ["StepEnded"]}', '{"event": "RunFinished", "status": "exploded"}',
            '{"event": "RunStarted", "config": {"epochs": "many"}}']
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(("\n".join(junk) + "\n").encode() + b"\xff\xfe not utf-8\n" + b"[" * 50_000 + b"\n")
    events = read_events(run)
    assert [type(e) for e in events] == [type(e) for e in good]
    for e in events:  # every event can be formatted as the CLI and the dashboard do
        if isinstance(e, ev.EpochEnded):
            ev.epoch_summary(e, 2)
        if isinstance(e, ev.RunFinished):
            ev.finish_summary(e)


def test_metrics_and_summary_are_strict_json(tmp_path):
    writer = store.RunWriter(RunConfig(runs_dir=str(tmp_path)))
    writer(ev.StepEnded(1, 1, 1, 2.3, {"all": 1e-3}, float("inf")))
    writer(ev.EpochEnded(1, 2.3, 0.1, float("nan"), float("nan"), 1.0))
    writer(ev.RunFinished(ev.FAILED, "x", float("nan"), float("-inf"), 1.0, 1))
    lines = [strict_loads(line) for line in (writer.path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["images_per_sec"] is None and lines[1]["test_loss"] is None
    assert lines[2]["best_test_acc"] is None and lines[2]["final_test_acc"] is None
    summary = strict_loads((writer.path / "summary.json").read_text())
    assert summary["best_test_acc"] is None and summary["final_test_acc"] is None


def test_duration_in_the_summary_is_kept_current_while_steps_go_on(tmp_path, monkeypatch):
    writer = store.RunWriter(RunConfig(runs_dir=str(tmp_path)))
    writer.started -= 100  # the run has been going for 100 s
    monkeypatch.setattr(store, "SUMMARY_EVERY", 0.0)
    writer(ev.StepEnded(1, 1, 1, 2.3, {"all": 1e-3}, 10.0))
    assert json.loads((writer.path / "summary.json").read_text())["seconds"] >= 100
    writer.started -= 100
    monkeypatch.setattr(store, "SUMMARY_EVERY", 30.0)  # written at most every 30 s
    writer(ev.StepEnded(1, 2, 2, 2.3, {"all": 1e-3}, 10.0))
    assert json.loads((writer.path / "summary.json").read_text())["seconds"] < 200
    writer(ev.EpochEnded(1, 2.3, 0.1, 2.3, 0.1, 1.0))  # and on every epoch
    assert json.loads((writer.path / "summary.json").read_text())["seconds"] >= 200
    writer.close()


# ---------------------------------------------------------------------------------------------
# fuzz: mutated runs folders through every reader

FUZZ_VARIANTS = 600
JSON_FILES = ("summary.json", "config.json")


def junk(rng, depth=0):
    """A random JSON-able value: wrong types, huge or non-finite numbers, markup, nesting."""
    kind = rng.randrange(12 if depth < 3 else 9)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randrange(-10, 10)
    if kind == 3:
        return rng.choice([1, -1]) * 10 ** rng.randrange(15, 400)
    if kind == 4:
        return rng.choice([float("nan"), float("inf"), float("-inf"), 1e308, -0.0, 5e-324, 0.25])
    if kind in (5, 6):
        return rng.choice(["", "abc", "[/]", "[bold]x", "\x00", "é" * 3, "completed", "running", "finetune",
                           "imagefolder:[red]", "1e3", "NaN", " " * 50, "\n\r\t"])
    if kind in (7, 8):
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(0, 20)))
    if kind in (9, 10):
        return [junk(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {rng.choice(["status", "epoch", "loss", "a", ""]): junk(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def mutate_json(rng, text: bytes) -> bytes:
    """One mutation of a JSON document (summary.json / config.json)."""
    how = rng.randrange(11)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # (a line mutated before into 50,000 brackets)
        data = None  # already mutated: mutate its bytes
    if how < 4 and isinstance(data, dict):
        keys = list(data) or ["x"]
        key = rng.choice(keys)
        if how == 0:
            data = junk(rng)
        elif how == 1:
            data[key] = junk(rng)
        elif how == 2:
            data.pop(key, None)
        else:
            data[rng.choice(["extra", key + "_", ""])] = junk(rng)
        return json.dumps(data).encode()
    if how <= 4:
        return text[: rng.randrange(len(text) + 1)]
    if how == 5 and text:
        out = bytearray(text)
        for _ in range(rng.randrange(1, 6)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    if how == 6:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    if how == 7:
        return rng.choice([b"[", b'{"a":', b"[{}, "]) * rng.randrange(100, 50_000)
    if how == 8:
        key = rng.choice([b'"seconds"', b'"epochs"', b'"best_test_acc"', b'"pid"', b'"lr"'])
        return text.replace(key + b": ", key + b": " + b"9" * rng.randrange(300, 6000) + b" , \"_\": ", 1)
    if how == 9:
        key = rng.choice([b'"seconds"', b'"lr"', b'"final_test_acc"', b'"started"'])
        return text.replace(key + b": ", key + b": " + rng.choice([b"NaN", b"Infinity", b"-Infinity"]) + b", \"_\": ", 1)
    return rng.choice([b"", b"null", b"[]", b'"x"', b"0", b"true", b"{}", b"\xff\xfe\x00"])


def mutate_metrics(rng, text: bytes) -> bytes:
    """Mutations of a few lines of metrics.jsonl (or of the whole file)."""
    lines = text.splitlines()
    if rng.random() < 0.1:
        return mutate_json(rng, text) if rng.random() < 0.5 else bytes(rng.randrange(256) for _ in range(300))
    for _ in range(rng.randrange(1, 6)):
        i = rng.randrange(len(lines))
        how = rng.randrange(6)
        try:
            record = json.loads(lines[i])
        except (ValueError, RecursionError):
            record = None  # a line mutated before (into one too deep for json, too)
        if how < 3 and isinstance(record, dict):
            key = rng.choice([k for k in record if k != "event"] or ["event"])
            if how == 0:
                record[key] = junk(rng)
            elif how == 1:
                record.pop(key)
            else:
                record["event"] = junk(rng) if rng.random() < 0.3 else rng.choice(list(ev.EVENT_TYPES))
            lines[i] = json.dumps(record).encode()
        else:
            lines[i] = mutate_json(rng, lines[i]) if how == 3 else lines[i][: rng.randrange(len(lines[i]) + 1)]
    return b"\n".join(lines) + b"\n"


def check_record(run):
    """What every reader may rely on in a RunRecord."""
    assert set(run.summary) == set(store.SUMMARY_FIELDS)
    for key, kind in store.SUMMARY_FIELDS.items():
        ev.checked(run.summary[key], f"Optional[{kind}]", key)
    if run.unreadable:
        assert run.summary["status"] == "unreadable" and run.reason
    else:
        assert run.config is not None and run.summary["status"] in store.RUN_STATUSES + ("interrupted",)


def test_fuzz_mutated_runs_folders_never_break_the_readers(tmp_path, capsys):
    import random

    from core.cli import cmd_compare, cmd_runs
    from core.config import from_mapping

    rng = random.Random(20261129)
    root = tmp_path / "runs"
    good = recorded_runs(root)
    originals = {name: (good[0] / name).read_bytes() for name in (*JSON_FILES, "metrics.jsonl")}
    bad = root / "20261129-235959-finetune-digits"
    unreadable = 0
    for variant in range(FUZZ_VARIANTS):
        shutil.rmtree(bad, ignore_errors=True)
        bad.mkdir()
        for name, content in originals.items():
            (bad / name).write_bytes(content)
        changed = rng.sample(sorted(originals), rng.randrange(1, 4))
        for name in changed:
            if rng.random() < 0.05:
                (bad / name).unlink()
                if rng.random() < 0.5:
                    (bad / name).mkdir()
            elif name == "metrics.jsonl":
                (bad / name).write_bytes(mutate_metrics(rng, originals[name]))
            else:
                (bad / name).write_bytes(mutate_json(rng, originals[name]))
        try:
            runs = list_runs(root)
            assert [r.run_id for r in runs] == [*(g.name for g in good), bad.name]
            for run in runs:
                check_record(run)
            assert not runs[0].unreadable and not runs[1].unreadable
            unreadable += runs[2].unreadable
            for event in read_events(bad):  # what replay and the plots do with them
                if isinstance(event, ev.RunStarted):
                    from_mapping(event.config)
                elif isinstance(event, ev.EpochEnded):
                    ev.epoch_summary(event, 3)
                elif isinstance(event, ev.RunFinished):
                    ev.finish_summary(event)
            assert cmd_runs(str(root)) == 0
            out = capsys.readouterr().out
            assert all(g.name in out for g in good)
            assert cmd_compare(str(root), []) == 0
            assert cmd_compare(str(root), [bad.name, good[0].name]) == 0
            assert good[0].name in capsys.readouterr().out
        except BaseException:
            print(f"fuzz variant {variant} (changed {changed}):")
            for name in changed:
                if (bad / name).is_file():
                    print(name, (bad / name).read_bytes()[:300])
            raise
    print(f"fuzz: {FUZZ_VARIANTS} variants, {unreadable} unreadable")
    # the mutations do produce unreadable runs, and leave some readable
    assert 0.3 * FUZZ_VARIANTS < unreadable < FUZZ_VARIANTS


def test_io_errors_are_named_whoever_raises_them():
    assert store.io_error_reason(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"
    copytree = shutil.Error([("a", "b", "[Errno 28] No space left on device: 'b/x'")])
    assert store.io_error_reason(copytree) == "No space left on device"
    rust = Exception("Error while serializing: I/O error: No space left on device (os error 28)")  # safetensors
    assert store.io_error_reason(rust) == "No space left on device"
    assert store.io_error_reason(TypeError("a bug")) is None
