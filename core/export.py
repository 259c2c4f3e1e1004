"""The trained model out of TransferLab: a run's metrics as CSV, its weights as a safetensors file
that says how to use them, an ONNX file checked against OneFlow, and predictions on image files.

Everything read here is untrusted (a run folder may come from anywhere): the config through
core.store.read_run (validated), the metrics through core.store.read_events (type-checked
events), the weights through core.weights.load_checkpoint (safetensors, or the restricted
unpickler; never flow.load), images through core.data.read_image. A problem is one line: an
ExportError (a SetupError), a WeightsError or a DataError.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from core import events as ev
from core.config import RunConfig
from core.data import IMAGENET_MEAN, IMAGENET_STD, BatchTransform, DataError, load_dataset, read_image
from core.errors import SetupError, one_line
from core.files import is_regular_file
from core.store import atomic_write_text, error_reason, read_events, read_run
from core.weights import WeightsError, load_checkpoint, save_weights

CHECKPOINTS = ("best", "last")
ONNX_ATOL, ONNX_RTOL = 1e-4, 1e-5
"""The largest difference allowed between ONNX Runtime's logits and OneFlow's on the same test
batch: ONNX_ATOL + ONNX_RTOL x the largest |logit| of OneFlow's. Both compute in float32, whose
rounding grows with the values: a 16 px ResNet-18 with logits up to ~7,000 differed by 1.5e-3
(2e-7 of them), one with logits below 10 by 5e-7; an absolute bound alone would fail the first."""
ONNX_CHECK_IMAGES = 8
"""How many of the run's test images the ONNX check runs through both."""
CSV_COLUMNS = ("kind", "epoch", "step", "global_step", "loss", "images_per_sec", "train_loss", "train_acc",
               "test_loss", "test_acc", "seconds")
"""Columns of the metrics CSV, then one `lr_<group>` column per param group. `kind` is "step" (a
training step: epoch, step within it, global step, loss, images/s, learning rates) or "epoch"
(an epoch's end: its train/test loss and accuracy and its duration in seconds; global_step is
the last step of that epoch). Empty cells: not recorded for that kind."""


class ExportError(SetupError):
    """A run cannot be exported or used for predictions (no checkpoint, unreadable settings...)."""


# ---------------------------------------------------------------------------------------------
# metrics as CSV


def metrics_table(run_dir: Union[str, Path]) -> Tuple[List[str], List[List[Any]]]:
    """(header, rows) of a run's metrics: a row per recorded step and per epoch, in order, as
    one continuous run (what a resume redid is dropped, as in the plots)."""
    events = ev.as_one_run(read_events(run_dir))
    groups = sorted({name for e in events if isinstance(e, ev.StepEnded) for name in e.lrs})
    header = list(CSV_COLUMNS) + [f"lr_{name}" for name in groups]
    rows: List[List[Any]] = []
    last_step: Optional[int] = None
    for e in events:
        if isinstance(e, ev.StepEnded):
            last_step = e.global_step
            rows.append(["step", e.epoch, e.step, e.global_step, e.loss, e.images_per_sec, "", "", "", "", ""]
                        + [e.lrs.get(name, "") for name in groups])
        elif isinstance(e, ev.EpochEnded):
            rows.append(["epoch", e.epoch, "", "" if last_step is None else last_step, "", "", e.train_loss,
                         e.train_acc, e.test_loss, e.test_acc, e.seconds] + [""] * len(groups))
    return header, rows


def write_metrics_csv(run_dir: Union[str, Path], path: Union[str, Path]) -> int:
    """Write the run's metrics (metrics_table) as CSV at `path`, atomically; the number of rows."""
    header, rows = metrics_table(run_dir)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([repr(v) if isinstance(v, float) else v for v in row] for row in rows)
    atomic_write_text(path, out.getvalue())
    return len(rows)


# ---------------------------------------------------------------------------------------------
# a run's model


