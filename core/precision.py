"""Mixed precision: which one a run uses, OneFlow's autocast around its forward passes, and fp16's
loss scaling.

`precision` is a setting: auto, fp32, fp16 or bf16. auto is bf16 on GPUs that have it (compute
capability 8.0 and up: Ampere, Ada), fp16 on Volta and Turing (7.x: tensor cores, no bf16), fp32
on older GPUs and on the CPU (OneFlow's autocast is CUDA-only: on the CPU it does nothing). fp16
and bf16 asked for on the CPU are refused before the run starts.

OneFlow 0.9.0's `GradScaler` only configures an nn.Graph; eager training needs its own scaler:
`LossScaler` is PyTorch's dynamic scheme (scale the loss; unscale the gradients; skip the step
and halve the scale when one is not finite; double it after `growth_interval` good steps). It
reads one number per step from the device (whether a gradient overflowed), as PyTorch's does.
bf16 has fp32's range and needs no scaling.

None of this is measured on a GPU here (there is none): speed-ups on a GPU are estimates.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional, Tuple

from core.config import PRECISIONS  # noqa: F401  (the setting's choices)
from core.errors import SetupError


class PrecisionError(SetupError):
    """The precision asked for cannot be used on this device."""


def resolve(precision: str, device: str, capability: Optional[Tuple[int, int]] = None) -> str:
    """The precision a run uses: fp32, fp16 or bf16 (see the module's docstring for auto).
    `capability` is the GPU's (major, minor) when `device` is cuda."""
    on_gpu = device.startswith("cuda")
    if precision == "auto":
        if not on_gpu or capability is None:
            return "fp32"
        return "bf16" if capability >= (8, 0) else "fp16" if capability >= (7, 0) else "fp32"
    if precision in ("fp16", "bf16") and not on_gpu:
        raise PrecisionError(f"precision {precision} needs a CUDA GPU (OneFlow's autocast is CUDA-only); "
                             "on the CPU use auto or fp32")
    if precision == "bf16" and capability is not None and capability < (8, 0):
        raise PrecisionError(f"precision bf16 needs a GPU of compute capability 8.0 or newer (Ampere); this one "
                             f"is {capability[0]}.{capability[1]}: use fp16 or auto")
    return precision


def autocast(flow: Any, precision: str, device: str) -> Any:
    """The context the forward passes run in: OneFlow's autocast to fp16/bf16 on a GPU, else nothing."""
    if precision == "fp32" or not device.startswith("cuda"):
        return contextlib.nullcontext()
    return flow.autocast("cuda", dtype=flow.float16 if precision == "fp16" else flow.bfloat16)


class LossScaler:
    """Dynamic loss scaling for fp16 (a pass-through when disabled): backward(loss), then step(optimizer)."""

    def __init__(self, flow: Any, enabled: bool, scale: float = 2.0 ** 16, growth_interval: int = 2000) -> None:
        self.flow, self.enabled = flow, enabled
        self.scale, self.growth_interval, self.good_steps = float(scale), growth_interval, 0
        self.skipped = 0
        """Steps skipped so far because a gradient overflowed."""

    def backward(self, loss: Any) -> None:
        (loss * self.scale if self.enabled else loss).backward()

    def step(self, optimizer: Any) -> bool:
        """Unscale the gradients of the optimizer's parameters and step, or skip the step when one
        is not finite (then the scale halves). False when the step was skipped."""
        if not self.enabled:
            optimizer.step()
            return True
        flow = self.flow
        grads = [p.grad for g in optimizer.param_groups for p in g.parameters if p.grad is not None]
        inv = 1.0 / self.scale
        for g in grads:
            g.mul_(inv)
        finite = bool(flow.stack([flow.isfinite(g).all() for g in grads]).all().item()) if grads else True
        if not finite:
            self.scale, self.good_steps = max(self.scale / 2.0, 1.0), 0
            self.skipped += 1
            return False
        optimizer.step()
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale, self.good_steps = self.scale * 2.0, 0
        return True

    def state_dict(self) -> Dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """From a checkpoint's resume record (its numbers checked: the file is untrusted)."""
        scale, good, skipped = state.get("scale"), state.get("good_steps"), state.get("skipped", 0)
        if not (isinstance(scale, float) and 1.0 <= scale <= 2.0 ** 64 and type(good) is int and good >= 0
                and type(skipped) is int and skipped >= 0):
            raise ValueError("its loss scaler state is not valid")
        self.scale, self.good_steps, self.skipped = scale, good, skipped
