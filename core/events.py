"""Typed events the trainer emits. They carry plain Python values only, never tensors.

Listeners are callables taking one event. The run store's writer, the CLI's progress bar and the
TUI's bridge are all listeners.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional, Tuple

COMPLETED, STOPPED, ABORTED, FAILED = "completed", "stopped", "aborted", "failed"


@dataclass(frozen=True)
class RunStarted:
    run_id: str
    run_dir: str
    config: Dict[str, Any]
    device: str
    trainable_params: int
    total_params: int
    num_classes: int
    train_size: int
    test_size: int
    steps_per_epoch: int
    notes: Tuple[str, ...] = ()
    """Things the person should know (e.g. pretrained weights skipped by the scratch strategy)."""


@dataclass(frozen=True)
class StepEnded:
    epoch: int
    """1-based epoch number."""
    step: int
    """1-based step within the epoch."""
    global_step: int
    loss: float
    lrs: Dict[str, float]
    """Learning rate of each named param group."""
    images_per_sec: float


@dataclass(frozen=True)
class EpochEnded:
    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    seconds: float


@dataclass(frozen=True)
class CheckpointSaved:
    epoch: int
    path: str
    kind: str
    """"last" or "best"."""


@dataclass(frozen=True)
class RunFinished:
    status: str
    """completed, stopped, aborted or failed."""
    message: str = ""
    best_test_acc: Optional[float] = None
    final_test_acc: Optional[float] = None
    seconds: float = 0.0
    epochs_done: int = 0


Event = Any
Listener = Callable[[Event], None]

EVENT_TYPES = {cls.__name__: cls for cls in (RunStarted, StepEnded, EpochEnded, CheckpointSaved, RunFinished)}


def to_record(event: Event) -> Dict[str, Any]:
    """A JSON-ready dict with the event's type under "event"."""
    return {"event": type(event).__name__, **asdict(event)}


def from_record(record: Dict[str, Any]) -> Event:
    """The inverse of to_record; raises KeyError/TypeError on a record that is not an event."""
    data = dict(record)
    cls = EVENT_TYPES[data.pop("event")]
    if cls is RunStarted:
        data["notes"] = tuple(data.get("notes", ()))
    return cls(**data)


STATUS_COLOURS = {COMPLETED: "green", STOPPED: "yellow", ABORTED: "red", FAILED: "red"}


def epoch_summary(event: EpochEnded, epochs: int) -> str:
    """One line of an epoch's results, as the CLI and the dashboard print it."""
    return (f"epoch {event.epoch}/{epochs}: train loss {event.train_loss:.4f} acc {event.train_acc:.4f} | "
            f"test loss {event.test_loss:.4f} acc {event.test_acc:.4f} ({event.seconds:.1f} s)")


def finish_summary(event: RunFinished) -> str:
    """One line saying how a run ended and its final test accuracy."""
    final = "n/a" if event.final_test_acc is None else f"{event.final_test_acc:.4f}"
    best = "n/a" if event.best_test_acc is None else f"{event.best_test_acc:.4f}"
    return (f"{event.status} after {event.epochs_done} epoch(s) in {event.seconds:.1f} s: final test accuracy "
            f"{final} (best {best})" + (f" - {event.message}" if event.message else ""))
