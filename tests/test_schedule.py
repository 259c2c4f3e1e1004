"""Schedules and regularisation: the learning rate per step against its formula (core.schedule)
and as the trainer applies it, label smoothing, early stopping, progressive unfreezing, no weight
decay on BatchNorm and biases, and their validation."""
import math
from pathlib import Path

import numpy as np
import pytest

from core import config as C
from core import events as ev
from core.schedule import curve, lr_factor
from core.store import read_run
from core.trainer import NothingToResume, plan_resume, prepare, train, training_loss

SPE = 10  # steps per epoch of the formula tests: 4 epochs, 40 steps


def factor(step, **changes):
    return lr_factor(C.RunConfig(epochs=4).replace(**changes), step, SPE)


def test_constant_with_and_without_warmup():
    assert [factor(t) for t in (0, 17, 39)] == [1.0, 1.0, 1.0]
    # warmup over half an epoch = 5 steps: (t + 1) / 6, then 1
    assert [factor(t, warmup_epochs=0.5) for t in (0, 2, 4, 5, 39)] == pytest.approx([1 / 6, 3 / 6, 5 / 6, 1, 1])


def test_step_decays_every_step_every_epochs():
    got = [factor(t, schedule="step", step_every=2, step_gamma=0.1) for t in (0, 19, 20, 39)]
    assert got == pytest.approx([1, 1, 0.1, 0.1])
    got = [factor(t, schedule="step", step_every=1, step_gamma=0.5, warmup_epochs=1) for t in (0, 9, 10, 20, 39)]
    assert got == pytest.approx([1 / 11, 10 / 11, 0.5, 0.25, 0.125])


def test_cosine_after_warmup():
    cos = dict(schedule="cosine", warmup_epochs=1)  # W = 10, then 30 steps of cosine
    assert factor(0, **cos) == pytest.approx(1 / 11)
    assert factor(10, **cos) == pytest.approx(1.0)
    assert factor(25, **cos) == pytest.approx(0.5)
    assert factor(39, **cos) == pytest.approx(0.5 * (1 + math.cos(math.pi * 29 / 30)))
    assert factor(20, schedule="cosine") == pytest.approx(0.5)  # no warmup: half-way is half


def test_onecycle_rises_from_lr_over_25_and_ends_at_lr_over_1e4():
    # warmup 0: the rising phase is 30% of the 40 steps = 12, then 27 steps down to the last
    assert factor(0, schedule="onecycle") == pytest.approx(1 / 25)
    assert factor(6, schedule="onecycle") == pytest.approx((1 / 25 + 1) / 2)
    assert factor(12, schedule="onecycle") == pytest.approx(1.0)
    assert factor(39, schedule="onecycle") == pytest.approx(1e-4)
    mid = 12 + 27 / 3
    assert factor(21, schedule="onecycle") == pytest.approx(1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * (mid - 12) / 27)) / 2)
    # warmup_epochs sets the rising phase: 20 steps
    assert factor(10, schedule="onecycle", warmup_epochs=2) == pytest.approx((1 / 25 + 1) / 2)
    assert factor(20, schedule="onecycle", warmup_epochs=2) == pytest.approx(1.0)


def test_the_preview_curve_is_the_same_function():
    cfg = C.RunConfig(epochs=4, schedule="cosine", warmup_epochs=1)
    xs, ys = curve(cfg, SPE, points=40)
    assert xs[0] == 0 and xs[-1] == pytest.approx(3.9) and len(xs) == 40
    assert ys == [lr_factor(cfg, round(x * SPE), SPE) for x in xs]


def test_the_trainer_sets_every_groups_lr_per_step(tiny_cfg):
    """Discriminative: backbone and head scaled by the same factor at every step, and the
    StepEnded events say so (4 steps per epoch, 2 epochs, warmup of half an epoch)."""
    cfg = tiny_cfg.replace(strategy="discriminative", epochs=2, schedule="cosine", warmup_epochs=0.5,
                           lr=0.01, lr_backbone=0.002)
    steps = []
    result = train(cfg, [lambda e: steps.append(e) if isinstance(e, ev.StepEnded) else None])
    assert result.status == ev.COMPLETED and len(steps) == 8
    for s in steps:
        f = lr_factor(cfg, s.global_step - 1, 4)
        assert s.lrs == pytest.approx({"backbone": 0.002 * f, "head": 0.01 * f}, rel=1e-12)
    assert steps[0].lrs["head"] == pytest.approx(0.01 / 3)  # the first warmup step


