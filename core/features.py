"""The frozen fast path: a frozen backbone's features, computed once per image variant and reused.

With the frozen strategy nothing before the classifier changes: the backbone's parameters do not
train and its BatchNorm layers stay in eval mode (core.strategies), and no backbone here has
dropout before its classifier. Its output for an image then depends on the image and its flips
only: at most four variants (none, horizontal, vertical, both). A `FeatureCache` keeps those
outputs on the training device and computes each the first time a step draws it; a step then
runs only the classifier ("the tail") on them. The flips are drawn exactly as without the cache
(BatchTransform.flips), so the random stream, and with it a resume, stays the same.

The cache stops before the tail: the head itself (ResNets), or the Sequential classifier that
holds it (MobileNets, whose dropout sits in front of the head: it keeps drawing its masks at
every step, as without the cache). It holds (train images x variants + test images) x feature
size x 4 bytes at most, allocated when it is made; above `cache_cap` the run recomputes the
features at every step, as before, and says so.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np

from core.backend import flow
from core.models import get_submodule, set_submodule
from oneflow import nn

CACHE_MAX_BYTES = 4 << 30
"""The cache never takes more than this (4 GiB: CIFAR-10's 50,000 images x 4 variants with
ResNet-50's 2,048 features need 1.6 GB, with ResNet-18's 512 features 410 MB)."""
HOST_SHARE = 0.25
"""On the CPU, the cache takes at most this share of the memory free when the run starts."""
GPU_CAP_BYTES = 1 << 30
"""On a GPU, where OneFlow 0.9 does not say how much memory is free, the cache takes at most this."""


def tail_name(model: nn.Module, head: str) -> str:
    """Dotted name of the part that runs on the cached features: the Sequential classifier that
    holds the head when the head is in one (MobileNets: dropout and, for V3, a frozen Linear
    before it), else the head (ResNets' fc). It is the last module of each model's forward."""
    parent = head.rpartition(".")[0]
    return parent if parent and isinstance(get_submodule(model, parent), nn.Sequential) else head


def feature_size(model: nn.Module, tail: str) -> int:
    """Numbers per image that enter the tail (the in_features of its first Linear)."""
    module = get_submodule(model, tail)
    first = module if isinstance(module, nn.Linear) else next(m for m in module.modules() if isinstance(m, nn.Linear))
    return int(first.in_features)


def variant_count(hflip: bool, vflip: bool) -> int:
    """How many versions of an image the training flips can make (1, 2 or 4)."""
    return (2 if hflip else 1) * (2 if vflip else 1)


def cache_cap(device: str) -> Tuple[int, str]:
    """The most bytes the cache may take on `device`, and how that limit was set (for the log)."""
    if str(device).startswith("cuda"):
        return GPU_CAP_BYTES, "the cap on a GPU"
    free = host_memory_free()
    if free is None or free * HOST_SHARE >= CACHE_MAX_BYTES:
        return CACHE_MAX_BYTES, "the cap"
    return int(free * HOST_SHARE), f"a quarter of the {megabytes(free)} of memory free"


def host_memory_free() -> Optional[int]:
    """Bytes of memory available to new allocations (Linux's MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def megabytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


@dataclass(frozen=True)
class CachePlan:
    """What the cache would hold, and whether it may."""

    train_images: int
    variants: int
    test_images: int
    floats: int
    """Feature size: numbers per image variant."""
    cap: int
    cap_reason: str

    @property
    def bytes(self) -> int:
        return (self.train_images * self.variants + self.test_images) * self.floats * 4

    @property
    def fits(self) -> bool:
        return self.bytes <= self.cap

    def note(self, device: str) -> str:
        """The log line that says what the run does with its features, and the estimate."""
        estimate = (f"({self.train_images} train images x {self.variants} variant(s) + {self.test_images} test "
                    f"images) x {self.floats} features x 4 bytes = {megabytes(self.bytes)}")
        if self.fits:
            return (f"frozen backbone: its features are cached on {device} as each image variant is first "
                    f"drawn, the head trains on them: {estimate} at most")
        return (f"frozen backbone: its features are recomputed at every step: caching them would take {estimate}, "
                f"over {self.cap_reason} ({megabytes(self.cap)})")


class FeatureCache:
    """The features (the tail's input) of `images` under each flip variant, on `device`.

    `features(idx, hflip, vflip)` returns those of a batch, computing the ones not seen yet in
    one forward pass of the model without its tail. The model must be in the mode it trains
    (or evaluates) in: the features are computed as the uncached step would compute them."""

    def __init__(self, model: nn.Module, tail: str, transform, images: np.ndarray, variants: int,
                 floats: int, device: str):
        self.model, self.tail, self.transform, self.images = model, tail, transform, images
        self.tail_module = get_submodule(model, tail)
        self.device, self.n = device, len(images)
        self.store = flow.zeros(variants * self.n, floats, dtype=flow.float32, device=device)
        self.have = np.zeros(variants * self.n, dtype=bool)
        self.computed, self.reused, self.seconds = 0, 0, 0.0
        """Counts since the last `take_counts` (and the seconds spent computing)."""

    @property
    def bytes(self) -> int:
        return int(self.store.nelement()) * 4

    @property
    def complete(self) -> bool:
        return bool(self.have.all())

    def features(self, idx: np.ndarray, hflip: Optional[np.ndarray] = None, vflip: Optional[np.ndarray] = None):
        slot = idx.astype(np.int64)  # variant v of image i: row v * n + i
        if hflip is not None:
            slot = slot + self.n * hflip
        if vflip is not None:
            slot = slot + self.n * (2 if hflip is not None else 1) * vflip
        new = ~self.have[slot]
        if new.any():
            start = time.perf_counter()
            pick = lambda mask: None if mask is None else mask[new]  # noqa: E731
            x = self.transform.apply(self.images[idx[new]], pick(hflip), pick(vflip))
            with flow.no_grad(), without(self.model, self.tail):
                computed = self.model(x)
            self.store[flow.tensor(slot[new], device=self.device)] = computed
            computed[:1, :1].numpy()  # wait for it: the seconds are the real cost, not the queueing
            self.seconds += time.perf_counter() - start
            self.have[slot[new]] = True
        self.computed += int(new.sum())
        self.reused += int(len(slot) - new.sum())
        return flow.index_select(self.store, 0, flow.tensor(slot, device=self.device))

    def outputs(self, idx: np.ndarray, hflip: Optional[np.ndarray] = None, vflip: Optional[np.ndarray] = None):
        """The model's outputs for the batch (its tail on the cached features): what
        model(transform.apply(images[idx], hflip, vflip)) computes."""
        return self.tail_module(self.features(idx, hflip, vflip))

    def take_counts(self) -> Tuple[int, int, float]:
        """(computed, reused, seconds computing) since the last call."""
        counts = self.computed, self.reused, self.seconds
        self.computed, self.reused, self.seconds = 0, 0, 0.0
        return counts


@contextlib.contextmanager
def without(model: nn.Module, name: str) -> Iterator[None]:
    """The model with its submodule `name` replaced by an identity: its forward then returns
    what enters that submodule (the tail is the last step of each model's forward)."""
    kept = get_submodule(model, name)
    set_submodule(model, name, nn.Identity())
    try:
        yield
    finally:
        set_submodule(model, name, kept)
