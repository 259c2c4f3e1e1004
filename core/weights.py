"""Reading and writing weights: the one place that opens a weights file.

A weights file may come from anywhere (a colleague, a model hub, a download), so reading one must
never run code from it nor write outside where it belongs:

- TransferLab writes its checkpoints as safetensors files (a JSON header plus raw tensor bytes,
  nothing to execute) and JSON: `model.safetensors`, `optimizer.safetensors` (the optimizer's
  non-tensor parts in the file's JSON metadata) and `meta.json`.
- `.safetensors` files are read with `safetensors.numpy` (no torch needed).
- `flow.save` folders (FlowVision's ImageNet weights, other OneFlow users' files, TransferLab's
  checkpoints before safetensors) hold a pickle, `pickled_data`. `flow.load` unpickles it without
  any restriction, so it is never called: `_StateUnpickler` allows only the globals a state dict
  needs and refuses any other with one line naming the file and the global; each tensor's bytes
  are then read from the folder's own `tensor_*/out` files by this module.
- FlowVision's ImageNet zips are downloaded with FlowVision's helper and unpacked here, member by
  member, refusing absolute paths, `..` and links.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import stat
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from core.backend import flow
from core.errors import SetupError
from core.files import too_large
from core.store import atomic_write_json

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "meta.json"
OPTIMIZER_KEY = "transferlab.optimizer"
"""Key of the safetensors metadata entry holding the optimizer state's JSON skeleton."""
MAX_WEIGHTS_BYTES = 1 << 30
"""A weights file (or one tensor of a flow.save folder) larger than this is refused: the biggest
backbone here (ResNet-50) with its optimizer state is ~200 MB, and a crafted sparse file of
any size would otherwise be read into memory whole."""
MAX_PICKLED_ITEMS = 1_000_000
"""At most this many items in the structure a flow.save pickle unfolds to (ResNet-50: ~1,000)."""
ACCEPTED = ("a .safetensors file, a TransferLab checkpoint folder, or a folder saved with OneFlow's "
            "flow.save")


class WeightsError(SetupError):
    """Weights cannot be loaded (or are refused); the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# safetensors: TransferLab's checkpoints and hub weights


def _contiguous(array: np.ndarray) -> np.ndarray:
    # not np.ascontiguousarray: it turns 0-d arrays (BatchNorm's step counters) into 1-d ones
    return np.require(array, requirements="C")


def _to_numpy(tensor: "flow.Tensor") -> np.ndarray:
    # numpy() of a CPU tensor may share its memory: the array is written out at once, never kept.
    return _contiguous(tensor.detach().cpu().numpy())


def _to_flow(array: np.ndarray) -> "flow.Tensor":
    """A tensor with its own copy of the data (flow.tensor copies; from_numpy would share)."""
    return flow.tensor(_contiguous(array))


def _pack(value: Any, tensors: Dict[str, np.ndarray], name: str) -> Any:
    """`value` as JSON with every tensor moved into `tensors` (under a name made of positions,
    so keys of any type cannot collide). Dicts keep their keys' types (ints stay ints)."""
    if isinstance(value, flow.Tensor):
        tensors[name] = _to_numpy(value)
        return {"tensor": name}
    if isinstance(value, dict):
        return {"dict": [[k, _pack(v, tensors, f"{name}.{i}")] for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_pack(v, tensors, f"{name}.{i}") for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot save a {type(value).__name__} in a checkpoint ({name})")


def _unpack(node: Any, tensors: Dict[str, np.ndarray]) -> Any:
    """The inverse of `_pack`; raises ValueError on anything `_pack` does not write."""
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"unexpected entry {str(node)[:60]}")
    (kind, body), = node.items()
    if kind == "tensor" and isinstance(body, str) and body in tensors:
        return _to_flow(tensors[body])
    if kind == "dict" and isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body):
        return {k: _unpack(v, tensors) for k, v in body}
    if kind in ("list", "tuple") and isinstance(body, list):
        items = [_unpack(v, tensors) for v in body]
        return items if kind == "list" else tuple(items)
    if kind == "value" and (body is None or isinstance(body, (bool, int, float, str))):
        return body
    raise ValueError(f"unexpected entry {str(node)[:60]}")


def _write_safetensors(path: Path, tensors: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata)


def _read_safetensors(path: Path) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # SafetensorError (bad header, truncated data), unsupported dtypes
        raise WeightsError(f"cannot read {path} as a safetensors file ({exc})") from None


