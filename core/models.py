"""FlowVision backbones by name, with the classifier head replaced, and their initial weights.

Weight files are read by core.weights (the one place that opens them); this module builds models.
FlowVision 0.2.1's ResNet-18/34/50, MobileNetV2 and MobileNetV3-small use torchvision's state-dict
names, key for key (compared on the full key lists; timm's ResNets use the same names), so
torchvision/timm ResNet and MobileNet weights converted to safetensors load as they are. The one
difference: files saved by older PyTorch versions (e.g. torchvision's resnet18-f37072fd) have no
BatchNorm `num_batches_tracked` counters; the model keeps its own for those.
"""
from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path
from typing import Dict, List, Tuple

from core.backend import flow
from core.weights import WeightsError, load_imagenet, read_state_dict
from oneflow import nn

# backbone name -> FlowVision module holding its constructor and its `model_urls`
BACKBONE_MODULES = {
    "resnet18": "flowvision.models.resnet",
    "resnet34": "flowvision.models.resnet",
    "resnet50": "flowvision.models.resnet",
    "mobilenet_v2": "flowvision.models.mobilenet_v2",
    "mobilenet_v3_small": "flowvision.models.mobilenet_v3",
}

BUILD_LOCK = threading.RLock()
"""Held by every OneFlow model build: two threads building models at once (the form's parameter
counts and a starting run) were seen to deadlock. Re-entrant, so a caller holding it can build."""


def head_name(model: nn.Module) -> str:
    """Dotted name of the classifier head: the model's last Linear layer."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear classifier layer")
    return names[-1]


def set_submodule(model: nn.Module, dotted: str, module: nn.Module) -> None:
    *parents, last = dotted.split(".")
    owner = model
    for part in parents:
        owner = getattr(owner, part)
    if isinstance(owner, nn.Sequential) and last.isdigit():
        owner[int(last)] = module
    else:
        setattr(owner, last, module)


def get_submodule(model: nn.Module, dotted: str) -> nn.Module:
    owner = model
    for part in dotted.split("."):
        owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
    return owner


def imagenet_url(backbone: str) -> str:
    return importlib.import_module(BACKBONE_MODULES[backbone]).model_urls[backbone]


def imagenet_cache_path(backbone: str) -> Path:
    """Where FlowVision keeps (or will keep) the unzipped ImageNet weights of `backbone`."""
    cache = Path(os.path.expanduser(os.getenv("FLOWVISION_CACHE", "~/.oneflow/flowvision_cache")))
    return cache / Path(imagenet_url(backbone)).name.split(".")[0]


def imagenet_cached(backbone: str) -> bool:
    return imagenet_cache_path(backbone).is_dir()


def load_imagenet_state(backbone: str) -> Dict[str, "flow.Tensor"]:
    """The ImageNet state dict from FlowVision's cache, downloading it first when online."""
    return load_imagenet(imagenet_url(backbone), imagenet_cache_path(backbone))


def load_backbone_weights(model: nn.Module, state: Dict[str, "flow.Tensor"], source: str) -> None:
    """Load every weight but the classifier head's; raise WeightsError naming mismatched keys."""
    head = head_name(model) + "."
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    given = {k: v for k, v in state.items() if not k.startswith(head)}
    # Files from older PyTorch versions lack BatchNorm's step counters: keep the model's own.
    missing = sorted(k for k in set(own) - set(given) if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(set(given) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(given) if tuple(own[k].shape) != tuple(given[k].shape))
    # bool or integer values where the model has floats (float16/64 are cast when loaded)
    not_float = sorted(k for k in set(own) & set(given)
                       if own[k].is_floating_point() and not given[k].is_floating_point())
    problems: List[str] = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape),
                        ("not floating point", not_float)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise WeightsError(f"weights from {source} do not match this model's backbone ("
                           + "; ".join(problems) + "); was it saved from another architecture?")
    model.load_state_dict(given, strict=False)


def build_model(backbone: str, num_classes: int, pretrained: str) -> Tuple[nn.Module, str]:
    """The backbone with a fresh `num_classes` head, initialised from `pretrained`
    ("imagenet", "none", or a path). Returns (model, dotted name of the head)."""
    if backbone not in BACKBONE_MODULES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONE_MODULES)}")
    with BUILD_LOCK:
        model = _construct(backbone)
        if pretrained == "imagenet":
            load_backbone_weights(model, load_imagenet_state(backbone), f"ImageNet ({backbone})")
        elif pretrained != "none":
            load_backbone_weights(model, read_state_dict(pretrained), pretrained)
        name = head_name(model)
        old = get_submodule(model, name)
        set_submodule(model, name, nn.Linear(old.in_features, num_classes))
    return model, name


def _construct(backbone: str) -> nn.Module:
    """FlowVision's `backbone` with random weights (its own `pretrained=True` would flow.load)."""
    return getattr(importlib.import_module(BACKBONE_MODULES[backbone]), backbone)(pretrained=False)
