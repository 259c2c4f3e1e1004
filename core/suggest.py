"""What can run here: defaults adapted to this machine, class counts and parameter counts.

The tutorial's defaults (CIFAR-10, ImageNet weights, 224 px on a GPU) cannot serve on an offline
CPU-only machine. `machine_defaults` proposes what can, with a note saying why for each change.
"""
from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path
from typing import Iterable, List, Tuple
from urllib.parse import urlparse

from core.config import RunConfig

CPU_IMAGE_SIZE = 32


def reachable(url: str, timeout: float = 2.0) -> bool:
    """True when a TCP connection to the URL's host can be opened (i.e. we are online)."""
    parts = urlparse(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def machine_defaults(cfg: RunConfig, keep: Iterable[str] = ()) -> Tuple[RunConfig, List[str]]:
    """`cfg` with the settings that cannot serve on this machine replaced, and a note for each.

    Fields named in `keep` (e.g. given on the command line) are never changed.
    """
    from core.backend import gpu_problem
    from core.data import CIFAR10_FOLDER, cifar10_present
    from core.models import imagenet_cache_path, imagenet_cached, imagenet_url

    keep = set(keep)
    notes: List[str] = []
    changes = {}
    if "dataset" not in keep and cfg.dataset == "cifar10" and not cifar10_present(cfg.data_root):
        changes["dataset"] = "digits"
        notes.append(f"CIFAR-10 is not in {Path(cfg.data_root) / CIFAR10_FOLDER}: using the built-in digits "
                     f"data (put cifar-10-python.tar.gz in {cfg.data_root} to use CIFAR-10).")
    if ("pretrained" not in keep and cfg.pretrained == "imagenet" and not imagenet_cached(cfg.backbone)
            and not reachable(imagenet_url(cfg.backbone))):
        changes["pretrained"] = "none"
        notes.append(f"ImageNet weights for {cfg.backbone} are not cached ({imagenet_cache_path(cfg.backbone)}) "
                     f"and cannot be downloaded (offline): starting from random weights.")
    problem = gpu_problem()
    if problem is not None:
        if "image_size" not in keep and cfg.image_size > CPU_IMAGE_SIZE:
            changes["image_size"] = CPU_IMAGE_SIZE
            notes.append(f"No usable GPU ({problem.split('. ')[0]}): a CPU-sized run at {CPU_IMAGE_SIZE} px "
                         f"instead of {cfg.image_size} px (the tutorial's 224 px runs at about 1 image/s here).")
        if "device" not in keep and cfg.device == "auto" and "no CUDA GPU" not in problem:
            changes["device"] = "cpu"
    return cfg.replace(**changes), notes


def class_count(dataset: str, data_root: str, classes: str = "") -> int:
    """How many classes a run on `dataset` (only `classes` of it, when given) has, without loading
    it (0 when unknown)."""
    from core.config import parse_classes

    try:
        picked = len(parse_classes(classes))
    except ValueError:
        picked = 0
    if picked:
        return picked
    if dataset in ("digits", "cifar10"):
        return 10
    if dataset == "synthetic":
        return 4
    if dataset.startswith("imagefolder:"):
        train = Path(dataset[len("imagefolder:"):]).expanduser() / "train"
        return sum(1 for p in train.iterdir() if p.is_dir()) if train.is_dir() else 0
    return 0


@lru_cache(maxsize=64)
def _param_counts(backbone: str, strategy: str, num_classes: int) -> Tuple[int, int]:
    from core.models import build_model
    from core.strategies import count_params, prepare

    model, head = build_model(backbone, max(num_classes, 2), "none")
    prepare(model, strategy, head)
    return count_params(model)


def param_counts(backbone: str, strategy: str, num_classes: int) -> Tuple[int, int]:
    """(trainable, total) parameters of `backbone` with a `num_classes` head under `strategy`.

    Builds the model (random weights) once per combination: call it off the UI thread. It holds
    core.models.BUILD_LOCK, the lock of every model build, while it builds and prepares the model:
    two threads building OneFlow models at once were seen to deadlock.
    """
    from core.models import BUILD_LOCK

    with BUILD_LOCK:
        return _param_counts(backbone, strategy, num_classes)
