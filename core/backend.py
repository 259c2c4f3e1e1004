"""The one module that imports oneflow: CUDA libraries, Ctrl-C, device choice and GPU check.

Every other module gets oneflow from here (`from core.backend import flow`).

- The CUDA libraries oneflow loads at import are preloaded when needed by `core/__init__.py`.
- `import oneflow` replaces Python's SIGINT handler (Ctrl-C then segfaults mid-training): the
  default handler is restored right after the import, so Ctrl-C raises KeyboardInterrupt.
- `pick_device` resolves auto/cpu/cuda and runs a tiny probe on the GPU, so that a GPU this
  build has no kernels for (Hopper: sm_90) is reported at start-up, with the fix.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Dict, Optional, Tuple

from core.errors import SetupError

os.environ.setdefault("GLOG_minloglevel", "2")  # oneflow's glog warnings would draw over the TUI

# While oneflow is imported, Ctrl-C and SIGTERM wait (blocked): oneflow installs its own SIGINT
# handler part way, and a Ctrl-C then ended the process with status 255 and no word. The threads
# oneflow starts inherit the block, so these signals always reach the main thread afterwards.
_MAIN = threading.current_thread() is threading.main_thread()
_held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) if _MAIN else None
try:
    # core/__init__.py (run before this module) has preloaded the CUDA libraries where needed.
    import oneflow as flow  # noqa: E402
finally:
    if _MAIN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, _held)  # a Ctrl-C that waited arrives now


class DeviceError(SetupError):
    """The requested device cannot be used; the message says why and what to do."""


HOPPER_FIX = (
    "The PyPI oneflow 0.9.0 wheel has GPU code for sm_60-sm_86 only (Volta to Ada). Install a "
    "OneFlow build made for this GPU over it, e.g. ONEFLOW_PIP='--pre oneflow -f "
    "https://oneflow-staging.oss-cn-beijing.aliyuncs.com/branch/master/cu118' make setup "
    "(README: 'Newer GPUs'), or train on the CPU with --device cpu."
)

_probe_cache: Dict[str, Optional[str]] = {}


def gpu_problem() -> Optional[str]:
    """None when a CUDA GPU is present and this OneFlow build runs on it; else why not.

    Returns "no CUDA GPU" when there is none. The probe runs once per process.
    """
    if "cuda" in _probe_cache:
        return _probe_cache["cuda"]
    problem: Optional[str]
    if not flow.cuda.is_available():
        problem = "no CUDA GPU is available to OneFlow"
    else:
        name, cap = "the GPU", None
        try:
            name = flow.cuda.get_device_name(0)
            cap = tuple(flow.cuda.get_device_capability(0))
        except Exception:
            pass
        try:
            x = flow.ones(8, device="cuda")
            value = float((x * 2).sum().item())
            problem = None if value == 16.0 else f"a test computation on {name} gave a wrong result"
        except Exception as exc:  # "no kernel image is available for execution on the device"
            arch = f" (sm_{cap[0]}{cap[1]})" if cap else ""
            problem = (f"OneFlow {flow.__version__} cannot run on {name}{arch}: {exc}".strip()
                       + ". " + HOPPER_FIX)
    _probe_cache["cuda"] = problem
    return problem


def gpu_capability() -> Optional[Tuple[int, int]]:
    """The first GPU's compute capability (major, minor), or None when there is none."""
    try:
        return tuple(flow.cuda.get_device_capability(0)) if flow.cuda.is_available() else None
    except Exception:
        return None


def pick_device(requested: str = "auto") -> str:
    """Resolve "auto" / "cpu" / "cuda" to the device to train on, or raise DeviceError."""
    if requested == "cpu":
        return "cpu"
    problem = gpu_problem()
    if problem is None:
        return "cuda"
    if requested == "auto" and not flow.cuda.is_available():
        return "cpu"
    raise DeviceError(problem if flow.cuda.is_available()
                      else "--device cuda was asked for, but " + problem + "; use --device auto or cpu")


def seed_everything(seed: int) -> None:
    flow.manual_seed(seed)
