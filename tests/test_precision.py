"""Mixed precision (core/precision.py): which precision a run uses, and fp16's loss scaling,
checked on the CPU (the scaler's arithmetic does not depend on the device)."""
import math

import numpy as np
import pytest

from core.precision import LossScaler, PrecisionError, resolve


@pytest.mark.parametrize("asked, device, capability, used", [
    ("auto", "cpu", None, "fp32"),
    ("auto", "cuda", (8, 6), "bf16"),  # Ampere / Ada
    ("auto", "cuda", (7, 5), "fp16"),  # Turing: tensor cores, no bf16
    ("auto", "cuda", (6, 1), "fp32"),  # Pascal
    ("fp32", "cuda", (8, 0), "fp32"),
    ("fp16", "cuda", (6, 1), "fp16"),
    ("bf16", "cuda", (9, 0), "bf16"),
])
def test_the_precision_a_run_uses(asked, device, capability, used):
    assert resolve(asked, device, capability) == used


@pytest.mark.parametrize("asked, device, capability, words", [
    ("fp16", "cpu", None, "precision fp16 needs a CUDA GPU"),
    ("bf16", "cpu", None, "precision bf16 needs a CUDA GPU"),
    ("bf16", "cuda", (7, 0), "compute capability 8.0 or newer"),
])
def test_a_precision_the_device_cannot_use_is_one_line(asked, device, capability, words):
    with pytest.raises(PrecisionError) as info:
        resolve(asked, device, capability)
    assert words in str(info.value) and "\n" not in str(info.value)


def _model_and_optimizer(flow):
    from oneflow import nn

    flow.manual_seed(0)
    model = nn.Linear(4, 3)
    return model, flow.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _batch(flow):
    rng = np.random.default_rng(0)
    return flow.tensor(rng.normal(size=(8, 4)).astype(np.float32)), flow.tensor(rng.integers(0, 3, 8))


