"""The training loop: the tutorial's SGD + cross-entropy loop, evaluated after every epoch,
emitting typed events (core.events) to listeners and honouring stop/abort between batches."""
from __future__ import annotations

import dataclasses
import math
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from core import events as ev
from core.backend import flow, gpu_capability, pick_device, seed_everything
from core.config import RunConfig, check, validate
from core.cpu_conv import batched_small_convs
from core.errors import SetupError
from core.data import ArrayData, BatchTransform, batch_count, batches, load_dataset
from core.features import (CachePlan, FeatureCache, cache_cap, feature_size, megabytes, tail_name,
                           variant_count)
from core.live import LiveRun
from core.machine import Recorder as MachineRecorder
from core.distributed import Dist, DistributedError, NullWriter
from core.models import WeightsError, build_model
from core.precision import LossScaler, autocast
from core.precision import resolve as resolve_precision
from core.store import (RunWriter, StoreWriteError, check_runs_dir, io_error_reason, read_run,
                        replace_dir, tidy_run)
from core.schedule import lr_factor
from core.strategies import (build_param_groups, count_params, prepare as prepare_strategy, set_train_mode,
                             split_no_decay, unfreeze_backbone)
from core.weights import load_checkpoint, read_meta, save_checkpoint
from oneflow import nn

FLUSH_STEPS = 32
"""At most this many steps' losses wait on the device before they are fetched in one go."""
FLUSH_SECONDS = 0.5
"""Aim: fetch about this often. OneFlow runs ops asynchronously, so the loop can queue many steps
ahead of the device; fetching after as many steps as the device completes in this time (measured
at each fetch) keeps listeners within ~0.5 s of the device: on a GPU a fetch every few dozen
steps, on a CPU after every step (which takes seconds there, so the sync costs nothing)."""
EVAL_BATCH_FACTOR, EVAL_BATCH_MAX = 4, 1024
"""Evaluation batches hold this many times the training batch, up to EVAL_BATCH_MAX images (never
fewer than the training batch): without gradients, a batch needs no stored activations, so a
larger one fits where the training batch did, and fewer, larger batches run faster."""


def eval_batch_size(batch_size: int) -> int:
    return max(batch_size, min(batch_size * EVAL_BATCH_FACTOR, EVAL_BATCH_MAX))


RESIDENT_DEVICES = ("cuda",)
"""Devices the uint8 training images are copied to once, when they fit (on the CPU they are
in its memory already: batches are taken from the numpy array)."""
RESIDENT_MAX_BYTES = 2 * 1024 ** 3
"""At most this much of the device's memory holds training images (CIFAR-10's 50,000 at 32 px:
150 MB); a larger set is copied batch by batch, as on the CPU."""


def resident_images(images: np.ndarray, device: str) -> Tuple[Any, str]:
    """The training images as one uint8 tensor on `device` when they fit there (batches are then
    indexed on the device: no copy per step), else None; and the log line that says which."""
    if not device.startswith(RESIDENT_DEVICES):
        return None, ""
    size = f"{images.nbytes / 1024 ** 2:,.0f} MB"
    if images.nbytes > RESIDENT_MAX_BYTES:
        return None, (f"training images ({size}) are more than {RESIDENT_MAX_BYTES / 1024 ** 3:g} GB: copied to "
                      f"the {device} batch by batch")
    return flow.tensor(images, device=device), f"training images copied to the {device} once ({size}, uint8)"


WRONG_SHOWN = 8
"""How many of the most confidently wrong test images each evaluation records."""


class ClassTally:
    """Per-class results of an evaluation, gathered on the device batch by batch: the confusion
    matrix (flattened, true class x C + predicted) and the `k` wrong predictions of highest
    softmax probability so far (a running top-k: nothing comes to the host per batch).

    With several processes the matrix is summed over the ranks (by the caller, with the loss);
    the wrong images are those of this rank's share of the test set: rank 0's are recorded
    (gathering every rank's candidates would need a collective of its own for 8 images)."""

    def __init__(self, size: int, k: int, device: str):
        self.size, self.k, self.device = size, k, device
        self.matrix = flow.zeros(size * size, dtype=flow.int64, device=device)
        self.scores = flow.zeros(0, dtype=flow.float32, device=device)
        self.index = flow.zeros(0, dtype=flow.int64, device=device)
        self.predicted = flow.zeros(0, dtype=flow.int64, device=device)

    def add(self, out: Any, predicted: Any, y: Any, idx: np.ndarray, weight: int) -> None:
        """One batch: float32 logits `out`, their argmax `predicted`, labels `y`, test indices
        `idx`; weight 0 (a rank's stand-in image, see Dist.shard) counts nothing."""
        counts = flow.bincount(y * self.size + predicted, minlength=self.size * self.size)
        self.matrix = self.matrix + (counts if weight else counts * 0)
        confidence = flow.softmax(out, dim=1).max(dim=1)[0]
        wrong = (predicted != y) if weight else flow.zeros_like(y).to(flow.bool)
        score = flow.where(wrong, confidence, flow.full_like(confidence, -1.0))  # -1: not wrong
        scores = flow.cat([self.scores, score])
        index = flow.cat([self.index, flow.tensor(idx, dtype=flow.int64, device=self.device)])
        predicted = flow.cat([self.predicted, predicted.to(flow.int64)])
        best = flow.topk(scores, min(self.k, scores.shape[0]))[1]
        self.scores, self.index, self.predicted = scores[best], index[best], predicted[best]

    def top(self) -> Any:
        """The running top-k as one float64 vector (scores, indices, predictions), to join the
        evaluation's single transfer; `wrong` reads it back."""
        return flow.cat([self.scores.to(flow.float64), self.index.to(flow.float64), self.predicted.to(flow.float64)])

    @staticmethod
    def wrong(values: np.ndarray) -> List[Tuple[float, int, int]]:
        """(confidence, test index, predicted class) of the wrong predictions among the top-k,
        most confident first (ties: lower index first)."""
        n = len(values) // 3
        rows = [(float(values[i]), int(values[n + i]), int(values[2 * n + i])) for i in range(n) if values[i] >= 0]
        return sorted(rows, key=lambda row: (-row[0], row[1]))


