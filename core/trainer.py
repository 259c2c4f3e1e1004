"""The training loop: the tutorial's SGD + cross-entropy loop, evaluated after every epoch,
emitting typed events (core.events) to listeners and honouring stop/abort between batches."""
from __future__ import annotations

import math
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from core import events as ev
from core.backend import flow, pick_device, seed_everything
from core.config import RunConfig, check
from core.data import ArrayData, BatchTransform, batches, load_dataset
from core.distributed import Dist, NullWriter
from core.models import WeightsError, build_model
from core.store import (RunWriter, StoreWriteError, check_runs_dir, io_error_reason,
                        replace_dir, tidy_run)
from core.strategies import build_param_groups, count_params, prepare as prepare_strategy, set_train_mode
from core.weights import save_checkpoint
from oneflow import nn

FLUSH_STEPS = 32
"""At most this many steps' losses wait on the device before they are fetched in one go."""
FLUSH_SECONDS = 0.5
"""Aim: fetch about this often. OneFlow runs ops asynchronously, so the loop can queue many steps
ahead of the device; fetching after as many steps as the device completes in this time (measured
at each fetch) keeps listeners within ~0.5 s of the device: on a GPU a fetch every few dozen
steps, on a CPU after every step (which takes seconds there, so the sync costs nothing)."""


