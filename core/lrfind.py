"""The learning-rate finder: an exponential learning-rate sweep on a copy of the model.

The sweep trains a model built from the run's settings (the same data, strategy, BatchTransform,
training loss (label smoothing) and SGD with the config's momentum and weight decay, BatchNorm and
biases without it under no_wd_bn_bias) for at most `steps` batches, one batch per
learning rate, the rate growing by the same factor every step from `start_lr` to `end_lr`
(Leslie Smith's "LR range test", as fastai's lr_find runs it). It is bounded by the data as well:
at most one pass over the training set, so every loss is measured on a batch the model has not
trained on yet (a repeated batch would show memorisation, not the learning rate). The loss is
smoothed by an exponential moving average with bias correction; the sweep stops early when the
smoothed loss exceeds DIVERGED times the best so far, or when the loss is not finite.

The rate swept is the config's `lr` (the head's under discriminative); the backbone's group keeps
its ratio lr_backbone / lr. Nothing is written: no run folder, no checkpoint, and a model passed
in (`prepared`) is copied, never trained. Eager mode only, so it runs in a worker thread (the
app) as on the main thread (the CLI); `cancel` is checked between steps.

The suggestion (`suggest`): the learning rate where the smoothed loss falls fastest, per decade
of learning rate, within the SPAN_DECADES decades below the rate of its minimum. The steepest fall
is where the loss responds most to the rate while training is still stable (fastai's "steep"
rule); the other classic rule, a tenth of the rate at the minimum, is the middle of that window.
Why the window: far below the minimum the curve is flat and its wiggles are noise, largest in
the first steps (the average of few losses), and a short sweep (23 steps on the default digits)
then found its "steepest fall" in the noise at 1e-7 (seen: ResNet-18 from scratch at 16 px).
"""
from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

from core.config import RunConfig

if TYPE_CHECKING:  # numpy is imported where it is used: core.cli reads this module's defaults when
    import numpy as np  # it builds its parser, for every command (`runs` and `stop` need no numpy)

DEFAULT_STEPS = 100
DEFAULT_START_LR = 1e-7
DEFAULT_END_LR = 10.0
MAX_STEPS = 10_000
SMOOTHING = 0.9
"""EMA weight of the past: about 10 steps. fastai's 0.98 (about 50 steps) lags the curve by
several decades of learning rate on a sweep of 100 steps or fewer (23 on the default digits)."""
SPAN_DECADES = 2.0
"""The suggestion is looked for within this many decades below the smoothed loss's minimum."""
DIVERGED = 4.0
"""Stop once the smoothed loss exceeds this many times the best smoothed loss so far."""

FINISHED, DIVERGING, NOT_FINITE, CANCELLED = "finished", "diverged", "not finite", "cancelled"


@dataclass(frozen=True)
class SweepPoint:
    """One step of the sweep: the head's learning rate, the batch's loss, the smoothed loss."""

    step: int
    lr: float
    loss: float
    smoothed: float


@dataclass(frozen=True)
class SweepProgress:
    """Told to `on_step` after each step: the point, how many steps the sweep plans, and the
    learning rate of each param group at that step (head and backbone under discriminative)."""

    point: SweepPoint
    total: int
    lrs: Dict[str, float]


@dataclass(frozen=True)
class SweepResult:
    points: Tuple[SweepPoint, ...]
    suggestion: Optional[float]
    """The suggested learning rate (rounded as shown), or None when the curve gives none."""
    why: str
    """How the sweep ended and, when there is no suggestion, why not: one line."""
    stopped: str
    """FINISHED, DIVERGING, NOT_FINITE or CANCELLED."""
    planned: int
    """Steps planned (min of the steps asked for and the batches of one pass over the data)."""
    seconds: float
    backbone_ratio: Optional[float] = None
    """lr_backbone / lr under discriminative (the backbone's rate during the sweep), else None."""


class SweepError(ValueError):
    """Bad sweep parameters (steps, start or end learning rate)."""


def check_sweep(steps: int, start_lr: float, end_lr: float) -> List[str]:
    """Every problem with the sweep's own parameters, phrased for their flags."""
    problems = []
    if not 2 <= steps <= MAX_STEPS:
        problems.append(f"--steps must be between 2 and {MAX_STEPS}, got {steps}")
    for name, value in (("--start-lr", start_lr), ("--end-lr", end_lr)):
        if not (math.isfinite(value) and value > 0):
            problems.append(f"{name} must be a positive number, got {value}")
    if not problems and end_lr <= start_lr:
        problems.append(f"--end-lr ({end_lr:g}) must be larger than --start-lr ({start_lr:g})")
    return problems


def sweep_lrs(start_lr: float, end_lr: float, steps: int) -> "np.ndarray":
    """`steps` learning rates from start_lr to end_lr, each the last times the same factor."""
    import numpy as np

    return np.geomspace(start_lr, end_lr, steps)


def format_lr(lr: float) -> str:
    """A learning rate with two significant digits: 0.012, 0.5, 3.2e-04."""
    return f"{lr:.2g}" if lr >= 1e-3 else f"{lr:.1e}"


