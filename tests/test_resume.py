"""Resume: a run stopped (or ended) and continued in its folder ends exactly as the same run
uninterrupted; runs that cannot be continued are refused with one line."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from core import events as ev
from core.config import RunConfig
from core.store import read_events, read_run
from core.trainer import (NothingToResume, ResumeError, RunControl, plan_resume, prepare_resume, train)
from core.weights import load_checkpoint

from conftest import cli_env, transferlab_cmd, write_long_run

STEPS_PER_EPOCH = 4
TOLERANCE = 1e-6


@pytest.fixture(autouse=True)
def _each_step_told_at_once(monkeypatch):
    """A stop asked by a listener at step N lands at the next step boundary: the trainer tells
    every step at once (fast steps are told in batches, and a stop asked at step 6 landed at 8)."""
    from core import trainer

    monkeypatch.setattr(trainer, "FLUSH_STEPS", 1)


def cfg_for(runs_dir, **changes):
    """Tiny digits, flips on (the random state matters), 4 steps per epoch, 4 epochs."""
    return RunConfig(dataset="digits", pretrained="none", image_size=16, batch_size=16, epochs=4,
                     limit_train=64, limit_test=32, device="cpu", hflip=True, vflip=True,
                     runs_dir=str(runs_dir)).replace(**changes)


def run(cfg, stop_when=None, prepared=None):
    """Train (or continue `prepared`), asking for a stop at the first StepEnded `stop_when`
    accepts; returns (result, run folder)."""
    control, folder = RunControl(), []

    def listener(event):
        if isinstance(event, ev.RunStarted):
            folder.append(Path(event.run_dir))
        if isinstance(event, ev.StepEnded) and stop_when is not None and stop_when(event):
            control.request_stop()

    result = train(cfg, [listener], control, prepared=prepared)
    return result, folder[0]


def steps_of(run_dir):
    return [e for e in ev.as_one_run(read_events(run_dir)) if isinstance(e, ev.StepEnded)]


def epochs_of(run_dir):
    return [e for e in ev.as_one_run(read_events(run_dir)) if isinstance(e, ev.EpochEnded)]


def weight_diff(a_dir, b_dir):
    """The largest absolute difference between the tensors of two runs' checkpoints/last."""
    a, _, _ = load_checkpoint(a_dir / "checkpoints" / "last", with_optimizer=False)
    b, _, _ = load_checkpoint(b_dir / "checkpoints" / "last", with_optimizer=False)
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].numpy().astype(np.float64) - b[k].numpy().astype(np.float64)).max())
               for k in a)


