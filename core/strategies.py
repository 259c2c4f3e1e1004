"""The four transfer strategies: which parameters train, at which learning rate, and freezing."""
from __future__ import annotations

from typing import Dict, List, Tuple

from oneflow import nn

from core.config import STRATEGIES


def is_head(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".")


def freeze_backbone(model: nn.Module, head: str) -> None:
    """requires_grad=False on every backbone parameter (the head keeps training)."""
    for name, param in model.named_parameters():
        if not is_head(name, head):
            param.requires_grad = False


def set_train_mode(model: nn.Module, strategy: str, head: str) -> None:
    """model.train(), except that a frozen backbone keeps its BatchNorm layers in eval mode, so
    their running statistics do not move either."""
    model.train()
    if strategy == "frozen":
        for name, module in model.named_modules():
            if name and not is_head(name, head) and isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def prepare(model: nn.Module, strategy: str, head: str) -> None:
    """Apply what the strategy needs to the model before training (freezing, for frozen)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    if strategy == "frozen":
        freeze_backbone(model, head)


def unfreeze_backbone(model: nn.Module, head: str) -> List[Tuple[str, nn.Parameter]]:
    """Progressive unfreezing: requires_grad=True on every backbone parameter that had it off;
    returns them, named (set_train_mode with a strategy other than frozen then lets its BatchNorm
    statistics move again)."""
    thawed = [(name, p) for name, p in model.named_parameters() if not is_head(name, head) and not p.requires_grad]
    for _, param in thawed:
        param.requires_grad = True
    return thawed


def split_no_decay(groups: List[Dict], named: Dict[int, str]) -> List[Dict]:
    """Each group, then (when it has any) its twin of the same name with weight_decay 0 holding its
    one-dimensional parameters: BatchNorm weights and biases, and every bias (`named`: id -> name).
    The twin keeps the group's name, so the lrs reported per name stay one per group."""
    out = []
    for group in groups:
        flat = [p for p in group["params"] if p.ndim <= 1 or named[id(p)].endswith(".bias")]
        keep = {id(p) for p in flat}
        out.append({**group, "params": [p for p in group["params"] if id(p) not in keep]})
        if flat:
            out.append({**group, "params": flat, "weight_decay": 0.0})
    return [g for g in out if g["params"]]


def build_param_groups(model: nn.Module, strategy: str, head: str, lr: float,
                       lr_backbone: float, no_wd_bn_bias: bool = False) -> List[Dict]:
    """Named SGD param groups for `strategy`; frozen parameters are left out.

    finetune / scratch: one group "all" at lr. discriminative: "backbone" at lr_backbone and
    "head" at lr. frozen: "head" at lr. With `no_wd_bn_bias`, each is split (split_no_decay).
    Asserts every trainable parameter is in exactly one group.
    """
    backbone_params, head_params, named = [], [], {}
    for name, param in model.named_parameters():
        named[id(param)] = name
        if param.requires_grad:
            (head_params if is_head(name, head) else backbone_params).append(param)
    if strategy in ("finetune", "scratch"):
        groups = [{"name": "all", "params": backbone_params + head_params, "lr": lr}]
    elif strategy == "discriminative":
        groups = [{"name": "backbone", "params": backbone_params, "lr": lr_backbone},
                  {"name": "head", "params": head_params, "lr": lr}]
    elif strategy == "frozen":
        if backbone_params:
            raise ValueError("frozen strategy: freeze the backbone before building param groups")
        groups = [{"name": "head", "params": head_params, "lr": lr}]
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    if no_wd_bn_bias:
        groups = split_no_decay(groups, named)
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(seen) == len(set(seen)) and set(seen) == trainable, "param groups must cover each trainable parameter once"
    return groups


def count_params(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = trainable = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total