def test_label_smoothing_loss_against_a_hand_computation():
    from core.backend import flow

    logits = np.array([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]])
    labels = np.array([1, 0])
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    eps = 0.2
    # target: 1 - eps on the true class, eps / C spread over all C classes
    target = np.full((2, 3), eps / 3)
    target[np.arange(2), labels] += 1 - eps
    hand = -(target * logp).sum(axis=1)
    cfg = C.RunConfig(label_smoothing=eps)
    x, y = flow.tensor(logits, dtype=flow.float32), flow.tensor(labels)
    assert training_loss(cfg)(x, y).item() == pytest.approx(hand.mean(), rel=1e-6)
    assert training_loss(cfg, "sum")(x, y).item() == pytest.approx(hand.sum(), rel=1e-6)
    plain = -logp[np.arange(2), labels]
    assert training_loss(C.RunConfig())(x, y).item() == pytest.approx(plain.mean(), rel=1e-6)


def test_early_stopping_ends_the_run_completed_at_the_epoch_without_progress(tiny_cfg):
    """A frozen backbone (BatchNorm statistics fixed) and a head lr of 1e-12: the model does not
    change, so the test accuracy of epoch 2 equals epoch 1's, never better: patience 1 stops there."""
    cfg = tiny_cfg.replace(strategy="frozen", lr=1e-12, epochs=4, early_stopping=1)
    events = []
    result = train(cfg, [events.append])
    epochs = [e for e in events if isinstance(e, ev.EpochEnded)]
    assert [e.epoch for e in epochs] == [1, 2] and epochs[0].test_acc == epochs[1].test_acc
    assert result.status == ev.COMPLETED and result.epochs_done == 2
    assert result.message.startswith("stopped early at epoch 2: no better test accuracy for 1 epoch(s)")
    assert "at epoch 1, kept in checkpoints/best" in result.message
    assert epochs[1].note.startswith(result.message)  # (then what the feature cache cost)
    run = read_run(events[0].run_dir)
    assert run.summary["status"] == "completed" and "stopped early at epoch 2" in run.summary["message"]
    best = [e for e in events if isinstance(e, ev.CheckpointSaved) and e.kind == "best"]
    assert [b.epoch for b in best] == [1]
    with pytest.raises(NothingToResume, match="stopped early after 2 epochs"):
        plan_resume(run.path)


def backbone_state(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items() if not k.startswith("fc.")}


def test_progressive_unfreezing_trains_the_backbone_from_its_epoch(tiny_cfg):
    cfg = tiny_cfg.replace(strategy="frozen", epochs=2, unfreeze_epoch=2, lr=0.01, lr_backbone=0.005)
    prepared = prepare(cfg)
    states, events = {}, []

    def listener(event):
        events.append(event)
        if isinstance(event, ev.RunStarted):
            states[0] = backbone_state(prepared.model)
        if isinstance(event, ev.EpochEnded):
            states[event.epoch] = backbone_state(prepared.model)

    result = train(cfg, [listener], prepared=prepared)
    assert result.status == ev.COMPLETED
    for key, value in states[0].items():  # epoch 1: weights and BatchNorm statistics as they were
        assert np.array_equal(value, states[1][key]), key
    changed = [k for k in states[0] if not np.array_equal(states[0][k], states[2][k])]
    assert "conv1.weight" in changed and "bn1.running_mean" in changed and "layer4.1.bn2.weight" in changed
    lrs = [(e.epoch, e.lrs) for e in events if isinstance(e, ev.StepEnded)]
    assert {str(l) for ep, l in lrs if ep == 1} == {str({"head": 0.01})}
    assert {str(l) for ep, l in lrs if ep == 2} == {str({"head": 0.01, "backbone": 0.005})}
    first = [e for e in events if isinstance(e, ev.EpochEnded)][0]
    assert first.note.startswith("the backbone trains from epoch 2 at lr 0.005")  # (then the feature cache)
    assert "; the backbone trains from epoch 2" in ev.epoch_summary(first, 2)


def test_unfreeze_epoch_is_ignored_with_a_note_by_other_strategies(tiny_cfg):
    p = prepare(tiny_cfg.replace(strategy="finetune", unfreeze_epoch=2, epochs=2))
    assert any("applies to the frozen strategy only" in n for n in p.notes)


@pytest.mark.parametrize("strategy,names", [("finetune", ["all", "all"]),
                                            ("discriminative", ["backbone", "backbone", "head", "head"])])