def test_a_scaled_step_is_the_plain_step():
    from core.backend import flow
    from oneflow import nn

    results = []
    for enabled in (False, True):
        model, optimizer = _model_and_optimizer(flow)
        scaler = LossScaler(flow, enabled, scale=1024.0)
        x, y = _batch(flow)
        for _ in range(3):
            optimizer.zero_grad()
            scaler.backward(nn.functional.cross_entropy(model(x), y))
            assert scaler.step(optimizer)
        results.append(model.weight.numpy().copy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_an_overflowing_gradient_skips_the_step_and_halves_the_scale_then_it_grows_again():
    from core.backend import flow
    from oneflow import nn

    model, optimizer = _model_and_optimizer(flow)
    scaler = LossScaler(flow, True, scale=2.0 ** 16, growth_interval=2)
    before = model.weight.numpy().copy()
    x, y = _batch(flow)
    optimizer.zero_grad()
    scaler.backward(nn.functional.cross_entropy(model(x), y) * math.inf)  # as an fp16 overflow
    assert not scaler.step(optimizer)
    np.testing.assert_array_equal(model.weight.numpy(), before)  # the step was skipped
    assert scaler.scale == 2.0 ** 15 and scaler.skipped == 1
    for _ in range(2):
        optimizer.zero_grad()
        scaler.backward(nn.functional.cross_entropy(model(x), y))
        assert scaler.step(optimizer)
    assert scaler.scale == 2.0 ** 16 and not np.array_equal(model.weight.numpy(), before)


def test_a_scaler_state_from_a_checkpoint_is_checked():
    from core.backend import flow

    scaler = LossScaler(flow, True)
    scaler.load_state_dict({"scale": 512.0, "good_steps": 3, "skipped": 1})
    assert scaler.state_dict() == {"scale": 512.0, "good_steps": 3, "skipped": 1}
    for bad in ({"scale": "1e9"}, {"scale": math.nan, "good_steps": 0}, {"scale": 2.0, "good_steps": -1},
                {"scale": 1e300, "good_steps": 0}):
        with pytest.raises(ValueError):
            scaler.load_state_dict(bad)


# -- in the trainer -----------------------------------------------------------------------------

def _tiny(tmp_path, **changes):
    from core.config import RunConfig

    return RunConfig(dataset="digits", pretrained="none", image_size=16, batch_size=16, epochs=2, limit_train=64,
                     limit_test=32, device="cpu", lr=0.05, runs_dir=str(tmp_path / "runs")).replace(**changes)


def _train(cfg, stop_at=None, prepared=None):
    from pathlib import Path

    from core import events as ev
    from core.trainer import RunControl, train

    control, folder = RunControl(), []

    def listener(event):
        if isinstance(event, ev.RunStarted):
            folder.append(Path(event.run_dir))
        if isinstance(event, ev.StepEnded) and event.global_step == stop_at:
            control.request_stop()

    return train(cfg, [listener], control, prepared=prepared), folder[0]


def _steps(folder):
    from core import events as ev
    from core.store import read_events

    return [(e.global_step, e.loss) for e in ev.as_one_run(read_events(folder)) if isinstance(e, ev.StepEnded)]


def _weights(folder):
    from core.weights import load_checkpoint

    state, _, _ = load_checkpoint(folder / "checkpoints" / "last", with_optimizer=False)
    return {k: v.numpy() for k, v in state.items()}


def test_the_fp16_path_with_its_loss_scaling_trains_as_fp32_and_resumes_with_its_scale(tmp_path, monkeypatch):
    """On the CPU autocast does nothing, so a run forced to "fp16" runs exactly the loss-scaling
    path in fp32 arithmetic, where scaling by a power of two is exact: the same run as fp32. Its
    checkpoint keeps the scaler's state, and a resume takes it up (same losses as uninterrupted)."""
    import json

    from core import trainer

    plain = _train(_tiny(tmp_path))[1]
    monkeypatch.setattr(trainer, "resolve_precision", lambda asked, device, capability: "fp16")
    scaled_result, scaled = _train(_tiny(tmp_path))
    assert scaled_result.status == "completed"
    assert _steps(scaled) == _steps(plain)
    for name, value in _weights(plain).items():
        np.testing.assert_array_equal(_weights(scaled)[name], value)
    resume = json.loads((scaled / "checkpoints" / "last" / "meta.json").read_text())["resume"]
    assert resume["loss_scaler"] == {"scale": 2.0 ** 16, "good_steps": 8, "skipped": 0}

    stopped = _train(_tiny(tmp_path), stop_at=5)[1]
    result, again = _train(None, prepared=trainer.prepare_resume(stopped))
    assert result.status == "completed" and again == stopped and _steps(again) == _steps(plain)
    assert json.loads((again / "checkpoints" / "last" / "meta.json").read_text())["resume"]["loss_scaler"][
        "good_steps"] == 8  # 4 before the stop + the resumed ones: the scaler's count went on


def test_half_precision_asked_on_the_cpu_is_one_line_before_anything_is_written(tmp_path, capsys):
    from core import cli

    code = cli.main(["train", "--dataset", "digits", "--pretrained", "none", "--device", "cpu", "--precision", "fp16",
                     "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILED and err.count("error:") == 1 and "precision fp16 needs a CUDA GPU" in err
    assert not list((tmp_path / "runs").glob("2*"))


def test_training_images_kept_on_the_device_give_the_same_run(tmp_path, monkeypatch):
    """The uint8 set copied to the device once and indexed there (forced on the CPU here) trains
    exactly as batches copied from the host, and the log says so."""
    from core import events as ev
    from core import trainer
    from core.store import read_events

    from core.backend import flow
    from core.data import BatchTransform

    host_result, host = _train(_tiny(tmp_path))
    monkeypatch.setattr(trainer, "RESIDENT_DEVICES", ("cpu",))
    given, apply = [], BatchTransform.apply
    monkeypatch.setattr(BatchTransform, "apply", lambda self, images, *a: given.append(type(images)) or apply(
        self, images, *a))
    device_result, device = _train(_tiny(tmp_path))
    assert host_result.status == device_result.status == "completed"
    assert len(_steps(device)) == 8 and _steps(device) == _steps(host)
    assert set(given[:4]) == {flow.Tensor}  # the first epoch's 4 training batches were indexed on the device
    notes = [n for e in read_events(device) if isinstance(e, ev.RunStarted) for n in e.notes]
    assert any(n.startswith("training images copied to the cpu once (") for n in notes), notes
