"""TransferLab's engine: config, data, models, strategies, training loop, run store, CLI.

It never imports a UI. Importing it makes oneflow importable without LD_LIBRARY_PATH: the PyPI
oneflow 0.9.0 wheel is a CUDA 11.7 build that loads cuDNN 8 and cuBLAS 11 at import time, even on
a CPU. When the nvidia-cudnn-cu11 / nvidia-cublas-cu11 wheels sit in the same site-packages as
oneflow, its RPATH finds them; when they live elsewhere on sys.path (say, the user site) they are
preloaded here. This is the only place that does it; oneflow itself is imported in core.backend.
"""
from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path
from typing import List

_CUDA_LIBS = {
    "cublas": ("libcublasLt.so.11", "libcublas.so.11"),
    "cudnn": ("libcudnn.so.8", "libcudnn_ops_infer.so.8", "libcudnn_ops_train.so.8",
              "libcudnn_cnn_infer.so.8", "libcudnn_cnn_train.so.8",
              "libcudnn_adv_infer.so.8", "libcudnn_adv_train.so.8"),
}


def _preload_cuda_libraries(force: bool = False) -> List[str]:
    """dlopen cuDNN 8 / cuBLAS 11 from the nvidia wheels when they are not where oneflow's RPATH
    looks (its own site-packages), or always with `force`. Returns the paths loaded."""
    loaded: List[str] = []
    spec = importlib.util.find_spec("oneflow")
    if spec is None or spec.origin is None:
        return loaded
    site = Path(spec.origin).resolve().parents[1]
    seen = set()
    for entry in sys.path:  # every site-packages, since nvidia/ is a regular package in each
        for package, names in _CUDA_LIBS.items():
            lib = Path(entry or ".") / "nvidia" / package / "lib"
            if package in seen:
                continue
            if not lib.is_dir():
                continue
            if lib.resolve().parents[2] == site and not force:
                seen.add(package)  # oneflow's RPATH ($ORIGIN/../nvidia/*/lib) finds these itself
                continue
            if all((lib / name).exists() for name in names):
                seen.add(package)  # the first complete copy on sys.path wins, as for imports
                for name in names:
                    ctypes.CDLL(str(lib / name), mode=ctypes.RTLD_GLOBAL)
                    loaded.append(str(lib / name))
    return loaded


PRELOADED = _preload_cuda_libraries()
"""The library files this import loaded (empty when oneflow's RPATH finds them)."""