class RunControl:
    """Stop and abort requests, safe to make from any thread; the trainer checks them between
    batches. stop: save a checkpoint at the current point and end with status "stopped".
    abort: end at once with status "aborted"."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._ending = threading.Event()

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


def prepare(cfg: RunConfig) -> Prepared:
    """Validate, pick the device, load data and model, apply the strategy.

    Raises a SetupError (ConfigError, DeviceError, DataError, WeightsError...) with a message a
    person can act on.
    """
    check(cfg)
    check_runs_dir(cfg.runs_dir)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    train_data, test_data = load_dataset(cfg.dataset, cfg.data_root, cfg.image_size, cfg.seed)
    train_data = train_data.subset(cfg.limit_train, cfg.seed)
    test_data = test_data.subset(cfg.limit_test, cfg.seed + 1)
    notes: List[str] = []
    pretrained = cfg.pretrained
    if cfg.strategy == "scratch" and pretrained != "none":
        notes.append(f"scratch trains from random weights: pretrained={pretrained} is not loaded")
        pretrained = "none"
    model, head = build_model(cfg.backbone, len(train_data.classes), pretrained)
    bad = first_non_finite(model)
    if bad is not None:
        raise WeightsError(f"the weights from {pretrained} hold NaN or infinite values (first in {bad}): "
                           "training cannot start from them; use other weights")
    prepare_strategy(model, cfg.strategy, head)
    model = model.to(device)
    groups = build_param_groups(model, cfg.strategy, head, cfg.lr, cfg.lr_backbone)
    trainable, total = count_params(model)
    return Prepared(cfg, device, train_data, test_data, model, head, groups, trainable, total, tuple(notes))


def first_non_finite(model: nn.Module) -> Optional[str]:
    """The name of the first parameter or buffer holding NaN or inf, or None. One transfer from
    the device, ~50 ms for a ResNet-18 on a CPU."""
    tensors = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]
    finite = flow.stack([flow.isfinite(t).all() for _, t in tensors]).numpy()
    return next((name for (name, _), ok in zip(tensors, finite) if not ok), None)


def train(cfg: RunConfig, listeners: Iterable[ev.Listener] = (), control: Optional[RunControl] = None,
          prepared: Optional[Prepared] = None, dist: Optional[Dist] = None) -> ev.RunFinished:
    """Run one training run to its end and return how it finished.

    Setup problems raise before a run folder exists; once the run has started, every outcome
    (including an unexpected exception) ends in a RunFinished event and a readable run folder.
    `dist`: this process is one rank of several (core.distributed): the model is wrapped in DDP
    and only rank 0 writes the run folder and tells the listeners.
    """
    p = prepared or prepare(cfg)
    if dist is not None:
        p.model = dist.wrap(p.model)
        if not dist.is_main:
            return Trainer(p, NullWriter(), [], control or RunControl(), dist=dist).run()
    writer = RunWriter(p.cfg)
    return Trainer(p, writer, [writer, *listeners], control or RunControl(), dist=dist).run()


@dataclass
class Trainer:
    p: Prepared
    writer: RunWriter
    listeners: List[ev.Listener]
    control: RunControl
    best_acc: Optional[float] = None
    last_acc: Optional[float] = None
    global_step: int = 0
    _pending: List = field(default_factory=list)
    _flush_every: int = 1
    dist: Optional[Dist] = None
    """Set when this process is one rank of several: batches are sharded, sums reduced."""

    def emit(self, event: ev.Event) -> None:
        for listener in self.listeners:
            listener(event)

    def run(self) -> ev.RunFinished:
        p, cfg = self.p, self.p.cfg
        started = time.time()
        status, message, epochs_done = ev.COMPLETED, "", 0
        self.rng = np.random.default_rng(cfg.seed)
        # The shared rng orders the data, so it must stay the same on every rank: each rank's
        # flips (as many draws as its share) come from a generator of its own.
        self.flip_rng = self.rng if self.dist is None else np.random.default_rng([cfg.seed, self.dist.rank])
        self.steps_per_epoch = math.ceil(len(p.train) / cfg.batch_size)
        try:
            self.optimizer = flow.optim.SGD(p.groups, lr=cfg.lr, momentum=cfg.momentum,
                                            weight_decay=cfg.weight_decay)
            self.lrs = {g["name"]: float(g["lr"]) for g in self.optimizer.param_groups}
            self.loss_fn = nn.CrossEntropyLoss().to(p.device)
            self.sum_loss_fn = nn.CrossEntropyLoss(reduction="sum").to(p.device)
            self.transform = BatchTransform(flow, p.device, p.train.images.shape[1:3], cfg.image_size,
                                            cfg.normalize, cfg.hflip, cfg.vflip)
            self.test_transform = BatchTransform(flow, p.device, p.test.images.shape[1:3], cfg.image_size,
                                                 cfg.normalize, False, False)
            self.emit(ev.RunStarted(
                run_id=self.writer.run_id, run_dir=str(self.writer.path), config=cfg.to_dict(),
                device=p.device, trainable_params=p.trainable, total_params=p.total,
                num_classes=len(p.train.classes), train_size=len(p.train), test_size=len(p.test),
                steps_per_epoch=self.steps_per_epoch, notes=p.notes))
            for epoch in range(1, cfg.epochs + 1):
                epoch_start = time.time()
                train_loss, train_acc = self._train_epoch(epoch)
                self._check_weights(f"after epoch {epoch}")
                test_loss, test_acc = self._evaluate(epoch)
                if not math.isfinite(test_loss):
                    raise self._diverged(f"the test loss became {test_loss} after epoch {epoch}")
                epochs_done = epoch
                self.last_acc = test_acc
                self.emit(ev.EpochEnded(epoch, train_loss, train_acc, test_loss, test_acc,
                                        time.time() - epoch_start))
                improved = self.best_acc is None or test_acc > self.best_acc
                self.best_acc = test_acc if improved else self.best_acc
                self._save_checkpoint(epoch, self.steps_per_epoch, best=improved)
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

    def _train_epoch(self, epoch: int) -> Tuple[float, float]:
        p = self.p
        set_train_mode(p.model, p.cfg.strategy, p.head)
        self._epoch_losses: List[float] = []
        self._window_start, self._window_images = time.time(), 0
        correct = []
        for step, idx in enumerate(batches(len(p.train), p.cfg.batch_size, True, self.rng), 1):
            self._check_control(epoch, step - 1)
            n_global, weight = len(idx), 1
            if self.dist is not None:
                idx, weight = self.dist.shard(idx)
            x = self.transform(p.train.images[idx], True, self.flip_rng)
            y = flow.tensor(p.train.labels[idx], device=p.device)
            out = p.model(x)
            if self.dist is None:
                loss = self.loss_fn(out, y)
            else:  # DDP averages the gradients over the ranks: this makes them those of the global mean
                loss = self.sum_loss_fn(out, y) * (weight * self.dist.world / n_global)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.global_step += 1
            shown = loss.detach() if self.dist is None else self.dist.sum(loss.detach() / self.dist.world)
            self._pending.append((step, self.global_step, shown))
            hits = (out.detach().argmax(dim=1) == y).sum()
            correct.append(hits if weight else hits * 0)
            self._window_images += n_global
            if len(self._pending) >= self._flush_every:
                self._flush(epoch)
        self._flush(epoch)
        total = flow.stack(correct).sum()
        train_acc = float((total if self.dist is None else self.dist.sum(total)).item()) / len(p.train)
        return float(np.mean(self._epoch_losses)), train_acc

    def _flush(self, epoch: int) -> None:
        """Fetch the pending losses in one transfer and emit their StepEnded events."""
        if not self._pending:
            return
        values = flow.stack([loss for _, _, loss in self._pending]).numpy().tolist()
        now = time.time()
        elapsed = max(now - self._window_start, 1e-9)
        rate = self._window_images / elapsed
        steps_per_second = len(self._pending) / elapsed
        self._flush_every = int(min(FLUSH_STEPS, max(1, steps_per_second * FLUSH_SECONDS)))
        for (step, global_step, _), value in zip(self._pending, values):
            if not math.isfinite(value):
                self._pending.clear()
                raise self._diverged(f"the loss became {value} at epoch {epoch} step {step}")
            self._epoch_losses.append(value)
            self.emit(ev.StepEnded(epoch, step, global_step, value, dict(self.lrs), rate))
        self._pending.clear()
        self._window_start, self._window_images = now, 0

    def _evaluate(self, epoch: int) -> Tuple[float, float]:
        p = self.p
        p.model.eval()
        loss_sum, correct = [], []
        with flow.no_grad():
            for idx in batches(len(p.test), p.cfg.batch_size, False, self.rng):
                self._check_control(epoch, self.steps_per_epoch)
                weight = 1
                if self.dist is not None:  # each rank its share: every test image counted once
                    idx, weight = self.dist.shard(idx)
                x = self.test_transform(p.test.images[idx], False, self.rng)
                y = flow.tensor(p.test.labels[idx], device=p.device)
                out = p.model(x)
                batch_loss, hits = self.sum_loss_fn(out, y), (out.argmax(dim=1) == y).sum()
                loss_sum.append(batch_loss if weight else batch_loss * 0)
                correct.append(hits if weight else hits * 0)
        n = len(p.test)
        total_loss, total_correct = flow.stack(loss_sum).sum(), flow.stack(correct).sum()
        if self.dist is not None:
            total_loss, total_correct = self.dist.sum(total_loss), self.dist.sum(total_correct)
        return float(total_loss.item()) / n, float(total_correct.item()) / n

    def _check_weights(self, when: str) -> None:
        """Fail the run if a weight or BatchNorm statistic is NaN/inf: a step's loss is computed
        before its update, so a finite last loss does not prove finite weights (and NaN weights
        must never be saved)."""
        bad = first_non_finite(self.p.model)
        if bad is not None:
            raise self._diverged(f"{bad} holds NaN or infinite values {when}")

    def _diverged(self, what: str) -> LossNotFinite:
        """The failure for non-finite numbers, naming the likely cause: a weight decay so strong
        that the decay alone is unstable for this learning rate (lr x wd > 2(1 + momentum) for
        SGD), else the learning rate. (Weights that were not finite when loaded are refused
        before the run starts, by prepare.)"""
        cfg = self.p.cfg
        decay = max(float(g["lr"]) for g in self.optimizer.param_groups) * cfg.weight_decay
        if decay > 2 * (1 + cfg.momentum) and cfg.weight_decay >= 0.1:
            cause = (f"the weight decay is too strong (weight_decay={cfg.weight_decay:g}; usual values "
                     f"are 1e-4 to 5e-4): lower --weight-decay")
        else:
            lrs = f"lr={cfg.lr:g}" + (f", lr_backbone={cfg.lr_backbone:g}" if cfg.strategy == "discriminative" else "")
            cause = f"the learning rate is too high ({lrs}): lower --lr"
        return LossNotFinite(f"{what}: training diverged. Likely cause: {cause}.")

    # -- checkpoints ---------------------------------------------------------------------------

    def _save_checkpoint(self, epoch: int, step: int, best: bool) -> None:
        """_checkpoint, all or nothing: on any failure (disk full, Ctrl-C...) the partial
        .last.tmp-* / .best.tmp-* folders are removed and the previous checkpoints stay as they
        were (tidy_run); an I/O error becomes a StoreWriteError naming the folder and the reason.
        Of several ranks only rank 0 saves (DDP keeps the weights the same on all)."""
        if self.dist is not None and not self.dist.is_main:
            return
        try:
            self._checkpoint(epoch, step, best)
        except BaseException as exc:
            tidy_run(self.writer.path)
            reason = io_error_reason(exc)
            if reason is not None:
                folder = self.writer.checkpoint_dir("last").parent
                raise StoreWriteError(f"could not write a checkpoint to {folder}: {reason}") from None
            raise

    def _checkpoint(self, epoch: int, step: int, best: bool) -> None:
        """Save model + optimizer as checkpoints/last (atomically), and copy it to best."""
        last = self.writer.checkpoint_dir("last")
        tmp = last.with_name(f".last.tmp-{time.time_ns()}")
        tmp.mkdir(parents=True)
        save_checkpoint(tmp, self.p.model, self.optimizer, {
            "epoch": epoch, "step": step, "global_step": self.global_step,
            "test_acc": self.last_acc, "backbone": self.p.cfg.backbone,
            "num_classes": len(self.p.train.classes), "classes": self.p.train.classes})
        replace_dir(tmp, last)
        self.emit(ev.CheckpointSaved(epoch, str(last), "last"))
        if best:
            best_dir = self.writer.checkpoint_dir("best")
            tmp = best_dir.with_name(f".best.tmp-{time.time_ns()}")
            shutil.copytree(last, tmp)
            replace_dir(tmp, best_dir)
            self.emit(ev.CheckpointSaved(epoch, str(best_dir), "best"))
