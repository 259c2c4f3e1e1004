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
            assert scaler.step(optimizer, model.parameters())
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
    assert not scaler.step(optimizer, model.parameters())
    np.testing.assert_array_equal(model.weight.numpy(), before)  # the step was skipped
    assert scaler.scale == 2.0 ** 15 and scaler.skipped == 1
    for _ in range(2):
        optimizer.zero_grad()
        scaler.backward(nn.functional.cross_entropy(model(x), y))
        assert scaler.step(optimizer, model.parameters())
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
