"""The LR finder (core.lrfind): its suggestion on a problem whose good range is known, early stops,
the real run untouched, the CLI's `lr-find`, and the app's screen that puts the suggestion in the form."""
import asyncio
import math
import re
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from core import lrfind
from core.config import RunConfig
from core.lrfind import SweepPoint, SweepResult, apply_suggestion, lr_find

from conftest import ROOT, cli_env, transferlab_cmd

MOMENTUM = 0.9


def softmax_regression(strategy="finetune", hidden=0, **changes):
    """A Prepared run of a linear (or one-hidden-layer) classifier on the 8x8 digits, no resize:
    a problem small enough to analyse, with the run's own data pipeline and SGD."""
    from core.backend import flow
    from core.data import load_dataset
    from core.strategies import build_param_groups
    from core.trainer import Prepared
    from oneflow import nn

    cfg = RunConfig(dataset="digits", pretrained="none", image_size=8, batch_size=16, strategy=strategy,
                    momentum=MOMENTUM, device="cpu", runs_dir="/nonexistent/runs", **changes)
    train, test = load_dataset("digits", "", 8)
    flow.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(192, hidden), nn.ReLU(), nn.Linear(hidden, 10)] if hidden else \
        [nn.Flatten(), nn.Linear(192, 10)]
    model = nn.Sequential(*layers)
    head = str(len(layers) - 1)
    groups = build_param_groups(model, strategy, head, cfg.lr, cfg.lr_backbone)
    n = sum(p.numel() for p in model.parameters())
    return Prepared(cfg, "cpu", train, test, model, head, groups, n, n)


def stability_limit(p):
    """The largest stable SGD learning rate at the start of softmax regression on p's data.

    At initialisation the predicted probabilities are about uniform (1/K), so the Hessian of the
    mean cross-entropy in the weights is (I/K - 11^T/K^2) (x) E[x x^T] (x with a 1 for the bias):
    its largest eigenvalue is lambda_max(E[x x^T]) / K. Heavy-ball SGD with momentum m on a
    quadratic diverges along that direction above lr = 2 (1 + m) / lambda. A good learning rate
    sits below this limit and not orders of magnitude below it (then training crawls)."""
    from core.backend import flow
    from core.data import BatchTransform

    t = BatchTransform(flow, "cpu", (8, 8), 8, p.cfg.normalize, False, False)
    x = t(p.train.images, False, None).reshape(len(p.train), -1).numpy().astype(np.float64)
    x = np.hstack([x, np.ones((len(x), 1))])
    lam = np.linalg.eigvalsh(x.T @ x / len(x)).max() / 10
    return 2 * (1 + MOMENTUM) / lam


def test_suggestion_falls_in_the_range_theory_gives_for_softmax_regression():
    p = softmax_regression()
    limit = stability_limit(p)
    result = lr_find(p.cfg, prepared=p)
    assert result.planned == 90  # bounded by the data: 1,437 images in batches of 16
    assert result.suggestion is not None, result.why
    assert limit / 100 <= result.suggestion <= limit, (result.suggestion, limit)
    # the sweep's rates grow geometrically from 1e-7 towards 10
    lrs = [pt.lr for pt in result.points]
    assert lrs[0] == pytest.approx(1e-7) and np.allclose(np.diff(np.log(lrs)), math.log(1e8) / 89)


def test_suggestion_ignores_the_noise_of_a_flat_start():
    """A short sweep recorded on ResNet-18 from scratch (digits, 16 px, batch 64: 21 of 23 steps):
    the curve is flat with noise until ~1e-3; its largest wiggle is between the first two points,
    where the average holds one or two losses."""
    smoothed = [2.48, 2.446, 2.517, 2.505, 2.475, 2.469, 2.448, 2.435, 2.445, 2.465, 2.46, 2.443, 2.433, 2.406,
                2.408, 2.389, 2.435, 2.494, 2.759, 5.195, 10.89]
    lrs = list(lrfind.sweep_lrs(1e-7, 10, 23)[:21])
    suggestion, why = lrfind.suggest(lrs, smoothed)
    lowest = lrs[int(np.argmin(smoothed))]
    assert suggestion is not None and lowest / 100 <= suggestion < lowest, (suggestion, why)
    none, why = lrfind.suggest(lrs, sorted(smoothed))  # rising from the first step: it never fell
    assert none is None and "did not fall" in why