def save_weights(path: str | Path, model: "flow.nn.Module", metadata: Dict[str, str]) -> None:
    """Write `model`'s weights as one .safetensors file at `path` with `metadata` (strings) in its
    header, atomically (a temporary file beside it, renamed into place): `transferlab export
    --safetensors`. The file loads back with read_state_dict (so as --pretrained)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        _write_safetensors(Path(tmp), {k: _to_numpy(v) for k, v in model.state_dict().items()},
                           {"format": "np", **metadata})
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_checkpoint(folder: str | Path, model: "flow.nn.Module", optimizer: Any, meta: Dict[str, Any]) -> None:
    """Write model weights, optimizer state and `meta` into `folder` (created if needed):
    model.safetensors, optimizer.safetensors (tensors; the rest as JSON in its metadata), meta.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_safetensors(folder / MODEL_FILE, {k: _to_numpy(v) for k, v in model.state_dict().items()},
                       {"format": "np"})
    tensors: Dict[str, np.ndarray] = {}
    skeleton = _pack(optimizer.state_dict(), tensors, "optimizer")
    _write_safetensors(folder / OPTIMIZER_FILE, tensors, {OPTIMIZER_KEY: json.dumps(skeleton)})
    atomic_write_json(folder / META_FILE, meta)


def load_checkpoint(folder: str | Path, with_optimizer: bool = True
                    ) -> Tuple[Dict[str, "flow.Tensor"], Optional[Dict[str, Any]], Dict[str, Any]]:
    """(model state, optimizer state or None, meta) of a TransferLab checkpoint folder, in the
    safetensors layout or the older one (model/ and optimizer/ flow.save folders). The optimizer
    state is None when the folder has none or `with_optimizer` is false."""
    folder = Path(folder).expanduser()
    meta = read_meta(folder)
    if (folder / MODEL_FILE).is_file():
        model = check_state_dict(_state_from_arrays(_read_safetensors(folder / MODEL_FILE)[0]), folder / MODEL_FILE)
        optimizer = None
        if with_optimizer and (folder / OPTIMIZER_FILE).is_file():
            tensors, metadata = _read_safetensors(folder / OPTIMIZER_FILE)
            try:
                optimizer = _unpack(json.loads(metadata[OPTIMIZER_KEY]), tensors)
            except (KeyError, ValueError, TypeError) as exc:
                raise WeightsError(f"{folder / OPTIMIZER_FILE} holds no readable optimizer state ({exc})") from None
        return model, optimizer, meta
    if (folder / "model").is_dir():  # the layout before safetensors: flow.save folders
        model = check_state_dict(read_flow_save(folder / "model"), folder / "model")
        optimizer = read_flow_save(folder / "optimizer") \
            if with_optimizer and (folder / "optimizer").is_dir() else None
        return model, optimizer, meta
    raise WeightsError(f"{folder} is not a TransferLab checkpoint (no {MODEL_FILE} nor model/ in it)")


def read_meta(folder: str | Path) -> Dict[str, Any]:
    """The meta.json of a checkpoint folder as a dict ({} when there is none); WeightsError when
    it is not a JSON object. Its values are untrusted: check them where they are used."""
    path = Path(folder).expanduser() / META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise WeightsError(f"cannot read {path} ({exc})") from None
    if not isinstance(meta, dict):
        raise WeightsError(f"{path} holds a {type(meta).__name__}, not an object")
    return meta


def _state_from_arrays(arrays: Dict[str, np.ndarray]) -> Dict[str, "flow.Tensor"]:
    return OrderedDict((k, _to_flow(v)) for k, v in arrays.items())


# ---------------------------------------------------------------------------------------------
# flow.save folders, through a restricted unpickler


class _TensorRef:
    """Stands in for a OneFlow tensor while a `pickled_data` is unpickled. flow.save pickles a
    tensor as `Tensor.__new__` + state `{"path": "tensor_N"}`; this keeps the entry name only,
    and the bytes are read afterwards from that entry, without OneFlow's own __setstate__."""

    __slots__ = ("entry",)

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, dict) and isinstance(state.get("path"), str)):
            raise pickle.UnpicklingError("a tensor record without the name of its data")
        self.entry = state["path"]


# (module, name) -> what it unpickles to. Found with pickletools.genops on flow.save files of a
# ResNet-18 state dict and of an SGD optimizer state dict (oneflow 0.9.0): nothing else is used.
SAFE_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("oneflow", "Tensor"): _TensorRef,
    ("oneflow.nn", "Parameter"): _TensorRef,
}