class RunControl:
    """Stop and abort requests, safe to make from any thread; the trainer checks them between
    batches. stop: save a checkpoint at the current point and end with status "stopped".
    abort: end at once with status "aborted"."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._ending = threading.Event()
        self._lock = threading.Lock()
        self._changes: Dict[str, Any] = {}

    def mark_ending(self) -> None:
        """Called by the trainer once the run's outcome is decided."""
        self._ending.set()

    reason = ""
    """Why the stop was asked for, when not by the person (e.g. "the interface failed: ...")."""

    def request_stop(self, reason: str = "") -> None:
        if reason and not self._stop.is_set():
            self.reason = reason
        self._stop.set()

    def request_abort(self) -> None:
        self._abort.set()

    def request_change(self, epochs: Optional[int] = None, lr_scale: Optional[float] = None,
                       unfreeze: bool = False) -> None:
        """Ask for settings to change at the next epoch boundary (requests add up: the last
        epochs count wins, scales multiply)."""
        with self._lock:
            if epochs is not None:
                self._changes["epochs"] = int(epochs)
            if lr_scale is not None:
                self._changes["lr_scale"] = self._changes.get("lr_scale", 1.0) * float(lr_scale)
            if unfreeze:
                self._changes["unfreeze"] = True

    def take_changes(self) -> Dict[str, Any]:
        """The changes asked for since the last call (the trainer applies them)."""
        with self._lock:
            changes, self._changes = self._changes, {}
        return changes

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def aborting(self) -> bool:
        return self._abort.is_set()

    @property
    def ending(self) -> bool:
        """The run's outcome is decided and being recorded: too late to interrupt it (a
        KeyboardInterrupt now would only keep summary.json from saying how it ended)."""
        return self._ending.is_set()


OUT_OF_MEMORY = "out of memory"
"""How the message of a run that ran out of memory begins (the app and the CLI then offer the
same run with half the batch)."""
_OOM_TEXTS = ("out of memory", "out_of_memory", "can't allocate memory", "allocate failed",
              "cuda_error_out_of_memory")
"""How OneFlow 0.9 (and CUDA) word running out of device or host memory."""


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or any(t in text for t in _OOM_TEXTS)


def halved(cfg: RunConfig) -> Optional[RunConfig]:
    """The same run with half the batch and the learning rates scaled the same way (the linear
    scaling rule: by the ratio of the batches, a third from 3 to 1), or None when the batch is 1 already."""
    if cfg.batch_size < 2:
        return None
    batch = cfg.batch_size // 2
    ratio = batch / cfg.batch_size
    return replace(cfg, batch_size=batch, lr=cfg.lr * ratio, lr_backbone=cfg.lr_backbone * ratio)


def out_of_memory_message(cfg: RunConfig, device: str) -> str:
    where = "GPU memory" if str(device).startswith("cuda") else "memory"
    smaller = halved(cfg)
    advice = (f"try half the batch, with the learning rate scaled the same way (batch size {smaller.batch_size}, "
              f"lr {smaller.lr:g})" if smaller else "the batch is a single image: use a smaller --image-size or backbone")
    return (f"{OUT_OF_MEMORY}: the {where} of {device} does not hold a batch of {cfg.batch_size} images of "
            f"{cfg.image_size} px with {cfg.backbone}; {advice}")


SMALL_LR = 1e-3
"""At or below this (the tutorial's own lr), a divergence is not blamed on the learning rate."""


class LossNotFinite(RuntimeError):
    """The loss, the evaluation loss or the weights stopped being finite numbers."""


class _Interrupted(Exception):
    def __init__(self, status: str):
        self.status = status


@dataclass
class Prepared:
    """Everything a run needs, built before its folder is created (so setup errors leave none)."""

    cfg: RunConfig
    device: str
    train: ArrayData
    test: ArrayData
    model: nn.Module
    head: str
    groups: List[Dict]
    trainable: int
    total: int
    notes: Tuple[str, ...] = ()
    precision: str = "fp32"
    """The precision it trains in (core.precision.resolve: fp32, fp16 or bf16)."""
    resume: Optional["ResumePoint"] = None
    """Set when the run continues a stopped one (prepare_resume): where, and from what state."""


def prepare(cfg: RunConfig, runs_folder: bool = True) -> Prepared:
    """Validate, pick the device, load data and model, apply the strategy.

    Raises a SetupError (ConfigError, DeviceError, DataError, WeightsError...) with a message a
    person can act on. runs_folder=False: the runs folder is not checked (not even with a probe
    file), for work that writes nothing there (core.lrfind).
    """
    check(cfg)
    if runs_folder:
        check_runs_dir(cfg.runs_dir)
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device, gpu_capability() if device == "cuda" else None)
    seed_everything(cfg.seed)
    train_data, test_data = load_dataset(cfg.dataset, cfg.data_root, cfg.image_size, cfg.seed,
                                         classes=cfg.classes)
    train_data = train_data.subset(cfg.limit_train, cfg.seed)
    test_data = test_data.subset(cfg.limit_test, cfg.seed + 1)
    notes: List[str] = []
    pretrained = cfg.pretrained
    if cfg.strategy == "scratch" and pretrained != "none":
        notes.append(f"scratch trains from random weights: pretrained={pretrained} is not loaded")
        pretrained = "none"
    if cfg.unfreeze_epoch and cfg.strategy != "frozen":
        notes.append(f"unfreeze_epoch={cfg.unfreeze_epoch} applies to the frozen strategy only: "
                     f"{cfg.strategy} trains its backbone from the start")
    model, head = build_model(cfg.backbone, len(train_data.classes), pretrained)
    if pretrained not in ("imagenet", "none"):  # a checkpoint's head was trained for its own task
        notes.append(f"backbone loaded from {pretrained}; its head is not: a new {head} for "
                     f"{len(train_data.classes)} classes starts from random weights")
    bad = first_non_finite(model)
    if bad is not None:
        raise WeightsError(f"the weights from {pretrained} hold NaN or infinite values (first in {bad}): "
                           "training cannot start from them; use other weights")
    prepare_strategy(model, cfg.strategy, head)
    model = model.to(device)
    groups = build_param_groups(model, cfg.strategy, head, cfg.lr, cfg.lr_backbone, cfg.no_wd_bn_bias)
    trainable, total = count_params(model)
    if precision != "fp32":
        notes.append(f"mixed precision: {precision} forward passes (OneFlow's autocast; weights stay fp32"
                     + ("; dynamic loss scaling)" if precision == "fp16" else ")"))
    return Prepared(cfg, device, train_data, test_data, model, head, groups, trainable, total, tuple(notes),
                    precision)