def test_no_weight_decay_on_batchnorm_and_biases(strategy, names):
    from core.models import build_model
    from core.strategies import build_param_groups, prepare as prepare_strategy

    model, head = build_model("resnet18", 3, "none")
    prepare_strategy(model, strategy, head)
    groups = build_param_groups(model, strategy, head, 1e-3, 1e-4, no_wd_bn_bias=True)
    assert [g["name"] for g in groups] == names
    name_of = {id(p): n for n, p in model.named_parameters()}
    no_wd = {name_of[id(p)] for g in groups if g.get("weight_decay") == 0.0 for p in g["params"]}
    with_wd = {name_of[id(p)] for g in groups if "weight_decay" not in g for p in g["params"]}
    assert {"bn1.weight", "bn1.bias", "layer1.0.bn2.weight", "fc.bias"} <= no_wd
    assert {"conv1.weight", "layer1.0.conv2.weight", "fc.weight"} <= with_wd
    assert all(n.endswith(".bias") or ".bn" in n or n.startswith("bn") or "downsample.1" in n for n in no_wd)
    assert all(n.endswith(".weight") and "bn" not in n and "downsample.1" not in n for n in with_wd)
    assert len(no_wd) + len(with_wd) == len(name_of)
    plain = build_param_groups(model, strategy, head, 1e-3, 1e-4)
    assert all("weight_decay" not in g for g in plain) and len(plain) == len(names) // 2


def test_the_trainers_optimizer_has_no_decay_groups(tiny_cfg):
    prepared = prepare(tiny_cfg.replace(no_wd_bn_bias=True, weight_decay=0.01))
    events = []
    train(prepared.cfg, [events.append], prepared=prepared)
    from core.weights import load_checkpoint

    _, optimizer, _ = load_checkpoint(read_run(events[0].run_dir).path / "checkpoints" / "last")
    decays = [g["_options"]["weight_decay"] for g in optimizer["param_groups"]]
    assert decays == [0.01, 0.0]


@pytest.mark.parametrize("changes,message", [
    (dict(schedule="linear"), "schedule must be one of constant, step, cosine, onecycle, got 'linear'"),
    (dict(warmup_epochs=-1.0), "warmup_epochs must be between 0 and epochs (3), got -1.0"),
    (dict(warmup_epochs=4.0), "warmup_epochs must be between 0 and epochs (3), got 4.0"),
    (dict(warmup_epochs=math.nan), "warmup_epochs must be between 0 and epochs (3), got nan"),
    (dict(step_every=0), "step_every must be a whole number of epochs between 1 and 10000, got 0"),
    (dict(step_gamma=0.0), "step_gamma must be above 0 and at most 1, got 0.0"),
    (dict(step_gamma=2.0), "step_gamma must be above 0 and at most 1, got 2.0"),
    (dict(label_smoothing=1.0), "label_smoothing must be at least 0 and below 1, got 1.0"),
    (dict(label_smoothing=-0.1), "label_smoothing must be at least 0 and below 1, got -0.1"),
    (dict(early_stopping=-1), "early_stopping must be 0 (off) or a number of epochs, got -1"),
    (dict(unfreeze_epoch=4), "unfreeze_epoch must be 0 (never) or an epoch from 1 to epochs (3), got 4"),
    (dict(unfreeze_epoch=-1), "unfreeze_epoch must be 0 (never) or an epoch from 1 to epochs (3), got -1"),
])
def test_validation_says_what_is_wrong_in_one_line(changes, message):
    assert C.validate(C.RunConfig().replace(**changes)) == [message]


def test_the_settings_have_flags_and_round_trip_through_presets(tmp_path):
    from core.cli import build_parser, command_line, config_from_args

    cfg = C.RunConfig(schedule="onecycle", warmup_epochs=0.5, step_every=2, step_gamma=0.5, label_smoothing=0.1,
                      no_wd_bn_bias=True, early_stopping=3, unfreeze_epoch=2, strategy="frozen")
    for suffix in (".toml", ".json"):
        assert C.load(C.save(cfg, tmp_path / f"p{suffix}")) == cfg
    args = build_parser().parse_args(command_line(cfg).split()[1:])
    assert config_from_args(args) == cfg
    assert C.from_mapping({k: v for k, v in C.RunConfig().to_dict().items() if k not in
                           ("schedule", "warmup_epochs", "label_smoothing")}) == C.RunConfig()  # older files


# -- the form and the dashboard -------------------------------------------------------------------

