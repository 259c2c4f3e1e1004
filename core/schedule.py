"""The learning-rate schedule: one pure function of the step, used by the trainer (which sets
every param group's lr to its base lr times this factor before each step) and by the form's
preview, so that the two cannot disagree, and a resumed run (which knows its global step) takes
the schedule up exactly where it stopped.

`t` is the 0-based index of the step over the whole run (the global step before it is taken),
T = epochs x steps_per_epoch its number of steps, W = round(warmup_epochs x steps_per_epoch).

- warmup (every schedule but onecycle): for t < W, factor (t + 1) / (W + 1), rising linearly from
  about 0 to 1 (never exactly 0: no step is wasted); then the schedule's own factor.
- constant: 1.
- step: step_gamma ** (epoch // step_every), epoch = t // steps_per_epoch the 0-based epoch of
  the step (counted from the run's start, warmup included).
- cosine: 0.5 (1 + cos(pi (t - W) / (T - W))): from 1 after the warmup down towards 0 (the last
  step's factor is small, never 0).
- onecycle: max lr = the configured lr. Its rising phase lasts W steps (warmup_epochs, or 30% of
  the run when 0): cosine from 1/25 up to 1, then cosine from 1 down to 1e-4 at the last step
  (t = T - 1). PyTorch's OneCycleLR with div_factor 25 and annealing to lr / 1e4.
"""
from __future__ import annotations

import math
from typing import List, Tuple

ONECYCLE_PCT = 0.3
"""The rising share of a one-cycle run when warmup_epochs is 0."""
ONECYCLE_START = 1 / 25
"""A one-cycle run starts at lr / 25 ..."""
ONECYCLE_END = 1e-4
"""... and ends at lr / 1e4."""


def warmup_steps(cfg, steps_per_epoch: int) -> int:
    """W: the steps of the warmup (of the rising phase, for onecycle)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle" and cfg.warmup_epochs == 0:
        return min(total, round(ONECYCLE_PCT * total))
    return min(total, round(cfg.warmup_epochs * steps_per_epoch))


def _cos_ramp(start: float, end: float, progress: float) -> float:
    """From `start` (progress 0) to `end` (progress 1) along half a cosine."""
    progress = min(1.0, max(0.0, progress))
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


def lr_factor(cfg, step: int, steps_per_epoch: int) -> float:
    """The factor of every param group's base lr at 0-based global step `step` (see above)."""
    total = cfg.epochs * steps_per_epoch
    warm = warmup_steps(cfg, steps_per_epoch)
    if cfg.schedule == "onecycle":
        if step < warm:
            return _cos_ramp(ONECYCLE_START, 1.0, step / warm)
        return _cos_ramp(1.0, ONECYCLE_END, (step - warm) / max(1, total - 1 - warm))
    if step < warm:
        return (step + 1) / (warm + 1)
    if cfg.schedule == "step":
        return cfg.step_gamma ** ((step // steps_per_epoch) // cfg.step_every)
    if cfg.schedule == "cosine":
        return _cos_ramp(1.0, 0.0, (step - warm) / max(1, total - warm))
    return 1.0


def curve(cfg, steps_per_epoch: int, points: int = 200) -> Tuple[List[float], List[float]]:
    """(epochs, factors): lr_factor sampled at about `points` steps over the run, x in epochs
    (the form's preview; the dashboard plots the lrs the run reports)."""
    total = cfg.epochs * steps_per_epoch
    stride = max(1, total // points)
    steps = list(range(0, total, stride))
    if steps[-1] != total - 1:
        steps.append(total - 1)
    return [s / steps_per_epoch for s in steps], [lr_factor(cfg, s, steps_per_epoch) for s in steps]