def test_sweep_stops_early_when_the_loss_diverges_or_is_not_finite(monkeypatch):
    p = softmax_regression()
    result = lr_find(p.cfg, prepared=p)
    assert result.stopped == lrfind.DIVERGING and len(result.points) < result.planned
    smoothed = [pt.smoothed for pt in result.points]
    assert smoothed[-1] > 4 * min(smoothed) and all(s <= 4 * min(smoothed[:i + 1]) for i, s in enumerate(smoothed[:-1]))
    # the smoothing is an EMA with bias correction: the first point is the first loss itself
    assert smoothed[0] == pytest.approx(result.points[0].loss)
    monkeypatch.setattr(lrfind, "DIVERGED", math.inf)  # only a loss that is not finite stops it now
    result = lr_find(p.cfg, prepared=p, start_lr=1e-3, end_lr=1e12)
    assert result.stopped == lrfind.NOT_FINITE and len(result.points) < result.planned
    assert all(math.isfinite(pt.loss) for pt in result.points) and "not finite" not in result.why


def test_discriminative_sweep_keeps_the_backbone_ratio_and_cancel_stops_between_steps():
    p = softmax_regression("discriminative", hidden=16, lr=0.01, lr_backbone=0.001)
    seen, cancel = [], threading.Event()

    def on_step(progress):
        seen.append(progress.lrs)
        if len(seen) == 3:
            cancel.set()

    result = lr_find(p.cfg, prepared=p, on_step=on_step, cancel=cancel)
    assert result.stopped == lrfind.CANCELLED and len(result.points) == 3
    for lrs, point in zip(seen, result.points):
        assert lrs["head"] == pytest.approx(point.lr) and lrs["backbone"] == pytest.approx(point.lr * 0.1)
    assert result.backbone_ratio == pytest.approx(0.1)


def test_apply_suggestion_sets_lr_and_keeps_the_discriminative_ratio():
    plain = RunConfig(strategy="finetune", lr=0.001, lr_backbone=0.0001)
    assert apply_suggestion(plain, 0.02) == plain.replace(lr=0.02)
    disc = plain.replace(strategy="discriminative", lr=0.01, lr_backbone=0.002)
    new = apply_suggestion(disc, 0.05)
    assert new.lr == 0.05 and new.lr_backbone == pytest.approx(0.01)


def test_the_real_model_is_untouched_and_nothing_is_written(tiny_cfg, tmp_path):
    from core.trainer import prepare

    p = prepare(tiny_cfg)
    before = {k: v.numpy().copy() for k, v in p.model.state_dict().items()}
    result = lr_find(tiny_cfg, steps=4, start_lr=0.1, end_lr=10, prepared=p)
    assert len(result.points) >= 2
    after = p.model.state_dict()
    assert all(np.array_equal(before[k], after[k].numpy()) for k in before)
    assert not (tmp_path / "runs").exists()
    # without a prepared run: its own model, and the runs folder is not even needed
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    listing = sorted(tmp_path.iterdir())
    result = lr_find(tiny_cfg.replace(runs_dir=str(blocker / "runs")), steps=3)
    assert len(result.points) == 3 and sorted(tmp_path.iterdir()) == listing


# -- the command line ----------------------------------------------------------------------------


def run_cli(*args, cwd):
    return subprocess.run([*transferlab_cmd(), "lr-find", *args], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=600)


TINY_FLAGS = ("--dataset", "digits", "--pretrained", "none", "--image-size", "16", "--batch-size", "32",
              "--limit-train", "320", "--device", "cpu")


