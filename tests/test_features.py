"""The frozen fast path (core.features) and the evaluation: a frozen backbone's features computed
once per image variant and reused give the same run as recomputing them at every step (the same
flips drawn, the same losses, the same head); the cache is dropped when the backbone unfreezes,
survives a resume, and falls back to recomputing, with a log line, when it would not fit."""
import contextlib
from pathlib import Path

import numpy as np
import pytest

from core import events as ev
from core import features
from core.config import RunConfig
from core.store import read_events
from core.trainer import RunControl, prepare_resume, train
from core.weights import load_checkpoint

TOLERANCE = 1e-6


def cfg_for(runs_dir, **changes):
    """Tiny digits, frozen, flips on, 4 steps per epoch, 3 epochs; an lr at which the head moves."""
    return RunConfig(dataset="digits", pretrained="none", strategy="frozen", image_size=16, batch_size=16,
                     epochs=3, limit_train=64, limit_test=32, device="cpu", hflip=True, vflip=True, lr=0.05,
                     runs_dir=str(runs_dir)).replace(**changes)


@contextlib.contextmanager
def cache_cap(limit):
    """features.CACHE_MAX_BYTES set to `limit` (1 byte: nothing fits, the run recomputes)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(features, "CACHE_MAX_BYTES", limit)
        yield


def run(cfg, cached=True, on_event=None, prepared=None):
    """Train with the feature cache allowed or not; returns (result, run folder)."""
    control, folder = RunControl(), []

    def listener(event):
        if isinstance(event, ev.RunStarted):
            folder.append(Path(event.run_dir))
        if on_event is not None:
            on_event(event, control)

    with cache_cap(features.CACHE_MAX_BYTES if cached else 1):
        result = train(cfg, [listener], control, prepared=prepared)
    return result, folder[0]


def events_of(folder, kind):
    return [e for e in ev.as_one_run(read_events(folder)) if isinstance(e, kind)]


def notes_of(folder):
    return [note for e in read_events(folder) if isinstance(e, ev.RunStarted) for note in e.notes]


def weights(folder):
    state, _, _ = load_checkpoint(folder / "checkpoints" / "last", with_optimizer=False)
    return {k: v.numpy().astype(np.float64) for k, v in state.items()}


def assert_same_run(a, b, names=None):
    """The same weights (all, or those in `names`), step losses and epoch results."""
    wa, wb = weights(a), weights(b)
    for name in names or wa:
        assert np.abs(wa[name] - wb[name]).max() <= TOLERANCE, name
    la, lb = events_of(a, ev.StepEnded), events_of(b, ev.StepEnded)
    assert [s.global_step for s in la] == [s.global_step for s in lb]
    assert max(abs(x.loss - y.loss) for x, y in zip(la, lb)) <= TOLERANCE
    for x, y in zip(events_of(a, ev.EpochEnded), events_of(b, ev.EpochEnded)):
        for name in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert abs(getattr(x, name) - getattr(y, name)) <= TOLERANCE, name


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same run with the cache and recomputing (the cap at 1 byte): hflip and vflip on."""
    root = tmp_path_factory.mktemp("pair")
    cached, uncached = run(cfg_for(root / "cached"))[1], run(cfg_for(root / "uncached"), cached=False)[1]
    return cached, uncached


@pytest.mark.parametrize("flips", [(True, True), (True, False), (False, False)],
                         ids=["hflip+vflip", "hflip", "no-flips"])
