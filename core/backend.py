"""The one module that imports oneflow: CUDA libraries, Ctrl-C, device choice and GPU check.

Every other module gets oneflow from here (`from core.backend import flow`).

- The PyPI oneflow 0.9.0 wheel is a CUDA 11.7 build that needs cuDNN 8 and cuBLAS 11 at import
  time, even on a CPU. When the nvidia-cudnn-cu11 / nvidia-cublas-cu11 wheels live in the same
  site-packages as oneflow, its RPATH finds them; when they live elsewhere (another site-packages
  on sys.path) they are preloaded here, so no LD_LIBRARY_PATH is ever needed.
- `import oneflow` replaces Python's SIGINT handler (Ctrl-C then segfaults mid-training): the
  default handler is restored right after the import, so Ctrl-C raises KeyboardInterrupt.
- `pick_device` resolves auto/cpu/cuda and runs a tiny probe on the GPU, so that a GPU this
  build has no kernels for (Hopper: sm_90) is reported at start-up, with the fix.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import threading
from pathlib import Path
from typing import Dict, Optional

os.environ.setdefault("GLOG_minloglevel", "2")  # oneflow's glog warnings would draw over the TUI

_CUDA_LIBS = {
    "cublas": ("libcublasLt.so.11", "libcublas.so.11"),
    "cudnn": ("libcudnn.so.8", "libcudnn_ops_infer.so.8", "libcudnn_ops_train.so.8",
              "libcudnn_cnn_infer.so.8", "libcudnn_cnn_train.so.8",
              "libcudnn_adv_infer.so.8", "libcudnn_adv_train.so.8"),
}


def _preload_cuda_libraries() -> None:
    spec = importlib.util.find_spec("oneflow")
    nvidia = importlib.util.find_spec("nvidia")
    if spec is None or spec.origin is None or nvidia is None:
        return
    site = Path(spec.origin).resolve().parents[1]
    for base in nvidia.submodule_search_locations or []:
        for package, names in _CUDA_LIBS.items():
            lib = Path(base) / package / "lib"
            if not lib.is_dir() or lib.resolve().parents[2] == site:
                continue  # oneflow's RPATH ($ORIGIN/../nvidia/*/lib) finds these by itself
            for name in names:
                if (lib / name).exists():
                    ctypes.CDLL(str(lib / name), mode=ctypes.RTLD_GLOBAL)


_preload_cuda_libraries()
import oneflow as flow  # noqa: E402

if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.default_int_handler)

class DeviceError(RuntimeError):
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
