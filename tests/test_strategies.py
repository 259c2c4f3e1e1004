import numpy as np
import pytest

from core.backend import flow
from core.models import build_model
from core.strategies import build_param_groups, count_params, is_head, prepare, set_train_mode
from oneflow import nn


def snapshot(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def take_steps(model, groups, strategy, head, steps=2, size=16):
    set_train_mode(model, strategy, head)
    opt = flow.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        x = flow.tensor(rng.normal(size=(8, 3, size, size)).astype(np.float32))
        y = flow.tensor(rng.integers(0, 3, 8))
        loss = nn.CrossEntropyLoss()(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def build(strategy, backbone="resnet18"):
    flow.manual_seed(0)
    model, head = build_model(backbone, 3, "none")
    prepare(model, strategy, head)
    return model, head, build_param_groups(model, strategy, head, lr=1e-3, lr_backbone=1e-4)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_frozen_changes_only_the_head(backbone):
    model, head, groups = build("frozen", backbone)
    assert [g["name"] for g in groups] == ["head"]
    before = snapshot(model)
    take_steps(model, groups, "frozen", head)
    after = snapshot(model)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {f"{head}.weight", f"{head}.bias"}
    # BatchNorm running statistics are part of the state dict: they did not move either
    assert any("running_mean" in k for k in before)
    trainable, total = count_params(model)
    head_module = dict(model.named_modules())[head]
    assert trainable == head_module.weight.numel() + head_module.bias.numel() and total > 10 * trainable


def test_discriminative_has_two_groups_with_their_lrs():
    model, head, groups = build("discriminative")
    assert [(g["name"], g["lr"]) for g in groups] == [("backbone", 1e-4), ("head", 1e-3)]
    assert all(not is_head(n, head) for n, p in model.named_parameters() if any(p is q for q in groups[0]["params"]))
    assert len(groups[1]["params"]) == 2
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = flow.optim.SGD(groups, lr=1e-3, momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-3]


@pytest.mark.parametrize("strategy", ["finetune", "scratch"])
def test_finetune_and_scratch_change_the_backbone(strategy):
    model, head, groups = build(strategy)
    assert [g["name"] for g in groups] == ["all"]
    before = snapshot(model)
    take_steps(model, groups, strategy, head)
    after = snapshot(model)
    assert not np.array_equal(before["conv1.weight"], after["conv1.weight"])
    assert not np.array_equal(before["layer1.0.bn1.running_mean"], after["layer1.0.bn1.running_mean"])
    assert count_params(model)[0] == count_params(model)[1]


def test_param_groups_refuse_an_unfrozen_backbone_for_frozen():
    flow.manual_seed(0)
    model, head = build_model("resnet18", 3, "none")
    with pytest.raises(ValueError, match="freeze the backbone"):
        build_param_groups(model, "frozen", head, 1e-3, 1e-4)


def test_frozen_keeps_backbone_batchnorm_in_eval_mode():
    model, head, _ = build("frozen")
    set_train_mode(model, "frozen", head)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    assert model.training
    set_train_mode(model, "finetune", head)
    assert all(m.training for m in bns)