class _StateUnpickler(pickle.Unpickler):
    """An unpickler that can build dicts, lists, numbers, strings and tensor records only."""

    def __init__(self, file: io.BytesIO, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise WeightsError(
                f"refused to load {self.source}: it asks for {module}.{name}, which a state dict never "
                f"needs (the file may be crafted to run code); nothing from it was run") from None


_ENTRY = re.compile(r"[A-Za-z0-9_.\-]+")


def _regular_file_inside(folder: Path, name: str) -> Path:
    """folder/name when it is a regular file directly below `folder` (no links, no way out)."""
    path = folder / name
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file")
    return path


def _read_variable(folder: Path, entry: str) -> "flow.Tensor":
    """One tensor of a flow.save folder: `entry/meta` (protobuf text: shape and dtype) and `entry/out`
    (raw bytes), both regular files inside `folder`."""
    from google.protobuf import text_format
    import oneflow.core.framework.variable_meta_info_pb2 as meta_pb
    import oneflow.framework.dtype as dtype_util

    if not _ENTRY.fullmatch(entry) or entry in (".", ".."):
        raise ValueError(f"tensor entry {entry[:60]!r} is not a plain name")
    var = folder / entry
    if not stat.S_ISDIR(os.lstat(var).st_mode):
        raise ValueError(f"{var} is not a folder")
    info = meta_pb.VariableMetaInfo()
    text_format.Parse(_regular_file_inside(var, "meta").read_text(encoding="utf-8"), info)
    shape = tuple(int(d) for d in info.shape.dim)
    dtype = np.dtype(dtype_util.convert_oneflow_dtype_to_numpy_dtype(
        dtype_util.convert_proto_dtype_to_oneflow_dtype(info.data_type)))
    out = _regular_file_inside(var, "out")
    if too_large(out, MAX_WEIGHTS_BYTES):
        raise ValueError(f"{out} holds more than {MAX_WEIGHTS_BYTES >> 20} MB: not a tensor of these models")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if out.stat().st_size != expected:
        raise ValueError(f"{out} has {out.stat().st_size} bytes, its meta says {expected}")
    return flow.from_numpy(np.fromfile(out, dtype=dtype).reshape(shape))


def _resolve(value: Any, folder: Path, budget: Optional[List[int]] = None) -> Any:
    """Replace every tensor record in an unpickled structure by the tensor read from `folder`.

    A pickle can make a small file unfold into a huge structure (a list that holds the same
    list a thousand times, a thousand levels down): at most MAX_PICKLED_ITEMS items are visited."""
    budget = [MAX_PICKLED_ITEMS] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"it holds more than {MAX_PICKLED_ITEMS:,} items: not a state dict")
    if isinstance(value, _TensorRef):
        return _read_variable(folder, value.entry)
    if isinstance(value, dict):
        return type(value)((k, _resolve(v, folder, budget)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v, folder, budget) for v in value)
    return value


def read_flow_save(folder: str | Path) -> Any:
    """What `flow.save` wrote into `folder`, read without `flow.load`: the pickle through
    `_StateUnpickler`, the tensors from their entries. Also reads the legacy layout (no
    pickled_data: one `<key>/out` + `<key>/meta` per tensor and a `snapshot_done` marker)."""
    folder = Path(folder)
    pickled = folder / "pickled_data"
    if not pickled.exists():
        if (folder / "snapshot_done").exists():
            return _read_legacy(folder)
        raise WeightsError(f"{folder} is not a flow.save folder (no pickled_data in it)")
    try:
        data = _regular_file_inside(folder, "pickled_data").read_bytes()
        saved = _StateUnpickler(io.BytesIO(data), pickled).load()
        if not (isinstance(saved, dict) and saved.get("protocol_version") == 1 and "data" in saved):
            raise ValueError("not the record flow.save writes (protocol_version 1 and data)")
        return _resolve(saved["data"], folder)
    except WeightsError:
        raise
    except Exception as exc:  # a damaged or foreign pickle can raise nearly anything while read
        raise WeightsError(f"cannot read {folder} as a flow.save folder ({type(exc).__name__}: {exc})") from None