def test_the_cached_run_equals_recomputing_the_features(tmp_path, pair, flips):
    if flips == (True, True):
        cached, uncached = pair
    else:
        cfg = cfg_for(tmp_path, hflip=flips[0], vflip=flips[1])
        cached, uncached = run(cfg.replace(runs_dir=str(tmp_path / "c")))[1], run(
            cfg.replace(runs_dir=str(tmp_path / "u")), cached=False)[1]
    assert_same_run(cached, uncached)
    # the head moved (not two untrained heads compared) and the cache served later epochs
    assert not np.allclose(weights(cached)["fc.bias"], 0)
    variants = {(True, True): 4, (True, False): 2, (False, False): 1}[flips]
    assert any(f"(64 train images x {variants} variant(s) + 32 test images) x 512 features x 4 bytes"
               in note and "are cached on cpu" in note for note in notes_of(cached))
    epochs = events_of(cached, ev.EpochEnded)
    assert "0 reused" in epochs[0].note
    if flips == (False, False):  # one variant: every feature known after the first epoch
        assert epochs[0].note.endswith("- complete") and not epochs[1].note and not epochs[2].note
    else:  # variants first drawn in epoch 2 are computed, the others reused
        assert "feature cache" in epochs[1].note and " 0 reused" not in epochs[1].note


def test_a_cache_over_the_cap_falls_back_to_recomputing_with_one_log_line(pair):
    _, uncached = pair
    fallback = [n for n in notes_of(uncached) if "recomputed at every step" in n]
    assert fallback == ["frozen backbone: its features are recomputed at every step: caching them would take "
                        "(64 train images x 4 variant(s) + 32 test images) x 512 features x 4 bytes = 0.6 MB, "
                        "over the cap (0.0 MB)"]
    assert not any(e.note for e in events_of(uncached, ev.EpochEnded))


def test_the_cap_follows_the_free_memory(monkeypatch):
    monkeypatch.setattr(features, "host_memory_free", lambda: 2_000_000_000)
    assert features.cache_cap("cpu") == (500_000_000, "a quarter of the 2.0 GB of memory free")
    monkeypatch.setattr(features, "host_memory_free", lambda: 64 << 30)
    assert features.cache_cap("cpu") == (features.CACHE_MAX_BYTES, "the cap")
    assert features.cache_cap("cuda:0") == (features.GPU_CAP_BYTES, "the cap on a GPU")


@pytest.mark.parametrize("how", ["unfreeze_epoch", "u key"])
def test_unfreezing_drops_the_cache_and_equals_recomputing(tmp_path, how):
    """The backbone trains from epoch 2 (by the setting, or asked for after epoch 1 as the
    dashboard's u does): from then on the features must be computed by the training backbone."""
    cfg = cfg_for(tmp_path, lr_backbone=0.01, **({"unfreeze_epoch": 2} if how == "unfreeze_epoch" else {}))

    def press_u(event, control):
        if how == "u key" and isinstance(event, ev.EpochEnded) and event.epoch == 1:
            control.request_change(unfreeze=True)

    cached = run(cfg.replace(runs_dir=str(tmp_path / "c")), on_event=press_u)[1]
    uncached = run(cfg.replace(runs_dir=str(tmp_path / "u")), cached=False, on_event=press_u)[1]
    assert_same_run(cached, uncached)
    steps = events_of(cached, ev.StepEnded)
    assert sorted(steps[-1].lrs) == ["backbone", "head"]  # the backbone did train
    notes = [e.note for e in events_of(cached, ev.EpochEnded)]
    assert "feature cache" in notes[0] and not any("feature cache" in n for n in notes[1:])


def test_a_cached_run_stopped_mid_epoch_and_resumed_equals_the_run_uninterrupted(tmp_path, pair, monkeypatch):
    from core import trainer

    cached, uncached = pair
    monkeypatch.setattr(trainer, "FLUSH_STEPS", 1)  # each step told at once (cached steps are fast)

    def stop(event, control):
        if isinstance(event, ev.StepEnded) and event.global_step == 6:
            control.request_stop()

    result, folder = run(cfg_for(tmp_path), on_event=stop)
    assert result.status == ev.STOPPED
    prepared = prepare_resume(folder)
    assert (prepared.resume.state["epoch"], prepared.resume.state["step"]) == (2, 2)
    result, same = run(prepared.cfg, prepared=prepared)
    assert same == folder and result.status == ev.COMPLETED
    assert_same_run(folder, cached)
    assert_same_run(folder, uncached)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small"])