def test_cli_plots_the_curve_and_ends_with_the_suggestion(tmp_path):
    proc = run_cli(*TINY_FLAGS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.rstrip("\n").splitlines()
    assert re.fullmatch(r"suggested lr: (\d\.\d+|0\.\d+|\d\.\de-\d\d)", lines[-1]), lines[-1]
    assert "learning rate (log scale)" in proc.stdout and "suggested " + lines[-1].split(": ")[1] in proc.stdout
    assert sum(line.count("┤") for line in lines) >= 3  # the plot's y axis ticks
    assert "\x1b[" not in proc.stdout  # no colour codes into a pipe
    assert not (tmp_path / "runs").exists()


def test_cli_bad_flags_get_one_line_and_exit_2(tmp_path):
    for flags, message in ((("--steps", "1"), "--steps must be between 2"),
                           (("--steps", "many"), "--steps must be a whole number, got 'many'"),
                           (("--start-lr", "1", "--end-lr", "0.1"), "--end-lr (0.1) must be larger than --start-lr (1)"),
                           (("--end-lr", "-3"), "--end-lr must be a positive number"),
                           (("--lr", "zero"), "--lr must be a number")):
        proc = run_cli(*flags, cwd=tmp_path)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], (flags, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_cli_ctrl_c_ends_cleanly(tmp_path):
    # a sweep of about 25 s (180 steps at 32 px, to 1e-3 where the loss does not diverge): Ctrl-C lands in it
    proc = subprocess.Popen([*transferlab_cmd(), "lr-find", *TINY_FLAGS, "--limit-train", "0", "--batch-size", "8",
                             "--image-size", "32", "--steps", "400", "--end-lr", "1e-3"],
                            cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(12)  # oneflow imported, data and model loading or sweeping
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted: no learning rate suggested" in err
    assert "suggested lr:" not in out


# -- the app -------------------------------------------------------------------------------------


def app_cfg(tmp_path, **changes):
    return RunConfig(dataset="digits", pretrained="none", image_size=16, batch_size=32, limit_train=320,
                     limit_test=32, device="cpu", runs_dir=str(tmp_path / "runs")).replace(**changes)


async def wait_until(pilot, condition, timeout=180.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await pilot.pause(0.05)


async def test_ctrl_l_runs_the_finder_and_enter_puts_its_suggestion_in_the_form(tmp_path):
    from textual.widgets import Input

    from tui.app import TransferLabApp
    from tui.lrfind import LRFindScreen, SweepPlot

    app = TransferLabApp(app_cfg(tmp_path))
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.pause()
        form = app.screen
        await pilot.press("ctrl+l")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, LRFindScreen)
        await wait_until(pilot, lambda: screen.result is not None)
        assert screen.result.suggestion is not None, screen.result.why
        assert len(screen.query_one(SweepPlot).points) == len(screen.result.points) >= 5
        assert "suggested lr:" in str(screen.query_one("#lrfind-status").render())
        await pilot.press("enter")
        await pilot.pause()
        assert app.screen is form
        assert float(form.query_one("#f-lr", Input).value) == screen.result.suggestion
        assert form.cfg.lr == screen.result.suggestion
        assert not (tmp_path / "runs").exists()


def fake_sweep(suggestion):
    points = tuple(SweepPoint(i, 10.0 ** (i - 7), 2.0 - 0.1 * i, 2.0 - 0.1 * i) for i in range(1, 6))
    return lambda cfg, **kw: SweepResult(points, suggestion, "5 steps", lrfind.FINISHED, 5, 0.1, 0.1)


async def test_discriminative_suggestion_scales_the_backbone_lr_and_escape_cancels(tmp_path, monkeypatch):
    from textual.widgets import Input

    from tui.app import TransferLabApp
    from tui.lrfind import LRFindScreen

    monkeypatch.setattr(lrfind, "lr_find", fake_sweep(0.05))
    app = TransferLabApp(app_cfg(tmp_path, strategy="discriminative", lr=0.01, lr_backbone=0.002))
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.pause()
        form = app.screen
        await pilot.press("ctrl+l")
        await wait_until(pilot, lambda: isinstance(app.screen, LRFindScreen) and app.screen.result is not None)
        await pilot.press("escape")  # closes without touching the form
        await pilot.pause()
        assert app.screen is form and form.query_one("#f-lr", Input).value == "0.01"
        await pilot.press("ctrl+l")
        await wait_until(pilot, lambda: isinstance(app.screen, LRFindScreen) and app.screen.result is not None)
        await pilot.press("u")
        await pilot.pause()
        assert form.query_one("#f-lr", Input).value == "0.05"
        assert form.query_one("#f-lr_backbone", Input).value == "0.01"
        assert form.cfg.lr == 0.05 and form.cfg.lr_backbone == pytest.approx(0.01)


async def test_finder_errors_are_one_toast_and_the_palette_offers_it(tmp_path):
    from tui.app import TransferLabApp
    from tui.lrfind import LRFindScreen

    app = TransferLabApp(app_cfg(tmp_path, dataset="imagefolder:" + str(tmp_path / "missing")))
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.pause()
        form = app.screen
        assert any(cmd.title == "LR finder" for cmd in app.get_system_commands(form))
        await pilot.press("ctrl+l")
        await wait_until(pilot, lambda: app.screen is form and app._notifications)
        notes = list(app._notifications)
        assert len(notes) == 1 and "train/ folder" in notes[0].message
        assert not isinstance(app.screen, LRFindScreen)


async def test_the_palette_over_an_open_finder_offers_none_of_the_forms_actions(tmp_path, monkeypatch):
    """ctrl+p over the finder's screen: no second sweep, no run, experiment or preset while it
    sweeps (they were offered, and a run started under the sweep); the app's own commands stay."""
    from tui.app import TransferLabApp
    from tui.lrfind import LRFindScreen

    started = []

    def waiting_sweep(cfg, cancel=None, **kw):
        started.append(cfg)
        cancel.wait(30)
        return SweepResult((), None, "cancelled", lrfind.CANCELLED, 5, 0.1)

    monkeypatch.setattr(lrfind, "lr_find", waiting_sweep)
    app = TransferLabApp(app_cfg(tmp_path))
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.pause()
        form_titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {"Start run", "Run experiment", "LR finder", "Load preset"} <= form_titles
        await pilot.press("ctrl+l")
        await wait_until(pilot, lambda: len(started) == 1)
        assert isinstance(app.screen, LRFindScreen)
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert not titles & {"Start run", "Run experiment", "LR finder", "Load preset", "Save preset", "Open form"}
        assert "Quit" in titles
        await pilot.press("escape")
        await pilot.pause()


def test_the_sweep_measures_the_loss_the_run_trains_on(tiny_cfg):
    """With label smoothing, the sweep's first loss (before any update: the lr does not matter)
    is the run's first step's: same weights, batch and flips, and the same (smoothed) loss."""
    from core import events as ev
    from core.trainer import train

    cfg = tiny_cfg.replace(label_smoothing=0.5)
    steps = []
    train(cfg, listeners=[lambda e: steps.append(e) if isinstance(e, ev.StepEnded) else None])
    result = lr_find(cfg, steps=2)
    assert result.points[0].loss == pytest.approx(steps[0].loss, rel=1e-5)


def test_the_sweep_keeps_weight_decay_off_batchnorm_and_biases_when_the_run_does(tiny_cfg):
    """A strong weight decay at a high rate: the second loss shows whether BatchNorm weights and
    biases decayed in the first update."""
    cfg = tiny_cfg.replace(weight_decay=0.9)
    losses = [lr_find(cfg.replace(no_wd_bn_bias=flag), steps=2, start_lr=0.5, end_lr=1.0).points[1].loss
              for flag in (False, True)]
    assert abs(losses[0] - losses[1]) > 1e-3, losses