def assert_same_run(resumed, reference):
    """Same weights, the same steps with the same losses, the same epoch results."""
    assert weight_diff(resumed, reference) <= TOLERANCE
    got, want = steps_of(resumed), steps_of(reference)
    assert [(s.epoch, s.step, s.global_step) for s in got] == [(s.epoch, s.step, s.global_step) for s in want]
    assert max(abs(a.loss - b.loss) for a, b in zip(got, want)) <= TOLERANCE
    got, want = epochs_of(resumed), epochs_of(reference)
    assert [e.epoch for e in got] == [e.epoch for e in want]
    for a, b in zip(got, want):
        for name in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert abs(getattr(a, name) - getattr(b, name)) <= TOLERANCE, name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same 4-epoch run, never interrupted."""
    result, folder = run(cfg_for(tmp_path_factory.mktemp("reference")))
    assert result.status == ev.COMPLETED
    return folder


def resume_and_check(folder, reference, epochs=None):
    prepared = prepare_resume(folder, epochs)
    result, same = run(prepared.cfg, prepared=prepared)
    assert same == folder and result.status == ev.COMPLETED and result.epochs_done == 4
    assert read_run(folder).summary["status"] == "completed"
    assert_same_run(folder, reference)
    return result


def test_stopped_mid_epoch_and_resumed_equals_the_run_uninterrupted(tmp_path, reference):
    result, folder = run(cfg_for(tmp_path), stop_when=lambda e: e.global_step == 6)
    assert result.status == ev.STOPPED
    marker = plan_resume(folder).marker()
    assert marker.epoch == 2 and 2 <= marker.step < STEPS_PER_EPOCH  # mid-epoch, at a step boundary
    resume_and_check(folder, reference)
    records = read_events(folder)
    resumed = [e for e in records if isinstance(e, ev.RunResumed)]
    assert resumed == [marker]  # one marker line, where the run continued
    assert [type(e) for e in records].count(ev.RunFinished) == 2  # stopped, then completed
    globals_ = [s.global_step for s in steps_of(folder)]
    assert globals_ == list(range(1, 4 * STEPS_PER_EPOCH + 1))


def test_stopped_at_the_end_of_an_epoch_and_resumed_equals_the_run_uninterrupted(tmp_path, reference):
    # the stop asked at the epoch's last step lands in its evaluation: the epoch's training is
    # done, its results are not; the resumed run evaluates it with the epoch's losses kept
    result, folder = run(cfg_for(tmp_path), stop_when=lambda e: e.epoch == 2 and e.step == STEPS_PER_EPOCH)
    assert result.status == ev.STOPPED and result.epochs_done == 1
    marker = plan_resume(folder).marker()
    assert (marker.epoch, marker.step, marker.epochs_done) == (2, STEPS_PER_EPOCH, 1)
    resume_and_check(folder, reference)


def test_a_completed_run_extended_equals_the_longer_run(tmp_path, reference):
    result, folder = run(cfg_for(tmp_path, epochs=3))
    assert result.status == ev.COMPLETED
    # the learning rate is constant (no schedule): 3 epochs + 1 is the 4-epoch run
    lrs = {tuple(sorted(s.lrs.items())) for s in steps_of(reference)}
    assert len(lrs) == 1
    with pytest.raises(NothingToResume, match="is completed .3 epochs.: give --epochs N with N > 3"):
        plan_resume(folder)
    with pytest.raises(NothingToResume, match="--epochs must be at least 4"):
        plan_resume(folder, epochs=2)
    resume_and_check(folder, reference, epochs=4)
    assert json.loads((folder / "config.json").read_text())["epochs"] == 4
    assert read_run(folder).summary["epochs"] == 4 and read_run(folder).summary["epochs_done"] == 4


# -- with a schedule, progressive unfreezing and the other regularisation settings -----------------

SCHEDULED = dict(schedule="cosine", warmup_epochs=1.5, label_smoothing=0.1, no_wd_bn_bias=True)
"""The lr changes at every step (warmup over 6 steps, then cosine): its position is the global step."""
UNFROZEN = dict(strategy="frozen", unfreeze_epoch=3, lr=0.01, lr_backbone=0.002, schedule="onecycle",
                no_wd_bn_bias=True)
"""The backbone joins the optimizer at the end of epoch 2, before that epoch's checkpoint."""


@pytest.fixture(scope="module")
def scheduled_reference(tmp_path_factory):
    result, folder = run(cfg_for(tmp_path_factory.mktemp("scheduled"), **SCHEDULED))
    assert result.status == ev.COMPLETED
    assert len({s.lrs["all"] for s in steps_of(folder)}) == 4 * STEPS_PER_EPOCH  # a new lr at every step
    return folder


def test_a_run_with_a_schedule_stopped_mid_epoch_and_resumed_equals_the_run_uninterrupted(
        tmp_path, scheduled_reference):
    result, folder = run(cfg_for(tmp_path, **SCHEDULED), stop_when=lambda e: e.global_step == 6)
    assert result.status == ev.STOPPED
    resume_and_check(folder, scheduled_reference)
    got, want = steps_of(folder), steps_of(scheduled_reference)
    assert [s.lrs for s in got] == [s.lrs for s in want]


