"""oneflow-onnx, imported the one way that works on TransferLab's stack.

Written for oneflow-onnx 0.6.2 (the newest release), with numpy 1.26, protobuf 3.20, onnx 1.14.1
and onnxruntime 1.19.2 (pinned in pyproject.toml's `export` extra). oneflow-onnx 0.6.2 still uses
`np.bool`, an alias numpy 1.24 removed: its import fails without it. The alias is restored here,
before the import, and nowhere else. Drop this module when a oneflow-onnx release stops using it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from core.errors import SetupError

WRITTEN_FOR = "0.6.2"
"""The oneflow-onnx version this work-around was written for and tested with."""


class OnnxUnavailable(SetupError):
    """oneflow-onnx (or onnx / onnxruntime) is not installed or does not import."""


def oneflow_onnx() -> Any:
    """The `oneflow_onnx.oneflow2onnx.util` module (export_onnx_model), imported with numpy's
    removed `np.bool` alias put back first; OnnxUnavailable with the install line otherwise."""
    if "bool" not in np.__dict__:
        np.bool = bool  # type: ignore[attr-defined]  # removed in numpy 1.24, used by oneflow-onnx 0.6.2
    try:
        from oneflow_onnx.oneflow2onnx import util
    except ImportError as exc:
        raise OnnxUnavailable(f"ONNX export needs oneflow-onnx {WRITTEN_FOR}, onnx and onnxruntime ({exc}); "
                              f"install them with: pip install -e '.[export]'") from None
    return util


def onnxruntime() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise OnnxUnavailable(f"the ONNX check needs onnxruntime ({exc}); install it with: "
                              f"pip install -e '.[export]'") from None
    return ort