class ResumeError(SetupError):
    """A run cannot be continued (still running, no checkpoint, unreadable...)."""


class NothingToResume(ResumeError):
    """The run has nothing left to do with the epochs asked for (a usage error)."""


RESUME_FIELDS = {"epoch": "int", "step": "int", "global_step": "int", "epochs_done": "int",
                 "best_acc": "Optional[float]", "best_epoch": "Optional[int]", "last_acc": "Optional[float]",
                 "rng_epoch": "Dict[str, Any]",
                 "rng": "Dict[str, Any]", "epoch_losses": "List[float]", "epoch_correct": "int",
                 "loss_scaler": "Optional[Dict[str, Any]]"}
"""The "resume" record of a checkpoint's meta.json and its types: where the run continues
(`step` batches of `epoch` done), the numpy generator state at the start of that epoch (its data
order is drawn from it) and at the checkpoint (with that order drawn), and what the epoch has
gathered so far (its losses, its correct predictions) so that its results come out as if it had
never stopped. best_epoch (early stopping's count of epochs since the best) is None in checkpoints
written before it existed. The learning-rate schedule needs nothing: it is a function of the
global step (core.schedule); nor the unfreezing: a function of the epoch (Trainer._unfreeze_by).

The loop draws its randomness (data order, flips) from numpy only. OneFlow's random state is not
saved: in oneflow 0.9.0 it cannot be restored exactly (measured: after flow.set_rng_state of a
state taken by flow.get_rng_state mid-way, flow.rand draws other numbers than the ones that
followed the save; nn.Dropout's own generator behaves the same), so a model with dropout (the
MobileNets' heads) gets other dropout masks after a resume than without one."""


@dataclass
class ResumePoint:
    run_dir: Path
    cfg: RunConfig
    """The run's config.json, with the epochs asked for."""
    state: Dict[str, Any]
    """The checked RESUME_FIELDS record."""
    seconds: float
    """How long the run has trained so far."""

    def marker(self) -> ev.RunResumed:
        """The event that marks, in the run's metrics, where it continues."""
        s = self.state
        return ev.RunResumed(self.run_dir.name, s["epoch"], s["step"], s["global_step"], s["epochs_done"],
                             self.cfg.epochs)


def plan_resume(run_dir: str | Path, epochs: Optional[int] = None) -> ResumePoint:
    """Check that the run in `run_dir` can continue (to `epochs`, default its own) and say from
    where. Reads small JSON files only (cheap enough for a UI thread). Raises ResumeError with a
    line for the person; NothingToResume when the epochs asked for leave nothing to do."""
    path = Path(run_dir)
    record = read_run(path)
    status = record.summary["status"]
    if record.unreadable:
        raise ResumeError(f"run {record.run_id} is unreadable ({record.reason}): it cannot be continued")
    if status == "running":
        raise ResumeError(f"run {record.run_id} is still running (process {record.summary['pid']}): "
                          "it can be continued once it has stopped")
    last = path / "checkpoints" / "last"
    if not last.is_dir():
        raise ResumeError(f"run {record.run_id} has no checkpoints/last to continue from (it ended before "
                          "its first checkpoint): start it again")
    try:
        raw = read_meta(last).get("resume")
        if not isinstance(raw, dict):
            raise ValueError("its meta.json has no resume record (written before runs could be resumed); "
                             f"start a new run with --pretrained {last}")
        state = {name: ev.checked(raw.get(name), kind, name) for name, kind in RESUME_FIELDS.items()}
        for name in ("rng_epoch", "rng"):
            _check_rng_state(state[name], name)
    except (SetupError, ValueError) as exc:
        raise ResumeError(f"the checkpoint of run {record.run_id} cannot be continued: {exc}") from None
    cfg = record.config
    want = cfg.epochs if epochs is None else epochs
    done = state["epochs_done"]
    if status == ev.COMPLETED and want == cfg.epochs and done < want:  # it stopped early
        raise NothingToResume(f"run {record.run_id} is completed (stopped early after {done} epochs): give "
                              f"--epochs N with N > {cfg.epochs} to train it further")
    if want < state["epoch"]:
        if status == ev.COMPLETED and want == cfg.epochs:
            raise NothingToResume(f"run {record.run_id} is completed ({done} epochs): give --epochs N with "
                                  f"N > {done} to train it further")
        raise NothingToResume(f"--epochs must be at least {state['epoch']} to continue run {record.run_id} "
                              f"({done} epoch(s) done), got {want}")
    return ResumePoint(path, dataclasses.replace(cfg, epochs=want, runs_dir=str(path.parent)), state,
                       record.summary["seconds"] or 0.0)


def _check_rng_state(state: Dict[str, Any], name: str) -> None:
    """ValueError unless numpy's generator (the trainer's: PCG64) accepts `state`."""
    try:
        np.random.default_rng().bit_generator.state = state
    except (TypeError, ValueError, KeyError, OverflowError):
        raise ValueError(f"{name} is not a random generator state") from None