def _read_legacy(folder: Path) -> Dict[str, "flow.Tensor"]:
    try:
        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
        return OrderedDict((name, _read_variable(folder, name)) for name in names)
    except Exception as exc:
        raise WeightsError(f"cannot read {folder} as a flow.save folder ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------------------------------------
# --pretrained PATH


def check_state_dict(state: Any, source: str | Path) -> Dict[str, "flow.Tensor"]:
    """`state` when it maps strings to tensors; otherwise WeightsError naming the first bad entry."""
    if not isinstance(state, dict):
        raise WeightsError(f"{source} holds a {type(state).__name__}, not a state dict (names -> tensors)")
    if not state:
        raise WeightsError(f"{source} holds an empty state dict")
    for key, value in state.items():
        if not isinstance(key, str):
            raise WeightsError(f"{source} is not a state dict: it has a key {key!r} that is not a name")
        if not isinstance(value, flow.Tensor):
            raise WeightsError(f"{source} is not a state dict: {key} is a {type(value).__name__}, not a tensor")
    return state


def read_state_dict(path: str | Path) -> Dict[str, "flow.Tensor"]:
    """The state dict at `path` (`--pretrained PATH`): a .safetensors file, a TransferLab
    checkpoint folder (either layout), or a flow.save folder. Never runs code from the file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"pretrained weights file {path} does not exist")
    if path.is_file():
        if too_large(path, MAX_WEIGHTS_BYTES):
            raise WeightsError(f"{path} holds more than {MAX_WEIGHTS_BYTES >> 20} MB: not weights of the "
                               f"backbones TransferLab builds")
        if path.suffix == ".safetensors":
            return check_state_dict(_state_from_arrays(_read_safetensors(path)[0]), path)
        kind = " (it looks like a PyTorch torch.save file: convert it with safetensors.torch.save_file)" \
            if zipfile.is_zipfile(path) else ""
        raise WeightsError(f"{path} is not a weights file TransferLab reads{kind}; accepted: {ACCEPTED}")
    if not path.is_dir():  # a FIFO would block the read, a device never end it
        raise WeightsError(f"{path} is neither a regular file nor a folder; accepted: {ACCEPTED}")
    if (path / MODEL_FILE).is_file() or (path / "model").is_dir():
        return load_checkpoint(path, with_optimizer=False)[0]
    if (path / "pickled_data").exists() or (path / "snapshot_done").exists():
        return check_state_dict(read_flow_save(path), path)
    what = "an empty folder" if not any(path.iterdir()) else "a folder without weights TransferLab reads"
    raise WeightsError(f"{path} is {what}; accepted: {ACCEPTED}")


# ---------------------------------------------------------------------------------------------
# FlowVision's ImageNet weights


def _download(url: str, dst: str) -> None:
    """FlowVision's own downloader (urllib); a separate function so tests can replace it."""
    from flowvision.models.utils import download_url_to_file

    download_url_to_file(url, dst, progress=False)


def safe_unzip(archive: Path, dest: Path) -> None:
    """Extract `archive` into `dest`, refusing (WeightsError) any member with an absolute path, a
    `..` part or a link, before anything is written."""
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for info in members:
            parts = Path(info.filename).parts
            is_link = stat.S_ISLNK(info.external_attr >> 16)
            if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in info.filename or is_link:
                raise WeightsError(f"refused to unpack {archive}: member {info.filename!r} would be written "
                                   f"outside {dest} or is a link")
        zf.extractall(dest, members)


def fetch_imagenet(url: str, folder: Path) -> None:
    """Download FlowVision's zip at `url` and unpack it safely as `folder` (its cache entry)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.tmp-") as tmp:
        archive = Path(tmp) / Path(url).name
        _download(url, str(archive))
        unpacked = Path(tmp) / "unpacked"
        safe_unzip(archive, unpacked)
        if not (unpacked / folder.name).is_dir():
            raise WeightsError(f"{url} does not hold a folder {folder.name}/")
        os.replace(unpacked / folder.name, folder)


def load_imagenet(url: str, folder: Path) -> Dict[str, "flow.Tensor"]:
    """FlowVision's ImageNet state dict: from its cache `folder`, downloaded first when missing.
    Unlike FlowVision's load_state_dict_from_url, nothing is unpickled without restriction."""
    if not folder.is_dir():
        try:
            fetch_imagenet(url, folder)
        except WeightsError:
            raise
        except Exception as exc:  # URLError offline, HTTP errors, broken archives, a full disk
            raise WeightsError(
                f"ImageNet weights are not in {folder} and could not be downloaded ({exc}). On a machine "
                f"with internet, download {url}, unzip it into {folder.parent}, or choose pretrained none "
                f"or a local weights file.") from None
    return check_state_dict(read_flow_save(folder), folder)