def test_the_tail_on_the_features_is_the_model(backbone):
    """What the cache splits off (core.features.tail_name) is the last step of each model's
    forward, and nothing random (dropout) runs before it."""
    from core.backend import flow
    from core.features import feature_size, tail_name, without
    from core.models import build_model, get_submodule
    from core.strategies import is_head
    from oneflow import nn

    model, head = build_model(backbone, 10, "none")
    model.eval()
    tail = tail_name(model, head)
    assert is_head(head, tail)
    assert not [name for name, m in model.named_modules() if isinstance(m, nn.Dropout) and not is_head(name, tail)]
    x = flow.tensor(np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32))
    with flow.no_grad():
        whole = model(x).numpy()
        with without(model, tail):
            feats = model(x)
        assert feats.shape == (2, feature_size(model, tail))
        assert np.abs(get_submodule(model, tail)(feats).numpy() - whole).max() < 1e-5
        assert np.abs(model(x).numpy() - whole).max() == 0  # the tail is back in place


# -- evaluation ------------------------------------------------------------------------------

def reference_eval(folder, cfg):
    """Today's evaluation, written out: batches of the training batch, sums fetched per batch."""
    from core.backend import flow
    from core.data import BatchTransform, batches
    from core.trainer import prepare

    p = prepare(cfg)
    p.model.load_state_dict(load_checkpoint(folder / "checkpoints" / "last", with_optimizer=False)[0])
    p.model.eval()
    t = BatchTransform(flow, "cpu", p.test.images.shape[1:3], cfg.image_size, cfg.normalize, False, False)
    loss = correct = 0.0
    with flow.no_grad():
        for idx in batches(len(p.test), cfg.batch_size, False, None):
            out = p.model(t(p.test.images[idx], False, None))
            y = flow.tensor(p.test.labels[idx])
            loss += float(flow.nn.functional.cross_entropy(out, y, reduction="sum").item())
            correct += float((out.argmax(dim=1) == y).sum().item())
    return loss / len(p.test), correct / len(p.test)


@pytest.mark.parametrize("strategy", ["finetune", "frozen"])
def test_the_evaluation_gives_todays_numbers_with_one_transfer(tmp_path, monkeypatch, strategy):
    """Larger batches (core.trainer.eval_batch_size), the sums kept on the device: the same test
    loss and accuracy as evaluating batch by batch, fetched from the device once."""
    from core.backend import flow
    from core.trainer import Trainer, eval_batch_size

    cfg = cfg_for(tmp_path, strategy=strategy, epochs=1, limit_test=72, batch_size=8, hflip=False, vflip=False)
    assert eval_batch_size(cfg.batch_size) == 32  # 72 test images: 3 batches, the last one partial
    fetched, evaluating = [], []
    for name in ("numpy", "item"):
        real = getattr(flow.Tensor, name)
        monkeypatch.setattr(flow.Tensor, name, lambda self, _real=real, _name=name: (
            fetched.append(_name) if evaluating else None, _real(self))[1])
    real_evaluate = Trainer._evaluate

    def evaluate(self, epoch):
        if self.features is not None:  # the first evaluation computes the test features: not counted
            self.test_features.features(np.arange(len(self.p.test)))
        evaluating.append(True)
        try:
            return real_evaluate(self, epoch)
        finally:
            evaluating.clear()

    monkeypatch.setattr(Trainer, "_evaluate", evaluate)
    result, folder = run(cfg)
    assert result.status == ev.COMPLETED
    assert fetched == ["numpy"]
    epoch = events_of(folder, ev.EpochEnded)[0]
    loss, acc = reference_eval(folder, cfg)
    assert epoch.test_acc == acc
    assert epoch.test_loss == pytest.approx(loss, rel=1e-6)