def prepare_resume(run_dir: str | Path, epochs: Optional[int] = None) -> Prepared:
    """prepare() for continuing the run in `run_dir`, with its model holding the weights of its
    checkpoints/last (the optimizer state and random state are restored by the Trainer)."""
    point = plan_resume(run_dir, epochs)
    p = prepare(point.cfg)
    weights, optimizer, _ = load_checkpoint(point.run_dir / "checkpoints" / "last")
    if optimizer is None:
        raise ResumeError(f"the checkpoint of run {point.run_dir.name} holds no optimizer state")
    try:
        p.model.load_state_dict(weights)
    except Exception as exc:  # a checkpoint of another model: one line, not OneFlow's page
        raise ResumeError(f"the checkpoint of run {point.run_dir.name} does not fit its model: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    point.state["optimizer"] = optimizer
    p.resume = point
    return p


def first_non_finite(model: nn.Module) -> Optional[str]:
    """The name of the first parameter or buffer holding NaN or inf, or None. One transfer from
    the device, ~50 ms for a ResNet-18 on a CPU."""
    tensors = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]
    finite = flow.stack([flow.isfinite(t).all() for _, t in tensors]).numpy()
    return next((name for (name, _), ok in zip(tensors, finite) if not ok), None)


def training_loss(cfg: RunConfig, reduction: str = "mean") -> nn.Module:
    """The training loss: cross-entropy with cfg.label_smoothing (OneFlow 0.9's own: the target
    puts 1 - s on the true class and s / C on every class). The test loss stays plain
    cross-entropy, so that runs with and without smoothing compare."""
    return nn.CrossEntropyLoss(reduction=reduction, label_smoothing=cfg.label_smoothing)


def train(cfg: RunConfig, listeners: Iterable[ev.Listener] = (), control: Optional[RunControl] = None,
          prepared: Optional[Prepared] = None, dist: Optional[Dist] = None) -> ev.RunFinished:
    """Run one training run to its end and return how it finished.

    Setup problems raise before a run folder exists; once the run has started, every outcome
    (including an unexpected exception) ends in a RunFinished event and a readable run folder.
    `dist`: this process is one rank of several (core.distributed): the model is wrapped in DDP
    and only rank 0 writes the run folder and tells the listeners.
    """
    p = prepared or prepare(cfg)
    control = control or RunControl()
    if dist is not None and p.cfg.strategy == "frozen" and p.cfg.unfreeze_epoch:
        # DDP reduces the gradients of the parameters that train when it wraps the model only
        raise DistributedError("unfreeze_epoch does not work with several processes yet: "
                               "train on one process, or use the discriminative strategy")
    if dist is not None:
        p.model = dist.wrap(p.model)
        if not dist.is_main:
            return Trainer(p, NullWriter(), [], control, dist=dist).run()
    live = LiveRun(control)  # heartbeat.json and control.json: the run seen and steered from outside
    writer = RunWriter(p.cfg, resume=p.resume.run_dir) if p.resume else RunWriter(p.cfg)
    machine = MachineRecorder()  # this process's CPU, memory and GPUs, sampled in a thread, into metrics.jsonl
    return Trainer(p, writer, [writer, live, machine, *listeners], control, dist=dist, machine=machine).run()