def test_progressive_unfreezing_resumed_on_either_side_of_its_epoch_equals_the_run_uninterrupted(tmp_path):
    result, reference = run(cfg_for(tmp_path / "reference", **UNFROZEN))
    assert result.status == ev.COMPLETED
    assert [sorted(s.lrs) for s in steps_of(reference)][7:9] == [["head"], ["backbone", "head"]]
    # aborted once epoch 2's checkpoint is written (the run continues from it: it must hold the
    # backbone's group already), and stopped in epoch 3 after the unfreezing
    for where, stop in (("boundary", lambda e: isinstance(e, ev.CheckpointSaved) and e.epoch == 2),
                        ("after", lambda e: isinstance(e, ev.StepEnded) and e.global_step == 10)):
        control, folders = RunControl(), []

        def listener(event):
            if isinstance(event, ev.RunStarted):
                folders.append(Path(event.run_dir))
            if stop(event):
                control.request_abort() if where == "boundary" else control.request_stop()

        result = train(cfg_for(tmp_path / where, **UNFROZEN), [listener], control)
        assert result.status == (ev.ABORTED if where == "boundary" else ev.STOPPED), where
        assert plan_resume(folders[0]).marker().epoch == 3, where
        resume_and_check(folders[0], reference)
        assert [s.lrs for s in steps_of(folders[0])] == [s.lrs for s in steps_of(reference)], where


# -- refusals (run folders written by hand: no training needed) ------------------------------------

def fake_run(runs_dir, run_id, status="stopped", pid=1, meta=None):
    path = write_long_run(runs_dir, steps=40, epochs=2, run_id=run_id)
    summary = json.loads((path / "summary.json").read_text())
    summary.update(status=status, pid=pid)
    (path / "summary.json").write_text(json.dumps(summary))
    if meta is not None:
        (path / "checkpoints" / "last").mkdir(parents=True)
        (path / "checkpoints" / "last" / "meta.json").write_text(json.dumps(meta))
    return path


RNG = np.random.default_rng(0).bit_generator.state
RESUME_RECORD = {"epoch": 3, "step": 0, "global_step": 40, "epochs_done": 2, "best_acc": 0.5, "last_acc": 0.5,
                 "rng_epoch": RNG, "rng": RNG, "epoch_losses": [], "epoch_correct": 0}


def test_runs_that_cannot_be_resumed_are_refused_with_a_reason(tmp_path):
    runs = tmp_path / "runs"
    cases = {
        fake_run(runs, "a-running", status="running", pid=os.getpid(), meta={"resume": RESUME_RECORD}):
            "is still running",
        fake_run(runs, "b-no-checkpoint"): "has no checkpoints/last",
        fake_run(runs, "c-old-checkpoint", meta={"epoch": 1}): "no resume record",
        fake_run(runs, "d-bad-record", meta={"resume": {**RESUME_RECORD, "step": "two"}}):
            "step must be a whole number",
        fake_run(runs, "d-bad-rng", meta={"resume": {**RESUME_RECORD, "rng": {"bit_generator": "MT19937"}}}):
            "rng is not a random generator state",
    }
    for path, reason in cases.items():
        with pytest.raises(ResumeError, match=reason):
            plan_resume(path)
    (runs / "e-unreadable").mkdir()
    (runs / "e-unreadable" / "summary.json").write_text("{")
    with pytest.raises(ResumeError, match="is unreadable"):
        plan_resume(runs / "e-unreadable")
    # a run whose process is gone reads "interrupted", and that one can continue
    mid_epoch = {**RESUME_RECORD, "epoch": 2, "step": 1, "epochs_done": 1}
    gone = fake_run(runs, "f-interrupted", status="running", pid=2 ** 22 + 17, meta={"resume": mid_epoch})
    assert read_run(gone).summary["status"] == "interrupted"
    assert plan_resume(gone).cfg.epochs == 2 and plan_resume(gone, epochs=5).cfg.epochs == 5
    with pytest.raises(NothingToResume, match="is completed"):
        plan_resume(fake_run(runs, "g-completed", status="completed", meta={"resume": RESUME_RECORD}))


