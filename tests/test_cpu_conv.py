"""core.cpu_conv: small convolutions as one matrix multiply on the CPU give OneFlow's numbers, and
the trainer and the LR finder use them only while they train."""
import numpy as np
import pytest

from core import events as ev
from core import cpu_conv
from core.backend import flow
from core.cpu_conv import BatchedSmallConv2d, batched_small_convs
from oneflow import nn

# (in, out, kernel, stride, padding, dilation, bias, input size): outputs of 1x1 to 2x2 positions
LAYERS = [
    (512, 64, 3, 1, 1, 1, False, 1),  # ResNet's 3x3 on a 1x1 map: only the centre tap sees the image
    (32, 48, 3, 2, 1, 1, False, 2),   # strided, 2x2 -> 1x1
    (16, 24, 3, 1, 1, 1, True, 2),    # with a bias
    (32, 16, 1, 2, 0, 1, False, 4),   # ResNet's 1x1 downsample, 4x4 -> 2x2
    (8, 12, (1, 3), 1, (0, 1), 1, True, 2),  # not square
    (8, 8, 3, 1, 2, 2, False, 2),     # dilated
    (3, 16, 7, 2, 3, 1, False, 4),    # a stem on a tiny image
]


def pair(cin, cout, k, stride, padding, dilation, bias):
    flow.manual_seed(0)
    plain = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
    batched = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
    batched.load_state_dict(plain.state_dict())
    batched.__class__ = BatchedSmallConv2d
    return plain, batched


@pytest.mark.parametrize("layer", LAYERS, ids=[f"{l[0]}-{l[1]}-k{l[2]}-s{l[3]}-h{l[7]}" for l in LAYERS])
def test_a_small_convolution_as_one_product_gives_oneflows_output_and_gradients(layer, monkeypatch):
    *shape, size = layer
    plain, batched = pair(*shape)
    x = np.random.default_rng(1).standard_normal((5, shape[0], size, size)).astype(np.float32)
    outs, grads = [], []
    called = []
    real = flow.matmul
    monkeypatch.setattr(cpu_conv.flow, "matmul", lambda *a, **k: called.append(1) or real(*a, **k))
    for conv in (plain, batched):
        xt = flow.tensor(x, requires_grad=True)
        out = conv(xt)
        (out * out).sum().backward()
        outs.append(out.numpy())
        grads.append([xt.grad.numpy(), conv.weight.grad.numpy()]
                     + ([conv.bias.grad.numpy()] if conv.bias is not None else []))
    assert called, "the batched layer did not multiply the batch as one matrix"
    assert outs[1].shape == outs[0].shape
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(grads[1], grads[0]):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("why, conv, size", [
    ("more positions than MAX_POSITIONS", nn.Conv2d(4, 4, 3, padding=1), 3),
    ("grouped (depthwise)", nn.Conv2d(4, 4, 3, padding=1, groups=4), 1),
])
def test_other_layers_keep_oneflows_kernel(why, conv, size, monkeypatch):
    conv.__class__ = BatchedSmallConv2d
    monkeypatch.setattr(cpu_conv.flow, "matmul", lambda *a, **k: pytest.fail(f"{why}: multiplied as one matrix"))
    assert tuple(conv(flow.randn(2, 4, size, size)).shape) == (2, 4, size, size)


def convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_the_layers_are_swapped_within_the_block_and_restored_even_on_an_error():
    from flowvision.models import resnet18

    model = resnet18(num_classes=3)
    keys = list(model.state_dict())
    with batched_small_convs(model, "cuda:0"):
        assert all(type(c) is nn.Conv2d for c in convs(model)), "changed on a GPU"
    with pytest.raises(RuntimeError):
        with batched_small_convs(model, "cpu") as count:
            assert count == len(convs(model)) == 20
            assert all(type(c) is BatchedSmallConv2d for c in convs(model))
            assert list(model.state_dict()) == keys
            raise RuntimeError("a failing step")
    assert all(type(c) is nn.Conv2d for c in convs(model))


def test_a_cpu_run_trains_with_the_batched_layers_and_gives_the_same_weights(tiny_cfg, monkeypatch):
    """The trainer runs its steps with the layers batched (ResNet-18 at 16 px: stages 2-4 have 1 to
    4 positions), hands back a model of plain nn.Conv2d, and trains it as OneFlow's kernel does."""
    from dataclasses import replace

    from core import trainer

    seen = []

    def listener(event):
        if isinstance(event, ev.StepEnded):
            seen.append({type(c).__name__ for c in convs(prepared.model)})

    cfg = replace(tiny_cfg, limit_train=32, batch_size=16)
    prepared = trainer.prepare(cfg)
    finished = trainer.train(cfg, [listener], prepared=prepared)
    assert finished.status == ev.COMPLETED, finished.message
    assert seen and all(kinds == {"BatchedSmallConv2d"} for kinds in seen)
    assert all(type(c) is nn.Conv2d for c in convs(prepared.model))
    batched = {k: v.numpy() for k, v in prepared.model.state_dict().items()}

    monkeypatch.setattr(cpu_conv, "MAX_POSITIONS", 0)  # every layer on OneFlow's kernel
    reference = trainer.prepare(cfg)
    assert trainer.train(cfg, [], prepared=reference).status == ev.COMPLETED
    for key, value in reference.model.state_dict().items():
        np.testing.assert_allclose(batched[key], value.numpy(), rtol=1e-4, atol=1e-5, err_msg=key)


def test_the_lr_finder_sweeps_with_the_batched_layers(tiny_cfg, monkeypatch):
    from core import lrfind

    calls = []
    real = BatchedSmallConv2d.forward
    monkeypatch.setattr(BatchedSmallConv2d, "forward", lambda self, x: calls.append(1) or real(self, x))
    result = lrfind.lr_find(tiny_cfg, steps=2)
    assert len(result.points) == 2 and calls