@dataclass
class Trainer:
    p: Prepared
    writer: RunWriter
    listeners: List[ev.Listener]
    control: RunControl
    best_acc: Optional[float] = None
    best_epoch: Optional[int] = None
    last_acc: Optional[float] = None
    global_step: int = 0
    _pending: List = field(default_factory=list)
    _flush_every: int = 1
    dist: Optional[Dist] = None
    """Set when this process is one rank of several: batches are sharded, sums reduced."""
    unfrozen: bool = False
    """The frozen strategy's backbone trains now (unfreeze_epoch reached)."""
    features: Optional[FeatureCache] = None
    test_features: Optional[FeatureCache] = None
    """The frozen fast path (core.features): the backbone's features of the training and test
    images, while the backbone is frozen and the cache fits (_feature_caches)."""
    machine: Optional[MachineRecorder] = None
    """Samples the machine in a thread; the sample it holds is emitted at the next _flush."""
    class_tally: Optional[Tuple[int, np.ndarray, List[Tuple[float, int, int]]]] = None
    """The last evaluation's (epoch, confusion matrix, [(confidence, test index, predicted)] of
    its most confidently wrong images): _evaluate sets it, _class_results records it."""

    def emit(self, event: ev.Event) -> None:
        for listener in self.listeners:
            listener(event)

    def run(self) -> ev.RunFinished:
        # On the CPU, OneFlow 0.9's convolutions of small maps are slow one image at a time (core.cpu_conv)
        with batched_small_convs(self.p.model, self.p.device):
            return self._run()

    def _run(self) -> ev.RunFinished:
        p, cfg, resume = self.p, self.p.cfg, self.p.resume
        started = time.time() - (resume.seconds if resume else 0.0)
        status, message, epochs_done = ev.COMPLETED, "", 0
        self.rng = np.random.default_rng(cfg.seed)
        # The shared rng orders the data, so it must stay the same on every rank: each rank's
        # flips (as many draws as its share) come from a generator of its own.
        self.flip_rng = self.rng if self.dist is None else np.random.default_rng([cfg.seed, self.dist.rank])
        self.steps_per_epoch = batch_count(len(p.train), cfg.batch_size)
        first_epoch = 1
        try:
            self.optimizer = flow.optim.SGD(p.groups, lr=cfg.lr, momentum=cfg.momentum,
                                            weight_decay=cfg.weight_decay)
            self.scaler = LossScaler(flow, p.precision == "fp16")
            self.resident, resident_note = resident_images(p.train.images, p.device)
            notes = p.notes + ((resident_note,) if resident_note else ())
            if resume is not None:
                first_epoch, epochs_done = self._restore(resume), resume.state["epochs_done"]
            elif self._unfreeze_by(1):
                notes += (f"the backbone trains from epoch 1 (unfreeze_epoch=1) at lr {cfg.lr_backbone:g}",)
            self.loss_fn = training_loss(cfg).to(p.device)
            self.sum_loss_fn = training_loss(cfg, "sum").to(p.device)
            self.eval_loss_fn = nn.CrossEntropyLoss(reduction="sum").to(p.device)
            self.transform = BatchTransform(flow, p.device, p.train.images.shape[1:3], cfg.image_size,
                                            cfg.normalize, cfg.hflip, cfg.vflip)
            self.test_transform = BatchTransform(flow, p.device, p.test.images.shape[1:3], cfg.image_size,
                                                 cfg.normalize, False, False)
            notes += self._feature_caches()
            self.emit(ev.RunStarted(
                run_id=self.writer.run_id, run_dir=str(self.writer.path), config=cfg.to_dict(),
                device=p.device, trainable_params=p.trainable, total_params=p.total,
                num_classes=len(p.train.classes), train_size=len(p.train), test_size=len(p.test),
                steps_per_epoch=self.steps_per_epoch, notes=notes + self._world_note()))
            epoch = first_epoch
            while epoch <= self.p.cfg.epochs:  # the epochs may change at an epoch boundary (_apply_changes)
                epoch_start = time.time()
                train_loss, train_acc = self._train_epoch(epoch, resume if epoch == first_epoch else None)
                self._check_weights(f"after epoch {epoch}")
                test_loss, test_acc = self._evaluate(epoch)
                if not math.isfinite(test_loss):
                    raise self._diverged(f"the test loss became {test_loss} after epoch {epoch}")
                epochs_done = epoch
                self.last_acc = test_acc
                improved = self.best_acc is None or test_acc > self.best_acc
                if improved:
                    self.best_acc, self.best_epoch = test_acc, epoch
                early = self._early_stop(epoch)
                cached = self._cache_note()  # (before an unfreezing drops the cache)
                note = early or (f"the backbone trains from epoch {epoch + 1} at lr {self.p.cfg.lr_backbone:g}"
                                 if epoch < self.p.cfg.epochs and self._unfreeze_by(epoch + 1) else "")
                note = "; ".join(part for part in (note, cached) if part)  # what changed first
                results = self._class_results(epoch)
                if results is not None:
                    self.emit(results)
                self.emit(ev.EpochEnded(epoch, train_loss, train_acc, test_loss, test_acc,
                                        time.time() - epoch_start, note))
                self._save_checkpoint(epoch, self.steps_per_epoch, best=improved, evaluated=True)
                if early:
                    message = early
                    break
                self._apply_changes(epoch)
                epoch += 1
        except _Interrupted as stop:
            status = stop.status
            message = ((f"stopped: {self.control.reason}" if self.control.reason else "stopped on request")
                       + "; checkpoint saved" if status == ev.STOPPED else "aborted on request")
        except KeyboardInterrupt:
            status, message = ev.ABORTED, "interrupted (Ctrl-C)"
        except (LossNotFinite, StoreWriteError) as exc:
            status, message = ev.FAILED, str(exc)
        except Exception as exc:
            status, message = ev.FAILED, f"{type(exc).__name__}: {exc}"
            if is_out_of_memory(exc):
                message = out_of_memory_message(cfg, p.device)
            self.writer.write_error(traceback.format_exc())
        self.control.mark_ending()
        finished = ev.RunFinished(status, message, self.best_acc, self.last_acc,
                                  time.time() - started, epochs_done)
        for listener in self.listeners:
            try:
                listener(finished)
            except Exception:  # the outcome is already decided; a listener must not hide it
                pass
        self.writer.close()
        return finished

    def _apply_changes(self, epoch: int) -> None:
        """Settings changed while the run trained (RunControl.request_change), applied between
        epoch `epoch` and the next; told as a SettingsChanged event (the run store writes the new
        settings to config.json: a resume keeps them). With several processes, rank 0's requests
        count, on every rank."""
        changes = self.control.take_changes()
        if self.dist is not None:
            changes = self.dist.share_changes(changes)
        cfg, new, parts = self.p.cfg, {}, []

        def take(values: Dict[str, Any], said: str) -> None:
            """Apply `values` unless the settings they make are invalid (config.json must stay
            readable: a resume and the runs list read it): then say why, in validate's words."""
            problems = validate(cfg.replace(**new, **values))
            if problems:
                parts.append(f"{said} refused: {problems[0]}")
            else:
                new.update(values)
                parts.append(said)

        wanted = changes.get("epochs")
        if wanted is not None and wanted != cfg.epochs:
            epochs = max(wanted, epoch)
            take({"epochs": epochs}, f"epochs {cfg.epochs} -> {epochs}"
                 + (" (not fewer than the epochs done)" if epochs != wanted else ""))
        scale = changes.get("lr_scale")
        if scale is not None and scale != 1.0:  # the schedule takes its base rates from the config
            take({"lr": cfg.lr * scale, "lr_backbone": cfg.lr_backbone * scale},
                 f"learning rates x{scale:g} (lr {cfg.lr * scale:g})")
        if changes.get("unfreeze"):
            if epoch >= new.get("epochs", cfg.epochs):
                parts.append("unfreeze: no epoch left to train")
            elif cfg.strategy != "frozen" or self.unfrozen:
                parts.append("unfreeze: the backbone trains already")
            elif self.dist is not None:
                parts.append("unfreeze: not with several processes (DDP keeps the parameters it started with)")
            else:
                new["unfreeze_epoch"] = epoch + 1
                parts.append(f"the backbone trains from epoch {epoch + 1} at lr "
                             f"{new.get('lr_backbone', cfg.lr_backbone):g}")
        if not parts:
            return
        self.p.cfg = cfg.replace(**new)
        if "unfreeze_epoch" in new:
            self._unfreeze_by(epoch + 1)
        self.emit(ev.SettingsChanged(epoch, self.p.cfg.to_dict(), "; ".join(parts)))

    def _early_stop(self, epoch: int) -> str:
        """Early stopping after evaluated `epoch`: why the run ends here, or ""."""
        cfg = self.p.cfg
        patience, best = cfg.early_stopping, self.best_epoch
        if not patience or epoch >= cfg.epochs or best is None or epoch - best < patience:
            return ""
        return (f"stopped early at epoch {epoch}: no better test accuracy for {epoch - best} epoch(s) "
                f"(best {self.best_acc:.4f} at epoch {best}, kept in checkpoints/best)")

    def _unfreeze_by(self, epoch: int) -> bool:
        """Progressive unfreezing: make the frozen backbone train (with its own param group at
        lr_backbone) when `epoch` is at or past unfreeze_epoch; called at each epoch's start and
        before the checkpoint of the epoch before (so its optimizer state has the backbone's
        group already). True when it happened now."""
        cfg = self.p.cfg
        if self.unfrozen or cfg.strategy != "frozen" or not cfg.unfreeze_epoch or epoch < cfg.unfreeze_epoch:
            return False
        return self._unfreeze()

    def _unfreeze(self) -> bool:
        cfg, p = self.p.cfg, self.p
        thawed = unfreeze_backbone(p.model, p.head)
        groups = [{"name": "backbone", "params": [param for _, param in thawed], "lr": cfg.lr_backbone}]
        if cfg.no_wd_bn_bias:
            groups = split_no_decay(groups, {id(param): name for name, param in thawed})
        for group in groups:
            self.optimizer.add_param_group(group)
        self.unfrozen = True
        self.features = self.test_features = None  # the backbone's features change from now on
        return True

    def _feature_caches(self) -> Tuple[str, ...]:
        """Set up the frozen fast path when the backbone is frozen (core.features): the feature
        caches of the training and test sets when they fit; returns the log line that says what
        the run does with its features (none when the backbone trains)."""
        p, cfg = self.p, self.p.cfg
        if cfg.strategy != "frozen" or self.unfrozen:
            return ()
        if self.dist is not None:
            return (f"frozen backbone: its features are recomputed at every step (the feature cache works "
                    f"in a single process; each of the {self.dist.world} processes computes the features of its share)",)
        tail = tail_name(p.model, p.head)
        plan = CachePlan(len(p.train), variant_count(cfg.hflip, cfg.vflip), len(p.test),
                         feature_size(p.model, tail), *cache_cap(p.device))
        if plan.fits:
            self.features = FeatureCache(p.model, tail, self.transform, p.train.images, plan.variants,
                                         plan.floats, p.device)
            self.test_features = FeatureCache(p.model, tail, self.test_transform, p.test.images, 1,
                                              plan.floats, p.device)
        return (plan.note(p.device),)

    def _cache_note(self) -> str:
        """What the feature cache cost in the epoch that ends, when it computed anything."""
        if self.features is None:
            return ""
        new, reused, seconds = self.features.take_counts()
        test_new, _, test_seconds = self.test_features.take_counts()
        if not new + test_new:
            return ""
        held = int(self.features.have.sum() + self.test_features.have.sum())
        total = len(self.features.have) + len(self.test_features.have)
        size = megabytes(self.features.bytes + self.test_features.bytes)
        return (f"feature cache: {new + test_new} image variants computed in {seconds + test_seconds:.1f} s, "
                f"{reused} reused; {held} of {total} held in {size}"
                + (" - complete" if held == total else ""))

    def _schedule_lrs(self, step: int) -> Dict[str, float]:
        """Set every param group's lr for 0-based global step `step`: its base lr (lr_backbone for
        the backbone's, lr for the others) times the schedule's factor (core.schedule, a function
        of the step only: a resumed run continues the curve exactly). Returns the lr per group name."""
        cfg = self.p.cfg
        factor = lr_factor(cfg, step, self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = (cfg.lr_backbone if group["name"] == "backbone" else cfg.lr) * factor
        return {g["name"]: float(g["lr"]) for g in self.optimizer.param_groups}

    def _world_note(self) -> Tuple[str, ...]:
        """With several processes, how the work is shared (told with the run's start)."""
        if self.dist is None:
            return ()
        batch = self.p.cfg.batch_size
        return (f"{self.dist.world} processes (OneFlow's launcher, DDP): batch {batch} in all, "
                f"{batch // self.dist.world} per process",)

    def _restore(self, resume: ResumePoint) -> int:
        """Take up a stopped run where its checkpoint left it (the weights are in the model
        already, see prepare_resume): optimizer state, counters; emit the RunResumed marker (the
        numpy generator is set by _train_epoch). Returns the epoch to continue in."""
        state = resume.state
        saved = state["optimizer"].get("param_groups") if isinstance(state["optimizer"], dict) else None
        if self.p.cfg.strategy == "frozen" and isinstance(saved, list) and any(
                isinstance(g, dict) and isinstance(g.get("_options"), dict)
                and g["_options"].get("name") == "backbone" for g in saved):
            self._unfreeze()  # the checkpoint was written with the backbone training: its groups follow
        self.optimizer.load_state_dict(state["optimizer"])  # (the lrs: set at each step from the config)
        if self.scaler.enabled and state.get("loss_scaler") is not None:
            try:
                self.scaler.load_state_dict(state["loss_scaler"])
            except ValueError:
                pass  # a scale is found again within a few steps: start from the default
        self.global_step = state["global_step"]
        self.best_acc, self.last_acc = state["best_acc"], state["last_acc"]
        self.best_epoch = state["best_epoch"]
        self.emit(resume.marker())
        return state["epoch"]

    # -- training ------------------------------------------------------------------------------

    def _check_control(self, epoch: int, step: int) -> None:
        if self.dist is not None:
            self.dist.agree(self.control)
        if self.control.aborting:
            raise _Interrupted(ev.ABORTED)
        if self.control.stopping:
            self._flush(epoch)
            self._check_weights(f"at epoch {epoch} step {step}")
            self._save_checkpoint(epoch, step, best=False)
            raise _Interrupted(ev.STOPPED)

    def _train_epoch(self, epoch: int, resume: Optional[ResumePoint] = None) -> Tuple[float, float]:
        """One epoch of training; with `resume`, the rest of the epoch its checkpoint stopped in:
        the same data order (drawn again from the generator state at the epoch's start), then the
        generator state of the checkpoint (the flips to come), skipping the batches done."""
        p = self.p
        self._unfreeze_by(epoch)
        set_train_mode(p.model, "finetune" if self.unfrozen else p.cfg.strategy, p.head)
        self._epoch_losses: List[float] = []
        self._correct_before = start = 0
        self._rng_epoch = resume.state["rng_epoch"] if resume else self.rng.bit_generator.state
        order, drawn = self._epoch_order(self._rng_epoch)
        self.rng.bit_generator.state = resume.state["rng"] if resume else drawn
        if resume is not None:
            start = resume.state["step"]
            self._epoch_losses = list(resume.state["epoch_losses"])
            self._correct_before = resume.state["epoch_correct"]
        self._window_start, self._window_images = time.time(), 0
        self._correct = correct = []
        for step, idx in enumerate(order[start:], start + 1):
            self._check_control(epoch, step - 1)
            n_global, weight = len(idx), 1
            if self.dist is not None:
                idx, weight = self.dist.shard(idx)
            y = flow.tensor(p.train.labels[idx], device=p.device)
            with autocast(flow, p.precision, p.device):
                if self.features is not None:  # the same flips drawn, their features looked up
                    out = self.features.outputs(idx, *self.transform.flips(len(idx), self.flip_rng))
                else:
                    out = p.model(self.transform(self._images(idx), True, self.flip_rng))
                if self.dist is None:
                    loss = self.loss_fn(out, y)
                else:  # DDP averages the gradients over the ranks: this makes them those of the global mean
                    loss = self.sum_loss_fn(out, y) * (weight * self.dist.world / n_global)
            self.optimizer.zero_grad()
            self.scaler.backward(loss)
            lrs = self._schedule_lrs(self.global_step)
            self.scaler.step(self.optimizer)
            self.global_step += 1
            shown = loss.detach() if self.dist is None else self.dist.sum(loss.detach() / self.dist.world)
            self._pending.append((step, self.global_step, shown, lrs))
            hits = (out.detach().argmax(dim=1) == y).sum()
            correct.append(hits if weight else hits * 0)
            self._window_images += n_global
            if len(self._pending) >= self._flush_every:
                self._flush(epoch)
        self._flush(epoch)
        if self.dist is None:
            train_acc = self._epoch_correct() / len(p.train)
        else:  # every rank's correct predictions (a collective: all ranks get here together)
            train_acc = float(self.dist.sum(flow.stack(self._correct).sum()).item()) / len(p.train)
        return float(np.mean(self._epoch_losses)), train_acc

    def _images(self, idx: np.ndarray) -> Any:
        """A training batch's uint8 images: indexed on the device when they live there."""
        if self.resident is None:
            return self.p.train.images[idx]
        return self.resident[flow.tensor(idx, device=self.p.device)]

    def _epoch_order(self, state: Dict[str, Any]) -> Tuple[List[np.ndarray], Dict[str, Any]]:
        """The batches of an epoch that starts with the generator in `state`, and the state
        once they are drawn (the flips of its steps come after)."""
        rng = np.random.default_rng()
        rng.bit_generator.state = state
        order = list(batches(len(self.p.train), self.p.cfg.batch_size, True, rng))
        return order, rng.bit_generator.state

    def _epoch_correct(self) -> int:
        """Correct training predictions of the current epoch so far."""
        done = int(flow.stack(self._correct).sum().item()) if self._correct else 0
        return self._correct_before + done

    def _flush(self, epoch: int) -> None:
        """Fetch the pending losses in one transfer and emit their StepEnded events."""
        if not self._pending:
            return
        values = flow.stack([loss for _, _, loss, _ in self._pending]).numpy().tolist()
        now = time.time()
        elapsed = max(now - self._window_start, 1e-9)
        rate = self._window_images / elapsed
        steps_per_second = len(self._pending) / elapsed
        self._flush_every = int(min(FLUSH_STEPS, max(1, steps_per_second * FLUSH_SECONDS)))
        for (step, global_step, _, lrs), value in zip(self._pending, values):
            if not math.isfinite(value):
                self._pending.clear()
                raise self._diverged(f"the loss became {value} at epoch {epoch} step {step}")
            self._epoch_losses.append(value)
            self.emit(ev.StepEnded(epoch, step, global_step, value, lrs, rate))
        self._pending.clear()
        self._window_start, self._window_images = now, 0
        sample = self.machine.take() if self.machine is not None else None
        if sample is not None:
            self.emit(sample)

    def _evaluate(self, epoch: int) -> Tuple[float, float]:
        """Test loss and accuracy, in batches of eval_batch_size; also the epoch's per-class
        results (self.class_tally, see _class_results). The sums, the confusion matrix and the
        running top-K of confidently wrong images stay on the device and come to the host in one
        transfer at the end."""
        p = self.p
        p.model.eval()
        total_loss = total_correct = None
        size = len(p.train.classes)
        # per-class results up to ev.MAX_CLASSES classes (the matrix has size x size counts)
        tally = ClassTally(size, WRONG_SHOWN, p.device) if size <= ev.MAX_CLASSES else None
        with flow.no_grad():
            for idx in batches(len(p.test), eval_batch_size(p.cfg.batch_size), False, self.rng):
                self._check_control(epoch, self.steps_per_epoch)
                weight = 1
                if self.dist is not None:  # each rank its share: every test image counted once
                    idx, weight = self.dist.shard(idx)
                y = flow.tensor(p.test.labels[idx], device=p.device)
                if self.test_features is not None:
                    out = self.test_features.outputs(idx)
                else:
                    with autocast(flow, p.precision, p.device):
                        out = p.model(self.test_transform(p.test.images[idx], False, self.rng))
                out = out.to(flow.float32)
                predicted = out.argmax(dim=1)
                batch_loss, hits = self.eval_loss_fn(out, y), (predicted == y).sum()
                if not weight:
                    batch_loss, hits = batch_loss * 0, hits * 0
                total_loss = batch_loss if total_loss is None else total_loss + batch_loss
                total_correct = hits if total_correct is None else total_correct + hits
                if tally is not None:
                    tally.add(out, predicted, y, idx, weight)
        totals = flow.stack([total_loss.to(flow.float64), total_correct.to(flow.float64)])
        if tally is not None:
            totals = flow.cat([totals, tally.matrix.to(flow.float64)])
        if self.dist is not None:
            totals = self.dist.sum(totals)
        values = (totals if tally is None else flow.cat([totals, tally.top()])).numpy()  # the one transfer
        loss, correct = values[:2].tolist()
        if tally is not None:
            self.class_tally = (epoch, values[2:2 + size * size].round().astype(np.int64).reshape(size, size),
                                tally.wrong(values[2 + size * size:]))
        return loss / len(p.test), correct / len(p.test)

    def _class_results(self, epoch: int) -> Optional[ev.ClassResults]:
        """The ClassResults of `epoch`'s evaluation, its wrong images saved as PNG files in the
        run folder at the data's own resolution (rank 0 only; None on the other ranks)."""
        if self.class_tally is None or self.class_tally[0] != epoch:
            return None
        if self.dist is not None and not self.dist.is_main:
            return None
        _, matrix, wrong = self.class_tally
        test = self.p.test
        files = self.writer.save_wrong_images(epoch, [test.images[i] for _, i, _ in wrong])
        images = tuple(ev.WrongImage(name, int(i), int(test.labels[i]), int(pred), float(conf))
                       for name, (conf, i, pred) in zip(files, wrong))
        return ev.ClassResults(epoch, tuple(self.p.train.classes), matrix.tolist(), images)

    def _check_weights(self, when: str) -> None:
        """Fail the run if a weight or BatchNorm statistic is NaN/inf: a step's loss is computed
        before its update, so a finite last loss does not prove finite weights (and NaN weights
        must never be saved)."""
        bad = first_non_finite(self.p.model)
        if bad is not None and bad.endswith("running_var") and self.p.cfg.batch_size == 1:
            raise LossNotFinite(f"{bad} holds NaN values {when}: BatchNorm cannot estimate a variance from a "
                                f"batch of one image at {self.p.cfg.image_size} px; use --batch-size 2 or more "
                                "(or larger images)")
        if bad is not None:
            raise self._diverged(f"{bad} holds NaN or infinite values {when}")

    def _diverged(self, what: str) -> LossNotFinite:
        """The failure for non-finite numbers, naming the likely cause: a weight decay so strong
        that the decay alone is unstable for this learning rate (lr x wd > 2(1 + momentum) for
        SGD), else the learning rate. (Weights that were not finite when loaded are refused
        before the run starts, by prepare.)"""
        cfg = self.p.cfg
        top_lr = max(float(g["lr"]) for g in self.optimizer.param_groups)
        lrs = f"lr={cfg.lr:g}" + (f", lr_backbone={cfg.lr_backbone:g}" if cfg.strategy == "discriminative" else "")
        if top_lr * cfg.weight_decay > 2 * (1 + cfg.momentum) and cfg.weight_decay >= 0.1:
            cause = (f"the weight decay is too strong (weight_decay={cfg.weight_decay:g}; usual values "
                     f"are 1e-4 to 5e-4): lower --weight-decay")
        elif top_lr <= SMALL_LR:
            cause = (f"not the learning rate alone ({lrs} is small): look at the data (images of one "
                     f"constant value?) and the initial weights (BatchNorm statistics), or try --pretrained none")
        else:
            cause = f"the learning rate is too high ({lrs}): lower --lr"
        return LossNotFinite(f"{what}: training diverged. Likely cause: {cause}.")

    # -- checkpoints ---------------------------------------------------------------------------

    def _save_checkpoint(self, epoch: int, step: int, best: bool, evaluated: bool = False) -> None:
        """_checkpoint, all or nothing: on any failure (disk full, Ctrl-C...) the partial
        .last.tmp-* / .best.tmp-* folders are removed and the previous checkpoints stay as they
        were (tidy_run); an I/O error becomes a StoreWriteError naming the folder and the reason.
        Of several ranks only rank 0 saves (DDP keeps the weights the same on all)."""
        if self.dist is not None and not self.dist.is_main:
            return
        try:
            self._checkpoint(epoch, step, best, evaluated)
        except BaseException as exc:
            tidy_run(self.writer.path)
            reason = io_error_reason(exc)
            if reason is not None:
                folder = self.writer.checkpoint_dir("last").parent
                raise StoreWriteError(f"could not write a checkpoint to {folder}: {reason}") from None
            raise

    def _checkpoint(self, epoch: int, step: int, best: bool, evaluated: bool) -> None:
        """Save model + optimizer as checkpoints/last (atomically), and copy it to best."""
        last = self.writer.checkpoint_dir("last")
        tmp = last.with_name(f".last.tmp-{time.time_ns()}")
        tmp.mkdir(parents=True)
        save_checkpoint(tmp, self.p.model, self.optimizer, {
            "epoch": epoch, "step": step, "global_step": self.global_step,
            "test_acc": self.last_acc, "backbone": self.p.cfg.backbone,
            "num_classes": len(self.p.train.classes), "classes": self.p.train.classes,
            "resume": self._resume_record(epoch, step, evaluated)})
        replace_dir(tmp, last)
        self.emit(ev.CheckpointSaved(epoch, str(last), "last"))
        if best:
            best_dir = self.writer.checkpoint_dir("best")
            tmp = best_dir.with_name(f".best.tmp-{time.time_ns()}")
            shutil.copytree(last, tmp)
            replace_dir(tmp, best_dir)
            self.emit(ev.CheckpointSaved(epoch, str(best_dir), "best"))

    def _resume_record(self, epoch: int, step: int, evaluated: bool) -> Dict[str, Any]:
        """meta.json's "resume" record (RESUME_FIELDS) for a checkpoint after `step` batches of
        `epoch`; after an evaluated epoch, the run continues at the start of the next one."""
        rng = self.rng.bit_generator.state
        if evaluated:  # the next epoch starts here; "rng" is, as always, with its order drawn
            position = {"epoch": epoch + 1, "step": 0, "epochs_done": epoch, "rng_epoch": rng,
                        "rng": self._epoch_order(rng)[1], "epoch_losses": [], "epoch_correct": 0}
        else:
            position = {"epoch": epoch, "step": step, "epochs_done": epoch - 1, "rng_epoch": self._rng_epoch,
                        "rng": rng, "epoch_losses": list(self._epoch_losses),
                        "epoch_correct": self._epoch_correct()}
        return {**position, "global_step": self.global_step, "best_acc": self.best_acc,
                "best_epoch": self.best_epoch, "last_acc": self.last_acc,
                "loss_scaler": self.scaler.state_dict() if self.scaler.enabled else None}