async def test_every_setting_has_its_widget_and_fits_80x24_by_scrolling(tmp_path):
    """Generic over the fields: a Select for choices and yes/no, an Input otherwise; each row
    (the new ones at the bottom of the list included) can be scrolled into view at 80x24."""
    from textual.widgets import Input, Select

    from test_tui import tiny
    from tui.app import TransferLabApp

    app = TransferLabApp(tiny(tmp_path))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        form = app.screen
        fields = form.query_one("#fields")
        for name, f in C.FIELDS.items():
            widget = form.query_one(f"#f-{name}")
            chosen = f.metadata.get("choices") or C.field_type(name) is bool
            assert isinstance(widget, Select if chosen else Input), name
            fields.scroll_to_widget(widget, animate=False)
            await pilot.pause()
            assert fields.region.contains_region(widget.region), name


async def test_the_form_previews_the_schedule_and_enables_what_applies(tmp_path):
    from textual.widgets import Input, Select

    from test_tui import tiny
    from tui.app import TransferLabApp
    from tui.form import lr_curves
    from tui.plots import LrPlot

    app = TransferLabApp(tiny(tmp_path, epochs=4, limit_train=64, batch_size=16))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        form = app.screen
        plot = form.query_one(LrPlot)
        assert set(plot.series["lr"].ys) == {1e-3}  # constant
        assert form.query_one("#f-step_every").disabled and form.query_one("#f-step_gamma").disabled
        form.query_one("#f-schedule", Select).value = "step"
        form.query_one("#f-step_gamma", Input).value = "0.5"
        await pilot.pause()
        assert not form.query_one("#f-step_every").disabled
        # 4 steps per epoch (64 images, batch 16): the lr of the trainer at each step
        assert plot.series["lr"].xs == [s / 4 for s in range(16)]
        assert plot.series["lr"].ys == [1e-3 * lr_factor(form.cfg, s, 4) for s in range(16)]
        assert plot.series["lr"].ys[-1] == pytest.approx(1e-3 * 0.5 ** 3)
        assert form.query_one("#f-lr_backbone").disabled
        form.query_one("#f-strategy", Select).value = "frozen"
        form.query_one("#f-unfreeze_epoch", Input).value = "3"
        await pilot.pause()
        assert not form.query_one("#f-lr_backbone").disabled
        assert plot.series["backbone"].xs[0] == 2.0 and "--unfreeze-epoch 3" in str(form.query_one("#command").render())
        assert lr_curves(form.cfg)["backbone"][1][0] == pytest.approx(1e-4 * 0.5 ** 2)
        form.query_one("#f-warmup_epochs", Input).value = "9"
        await pilot.pause()
        assert "warmup_epochs must be between 0 and epochs (4), got 9.0" in str(form.query_one("#problems").render())


async def test_the_dashboard_plots_the_learning_rate_on_l(tmp_path):
    from test_tui import start_run, tiny
    from tui.app import TransferLabApp
    from tui.plots import LossPlot, LrPlot

    cfg = tiny(tmp_path, strategy="discriminative", schedule="cosine", warmup_epochs=0.5, epochs=2)
    app = TransferLabApp(cfg)
    async with app.run_test(size=(80, 24)) as pilot:
        await start_run(pilot, lambda: app.live is not None and app.live.status == ev.COMPLETED)
        await pilot.pause(0.3)
        dash = app.screen
        loss, lr = dash.query_one(LossPlot), dash.query_one(LrPlot)
        assert loss.display and not lr.display
        assert sorted(lr.series) == ["backbone", "head"] and lr.series["head"].xs == [1, 2, 3, 4, 5, 6]
        assert lr.series["head"].ys == pytest.approx([1e-3 * lr_factor(cfg, s, 3) for s in range(6)])
        await pilot.press("l")
        await pilot.pause(0.3)
        assert lr.display and not loss.display and lr.region.width > 30
        assert "learning rate per step" in lr.render().plain
        await pilot.press("l")
        assert loss.display and not lr.display


def test_unfreezing_is_refused_with_several_processes(tiny_cfg):
    """DDP reduces the gradients of the parameters that trained when it wrapped the model: a
    backbone unfrozen later would train apart on each process. One line, before any folder."""
    from core.distributed import DistributedError

    with pytest.raises(DistributedError, match="unfreeze_epoch does not work with several processes"):
        train(tiny_cfg.replace(strategy="frozen", unfreeze_epoch=1), dist=object())
    runs = Path(tiny_cfg.runs_dir)
    assert not runs.exists() or not list(runs.iterdir())