def suggest(lrs: List[float], smoothed: List[float]) -> Tuple[Optional[float], str]:
    """(learning rate of the steepest fall of the smoothed loss per decade of learning rate,
    within SPAN_DECADES below the curve's minimum; or None) and, when None, why."""
    import numpy as np

    if len(lrs) < 3:
        return None, "too few steps to read a slope (at least 3 are needed)"
    x, y = np.log10(np.asarray(lrs)), np.asarray(smoothed)
    lowest = int(np.argmin(y))
    window = [i for i in range(lowest) if x[i] >= x[lowest] - SPAN_DECADES]
    if not window:
        return None, (f"the loss did not fall (it was lowest at lr {format_lr(lrs[lowest])}): start the "
                      "sweep lower (--start-lr)")
    slopes = np.gradient(y, x)  # central differences: each point's slope uses both neighbours
    best = min(window, key=lambda i: slopes[i])
    if not slopes[best] < 0:
        return None, "the smoothed loss did not fall before its minimum"
    return float(format_lr(float(lrs[best]))), ""


def apply_suggestion(cfg: RunConfig, lr: float) -> RunConfig:
    """`cfg` with `lr` as its learning rate; under discriminative (where `lr` is the head's) the
    backbone's rate is scaled alike, keeping the ratio lr_backbone / lr."""
    if cfg.strategy == "discriminative":
        return cfg.replace(lr=lr, lr_backbone=float(f"{cfg.lr_backbone * lr / cfg.lr:.3g}"))
    return cfg.replace(lr=lr)


def lr_find(cfg: RunConfig, steps: int = DEFAULT_STEPS, start_lr: float = DEFAULT_START_LR,
            end_lr: float = DEFAULT_END_LR, on_step: Optional[Callable[[SweepProgress], None]] = None,
            cancel: Optional[threading.Event] = None, prepared=None) -> SweepResult:
    """Sweep the learning rate on a copy of the model `cfg` describes (or of `prepared.model`,
    whose data it then uses) and return the points and the suggestion.

    Raises SweepError for bad sweep parameters and a SetupError (ConfigError, DataError...)
    when the settings cannot be set up, before any step. Ctrl-C (KeyboardInterrupt) passes through.
    """
    problems = check_sweep(steps, start_lr, end_lr)
    if problems:
        raise SweepError("; ".join(problems))
    from core.backend import flow
    from core.cpu_conv import batched_small_convs
    from core.data import BatchTransform, batches
    from core.strategies import build_param_groups, set_train_mode
    from core.trainer import prepare, training_loss

    import numpy as np

    if prepared is None:
        p = prepare(cfg, runs_folder=False)
        model = p.model  # built for the sweep alone: it is the copy
    else:
        p = prepared
        model = copy.deepcopy(p.model)
    cfg = p.cfg
    groups = build_param_groups(model, cfg.strategy, p.head, cfg.lr, cfg.lr_backbone, cfg.no_wd_bn_bias)
    scale = {g["name"]: float(g["lr"]) / cfg.lr for g in groups}  # backbone: lr_backbone / lr
    optimizer = flow.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loss_fn = training_loss(cfg).to(p.device)  # the run's (label smoothing): the curve is of what it trains on
    transform = BatchTransform(flow, p.device, p.train.images.shape[1:3], cfg.image_size, cfg.normalize,
                               cfg.hflip, cfg.vflip)
    rng = np.random.default_rng(cfg.seed)
    order = list(batches(len(p.train), cfg.batch_size, True, rng))
    planned = min(steps, len(order))
    lrs = sweep_lrs(start_lr, end_lr, planned) if planned >= 2 else np.array([start_lr])
    set_train_mode(model, cfg.strategy, p.head)
    points: List[SweepPoint] = []
    stopped, why, best = FINISHED, "", math.inf
    avg, started = 0.0, time.monotonic()
    with batched_small_convs(model, p.device):  # the trainer's CPU speed-up (core.cpu_conv)
        for i, (lr, idx) in enumerate(zip(lrs, order), 1):
            if cancel is not None and cancel.is_set():
                stopped, why = CANCELLED, f"cancelled after {i - 1} of {planned} step{'s' * (planned != 1)}"
                break
            for group in optimizer.param_groups:
                group["lr"] = float(lr) * scale[group["name"]]
            x = transform(p.train.images[idx], True, rng)
            y = flow.tensor(p.train.labels[idx], device=p.device)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            value = float(loss.item())
            if not math.isfinite(value):
                stopped, why = NOT_FINITE, f"stopped at lr {format_lr(lr)}: the loss became {value}"
                break
            avg = SMOOTHING * avg + (1 - SMOOTHING) * value
            smoothed = avg / (1 - SMOOTHING ** i)
            points.append(SweepPoint(i, float(lr), value, smoothed))
            if on_step is not None:
                on_step(SweepProgress(points[-1], planned, {g["name"]: g["lr"] for g in optimizer.param_groups}))
            best = min(best, smoothed)
            if smoothed > DIVERGED * best:
                stopped, why = DIVERGING, (f"stopped at lr {format_lr(lr)}: the smoothed loss exceeded "
                                           f"{DIVERGED:g}x its lowest")
                break
    suggestion, reason = suggest([pt.lr for pt in points], [pt.smoothed for pt in points])
    if stopped == FINISHED:
        why = f"{len(points)} step{'s' * (len(points) != 1)}, lr {format_lr(lrs[0])} to {format_lr(lrs[-1])}"
        if planned < steps:
            why += f" (one pass over the {len(p.train)} training images)"
    if suggestion is None and stopped != CANCELLED:
        why = f"{why}; no suggestion: {reason}"
    ratio = cfg.lr_backbone / cfg.lr if cfg.strategy == "discriminative" else None
    return SweepResult(tuple(points), suggestion, why, stopped, planned, time.monotonic() - started, ratio)