def test_command_line_resume_and_its_exit_codes(tmp_path):
    runs = tmp_path / "runs"
    result, folder = run(cfg_for(runs, epochs=2), stop_when=lambda e: e.global_step == 2)
    assert result.status == ev.STOPPED
    fake_run(runs, "x-running", status="running", pid=os.getpid(), meta={"resume": RESUME_RECORD})

    def cli(*args):
        done = subprocess.run([*transferlab_cmd(), "train", *args, "--runs-dir", str(runs)], capture_output=True,
                              text=True, env=cli_env(), timeout=600)
        return done.returncode, done.stderr

    code, err = cli("--resume", folder.name, "--lr", "0.1")
    assert code == 2 and "--lr cannot be given with it" in err and "Traceback" not in err
    code, err = cli("--resume", "no-such-run")
    assert code == 2 and "no run 'no-such-run'" in err
    code, err = cli("--resume", "x-running")
    assert code == 1 and "still running" in err and "Traceback" not in err
    code, err = cli("--resume", folder.name[-12:])  # a unique part of the id
    assert code == 0, err
    summary = read_run(folder).summary
    assert summary["status"] == "completed" and summary["epochs_done"] == 2
    assert [s.global_step for s in steps_of(folder)] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    code, err = cli("--resume", str(folder))  # a path; nothing left to do
    assert code == 2 and "is completed" in err


async def test_runs_screen_key_resumes_a_stopped_run_and_refuses_others(tmp_path):
    from test_tui import SIZE, log_text, wait_until
    from tui.app import TransferLabApp
    from tui.runs import RunsScreen

    runs = tmp_path / "runs"
    result, folder = run(cfg_for(runs, epochs=1), stop_when=lambda e: e.global_step == 2)
    assert result.status == ev.STOPPED
    fake_run(runs, "20000101-000000-finetune-digits")  # stopped, without a checkpoint (older: listed 2nd)
    app = TransferLabApp(cfg_for(runs))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await wait_until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.runs)
        screen = app.screen
        assert "R Resume" in str(screen.query_one("KeyBar").render())
        assert "Resume run" in [c.title for c in app.get_system_commands(screen)]
        await pilot.press("down", "R")
        await pilot.pause()
        assert app.live is None and isinstance(app.screen, RunsScreen)
        assert any("has no checkpoints/last" in n.message for n in app._notifications)
        await pilot.press("up", "R")
        await wait_until(pilot, lambda: app.live is not None and app.live.status == ev.COMPLETED)
        assert app.current_mode == "dashboard" and app.live.resume == folder
        dashboard = app.dashboard
        assert "Resumedatepoch1step" in log_text(dashboard)
        assert dashboard.last_step.global_step == STEPS_PER_EPOCH
        assert [s.global_step for s in steps_of(folder)] == list(range(1, STEPS_PER_EPOCH + 1))
        assert read_run(folder).summary["status"] == "completed"


def test_a_resumed_runs_record_reads_as_one_run():
    """A run killed in epoch 2 after its epoch-1 checkpoint recorded steps 5-6 that the resumed run
    does again: readers drop the first ones; the RunResumed line is type-checked like any event."""
    step = lambda e, s, g: ev.StepEnded(e, s, g, float(g), {"all": 0.1}, 1.0)  # noqa: E731
    epoch1 = ev.EpochEnded(1, 1.0, 0.5, 1.0, 0.5, 1.0)
    marker = ev.RunResumed("r", 2, 0, 4, 1, 3)
    recorded = [*(step(1, s, s) for s in range(1, 5)), epoch1, step(2, 1, 5), step(2, 2, 6),
                ev.EpochEnded(2, 9.0, 0.0, 9.0, 0.0, 1.0),  # as if written before the kill
                marker, step(2, 1, 5), step(2, 2, 6), step(2, 3, 7)]
    whole = ev.as_one_run(ev.from_record(json.loads(json.dumps(ev.to_record(e)))) for e in recorded)
    assert [e.global_step for e in whole if isinstance(e, ev.StepEnded)] == [1, 2, 3, 4, 5, 6, 7]
    assert [e for e in whole if isinstance(e, ev.EpochEnded)] == [epoch1]
    assert whole.count(marker) == 1
    with pytest.raises(ValueError, match="global_step must be a whole number"):
        ev.from_record({**ev.to_record(marker), "global_step": 4.5})