@dataclass
class RunModel:
    """A run's trained model (eval mode, on the CPU) with what is needed to use it."""

    run_dir: Path
    cfg: RunConfig
    checkpoint: str
    """"best" or "last"."""
    meta: Dict[str, Any]
    classes: List[str]
    model: Any

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    def mean_std(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        if self.cfg.normalize == "imagenet":
            return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def transform(self, in_hw: Tuple[int, int]) -> BatchTransform:
        """The run's test-time preprocessing for uint8 NHWC images of `in_hw` pixels."""
        from core.backend import flow

        return BatchTransform(flow, "cpu", in_hw, self.cfg.image_size, self.cfg.normalize, False, False)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """OneFlow's logits for a uint8 NHWC batch, with the run's preprocessing."""
        from core.backend import flow

        with flow.no_grad():
            return self.model(self.transform(images.shape[1:3])(images, False, None)).numpy()


def pick_checkpoint(run_dir: Path, which: Optional[str]) -> Tuple[str, Path]:
    """("best"|"last", its folder): the one asked for, else best when the run has one, else last."""
    folder = run_dir / "checkpoints"
    for kind in ([which] if which else CHECKPOINTS):
        if (folder / kind).is_dir():
            return kind, folder / kind
    what = f"no checkpoints/{which}" if which else "no checkpoint"
    raise ExportError(f"run {run_dir.name} has {what} (it ended before its first epoch was saved?)")


def _classes(meta: Dict[str, Any], source: Path) -> List[str]:
    classes = meta.get("classes")
    if not (isinstance(classes, list) and 2 <= len(classes) <= 100_000
            and all(isinstance(c, str) and len(c) <= 200 for c in classes)):
        raise ExportError(f"{source / 'meta.json'} does not list the class names (a list of 2 or more strings)")
    return classes


def load_run_model(run_dir: Union[str, Path], which: Optional[str] = None) -> RunModel:
    """The model of a run folder from its checkpoint `which` (default: best, else last), built
    from the run's validated config and read with the safe loader."""
    from core.models import build_model

    run_dir = Path(run_dir)
    record = read_run(run_dir)
    if record.config is None:
        raise ExportError(f"run {run_dir.name} is unreadable: {record.reason}")
    kind, folder = pick_checkpoint(run_dir, which)
    state, _, meta = load_checkpoint(folder, with_optimizer=False)
    classes = _classes(meta, folder)
    model, _ = build_model(record.config.backbone, len(classes), "none")
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # RuntimeError naming missing / unexpected / mis-shaped keys
        raise WeightsError(f"{folder} does not fit a {record.config.backbone} with {len(classes)} classes "
                           f"({one_line(exc)})") from None
    model.eval()
    return RunModel(run_dir, record.config, kind, meta, classes, model)


# ---------------------------------------------------------------------------------------------
# safetensors


def weights_metadata(run: RunModel) -> Dict[str, str]:
    """What a user of the weights needs, as strings (JSON for lists) in the file's header."""
    mean, std = run.mean_std()
    return {"transferlab.run_id": run.run_id, "transferlab.checkpoint": run.checkpoint,
            "backbone": run.cfg.backbone, "classes": json.dumps(run.classes),
            "image_size": str(run.cfg.image_size), "normalize": run.cfg.normalize,
            "mean": json.dumps(list(mean)), "std": json.dumps(list(std)),
            "input": "float32 NCHW RGB in [0, 1], resized to image_size, then (x - mean) / std"}


def export_safetensors(run: RunModel, path: Union[str, Path]) -> None:
    save_weights(path, run.model, weights_metadata(run))


# ---------------------------------------------------------------------------------------------
# ONNX


@dataclass(frozen=True)
class OnnxCheck:
    max_abs_diff: float
    tolerance: float
    images: int
    source: str
    """Where the checked images came from ("test images" or why random inputs were used)."""
    seconds: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def check_batch(run: RunModel, count: int = ONNX_CHECK_IMAGES) -> Tuple[np.ndarray, str]:
    """Up to `count` of the run's test images (as its evaluation saw them), preprocessed; random
    inputs when the run's data cannot be read here (then the source says why)."""
    cfg = run.cfg
    try:
        _, test = load_dataset(cfg.dataset, cfg.data_root, cfg.image_size, cfg.seed, download=False,
                               classes=cfg.classes)
        images = test.subset(cfg.limit_test, cfg.seed + 1).images[:count]
        return run.transform(images.shape[1:3])(images, False, None).numpy(), f"{len(images)} test images"
    except SetupError as exc:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((count, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
        return x, f"{count} random inputs (the run's test data: {exc.lines()[0]})"


def _describe_onnx(path: Path, metadata: Dict[str, str]) -> None:
    """Put the same metadata as the safetensors file's (class names, preprocessing, run id) into
    the ONNX file's metadata_props (ONNX Runtime: session.get_modelmeta().custom_metadata_map)."""
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(path))


def onnx_tolerance(expected: np.ndarray, atol: float = ONNX_ATOL, rtol: float = ONNX_RTOL) -> float:
    return atol + rtol * float(np.max(np.abs(expected)))


def export_onnx(run: RunModel, path: Union[str, Path], atol: float = ONNX_ATOL, rtol: float = ONNX_RTOL) -> OnnxCheck:
    """Convert an nn.Graph of the model (one image of the run's image size: input (1, 3, S, S),
    output (1, classes) logits) with oneflow-onnx, run the file with ONNX Runtime on each image of
    the check batch and compare with OneFlow's logits. oneflow-onnx 0.6.2's dynamic batch size
    only renames the input's first dimension: the flatten before the head keeps the traced batch,
    so the file takes batches of 1. Writes `path` only when the check passes; ExportError saying
    by how much otherwise. Must run on the main thread (nn.Graph)."""
    from core.backend import flow
    from core.onnx_compat import oneflow_onnx, onnxruntime

    util, ort = oneflow_onnx(), onnxruntime()
    start = time.time()
    x, source = check_batch(run)
    with flow.no_grad():
        expected = run.model(flow.tensor(x)).numpy()

    class Inference(flow.nn.Graph):
        def __init__(self, model: Any):
            super().__init__()
            self.model = model

        def build(self, batch: Any) -> Any:
            return self.model(batch)

    graph = Inference(run.model)
    graph(flow.tensor(x[:1]))  # compiles the graph for one image
    path = Path(path)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        # oneflow-onnx reads the weights back from a folder it is given: our own, private
        # (mkdtemp: mode 0700), written from the model just loaded safely.
        weights = work / "weights"
        flow.save(graph.state_dict(), str(weights))
        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress lines
            util.export_onnx_model(graph, flow_weight_dir=str(weights), onnx_model_path=str(work / "model.onnx"))
        _describe_onnx(work / "model.onnx", weights_metadata(run))
        session = ort.InferenceSession(str(work / "model.onnx"), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        got = np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
        diff = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
        check = OnnxCheck(diff, onnx_tolerance(expected, atol, rtol), len(x), source, time.time() - start)
        if not check.passed:
            raise ExportError(f"ONNX check failed: ONNX Runtime's outputs differ from OneFlow's by up to "
                              f"{diff:.3g} on {source} (tolerance {check.tolerance:.3g} = {atol:g} + {rtol:g} x "
                              f"the largest |logit|); {path} not written")
        os.replace(work / "model.onnx", path)
        return check
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# predict


@dataclass(frozen=True)
class Prediction:
    path: str
    top: Tuple[Tuple[str, float], ...] = ()
    """(class name, probability), most probable first."""
    error: str = ""


def predict(run: RunModel, paths: Sequence[Union[str, Path]], top_k: int = 5) -> List[Prediction]:
    """Top-k classes of each image with the run's preprocessing: read as RGB (image-folder runs:
    resized by PIL to the image size on reading, as their data was), resized on the device with
    the run's bilinear transform and normalised. A file that is not a readable image gets its
    error, the others their predictions."""
    size = run.cfg.image_size if run.cfg.dataset.startswith("imagefolder:") else None
    k = max(1, min(top_k, len(run.classes)))
    out = []
    for path in paths:
        try:
            if not is_regular_file(path):
                raise DataError(f"cannot read image {path}: not a regular file" if os.path.exists(path)
                                else f"no image {path}")
            logits = run.logits(read_image(Path(path), size)[None])[0].astype(np.float64)
        except DataError as exc:
            out.append(Prediction(str(path), error=exc.lines()[0]))
            continue
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")[:k]
        out.append(Prediction(str(path), tuple((run.classes[i], float(probs[i])) for i in order)))
    return out


def describe_write_error(path: Union[str, Path], exc: BaseException) -> str:
    return f"cannot write {path}: {error_reason(exc)}"
