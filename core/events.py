"""Typed events the trainer emits. They carry plain Python values only, never tensors.

Listeners are callables taking one event. The run store's writer, the CLI's progress bar and the
TUI's bridge are all listeners.
"""
from __future__ import annotations

import json
import math
import reprlib
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

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
    note: str = ""
    """What changed at this epoch's end, when anything did (the backbone unfreezes from the next
    epoch; the run stops early). Absent from records written before it existed."""


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


@dataclass(frozen=True)
class SettingsChanged:
    """Settings changed while the run trained, applied at an epoch boundary (from the dashboard:
    more or fewer epochs, learning rates scaled, the backbone unfrozen): from epoch `epoch` + 1 on
    the run trains with `config` (also written to its config.json, so that a resume keeps it)."""

    epoch: int
    config: Dict[str, Any]
    summary: str
    """What changed, in words ("epochs 3 -> 5; learning rates x0.5")."""


@dataclass(frozen=True)
class RunLost:
    """A followed run stopped training without saying how (its process was killed, its heartbeat
    went stale). Never recorded: made by whoever follows the run (core.runner.Remote), with the
    status the run store gives it ("interrupted", or what a launcher marked it)."""

    status: str
    message: str = ""


@dataclass(frozen=True)
class RunResumed:
    """A run continues in its own folder from its last checkpoint (a new RunStarted follows).
    What the run recorded after that checkpoint (a run killed mid-epoch) is redone: readers
    drop it (as_one_run)."""

    run_id: str
    epoch: int
    """The epoch the run continues in (1-based)."""
    step: int
    """Batches of that epoch already done."""
    global_step: int
    """Steps done before the resume: the next StepEnded has global_step + 1."""
    epochs_done: int
    epochs: int
    """The epochs the run now ends after (extended by --epochs, or as before)."""


@dataclass(frozen=True)
class GpuSample:
    """One NVIDIA GPU in a MachineSampled (a figure NVML would not give is None)."""

    index: int
    util_percent: Optional[float] = None
    mem_used_bytes: Optional[int] = None
    mem_total_bytes: Optional[int] = None
    temp_c: Optional[float] = None


@dataclass(frozen=True)
class MachineSampled:
    """What the machine was doing (core.machine): recorded by the training process about every
    30 s, and sampled once a second by the dashboard's machine panel."""

    t: float
    """When (time.time())."""
    pid: Optional[int]
    """The process sampled (the one that trains the run), or None: machine-wide figures."""
    cpu_percent: Optional[float]
    """Its CPU use in % of all `cpus` logical cores (100: every core busy); None on a first
    sample, which has nothing to measure against."""
    cpus: int
    rss_bytes: Optional[int]
    """Its resident memory (None: machine-wide)."""
    mem_used_bytes: int
    """System memory in use (total - available) and in all."""
    mem_total_bytes: int
    gpus: Tuple[GpuSample, ...] = ()
    """No rows: no NVIDIA GPU, or NVML not available (never an error)."""


@dataclass(frozen=True)
class WrongImage:
    """One of the test images the model gets most confidently wrong (ClassResults.wrong)."""

    file: str
    """Its picture, relative to the run folder ("wrong/epoch-003/0.png"): the image as the dataset
    holds it (before resizing), PNG. Read back only through core.insight.read_wrong_image."""
    index: int
    """Its index in the run's test set."""
    label: int
    """The true class (an index into ClassResults.classes)."""
    predicted: int
    confidence: float
    """The softmax probability the model gave the (wrong) class it predicted."""


@dataclass(frozen=True)
class ClassResults:
    """Per-class results of an epoch's evaluation (emitted just before its EpochEnded): the
    confusion matrix over the test set, rows the true class and columns the predicted one (its
    sum is the test size, its diagonal the correct predictions), and the test images predicted
    wrong with the highest confidence, most confident first."""

    epoch: int
    classes: Tuple[str, ...]
    matrix: List[List[int]]
    wrong: Tuple[WrongImage, ...] = ()


Event = Any
Listener = Callable[[Event], None]

EVENT_TYPES = {cls.__name__: cls for cls in (RunStarted, StepEnded, EpochEnded, CheckpointSaved, RunFinished,
                                                  RunResumed, SettingsChanged,
                                                  MachineSampled, ClassResults)}


def to_record(event: Event) -> Dict[str, Any]:
    """A JSON-ready dict with the event's type under "event". A ClassResults' matrix of more
    than DENSE_CLASSES classes is written as its non-zero cells (see sparse_matrix)."""
    record = {"event": type(event).__name__, **asdict(event)}
    if isinstance(event, ClassResults) and len(event.classes) > DENSE_CLASSES:
        record["matrix"] = sparse_matrix(event.matrix)
    return record


DENSE_CLASSES = 64
"""Up to this many classes a confusion matrix is written whole (a readable 10 x 10 for CIFAR-10);
above, its rows would outgrow a metrics line (1 MB: about 570 classes of zeros) while a test set
fills at most as many cells as it has images."""
MAX_CLASSES = 1000
"""A ClassResults of more classes is not recorded (core.trainer) nor read: read back, its matrix
would take C x C numbers of memory, whatever the file's size."""


def sparse_matrix(matrix: List[List[int]]) -> Dict[str, Any]:
    """A confusion matrix as {"cells": [[true, predicted, count], ...]}, its non-zero cells."""
    return {"cells": [[i, j, n] for i, row in enumerate(matrix) for j, n in enumerate(row) if n]}


def dense_matrix(value: Any, size: int) -> List[List[int]]:
    """The C x C matrix of a record's {"cells": [[true, predicted, count], ...]} (read from a
    file: each cell three ints, the classes within 0..size-1, each cell once)."""
    cells = value.get("cells") if isinstance(value, dict) and set(value) == {"cells"} else None
    if type(cells) is not list or len(cells) > size * size:
        raise ValueError("the confusion matrix's cells must be a list of [true, predicted, count]")
    matrix = [[0] * size for _ in range(size)]
    seen = set()
    for cell in cells:
        if type(cell) is not list or len(cell) != 3 or any(type(n) is not int for n in cell):
            raise ValueError(f"a confusion matrix cell must be [true, predicted, count], got {short(cell)}")
        i, j, n = cell
        if not (0 <= i < size and 0 <= j < size) or (i, j) in seen or not 0 < n <= MAX_INT:
            raise ValueError(f"confusion matrix cell {short(cell)}: classes out of range, repeated, or not a count")
        seen.add((i, j))
        matrix[i][j] = n
    return matrix


def from_line(line: bytes) -> Optional[Event]:
    """The event on one line of metrics.jsonl, or None when the line is not a well-formed event
    (torn by a kill, not UTF-8, not JSON, wrong types...)."""
    try:
        return from_record(json.loads(line.decode("utf-8")))
    except (ValueError, RecursionError):
        return None


def from_record(record: Any) -> Event:
    """The inverse of to_record, for records read back from a file (untrusted).

    Every field is type-checked (ints are ints, floats finite numbers, strings strings...), so an
    event that comes out of here can be plotted and formatted without surprises. Raises
    ValueError on a record that is not a well-formed event."""
    if not isinstance(record, dict):
        raise ValueError(f"an event must be a JSON object, got {short(record)}")
    type_name = record.get("event")
    cls = EVENT_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise ValueError(f"unknown event {short(type_name)}")
    if cls is ClassResults:
        record = _dense_class_results(record)
    values = _values(cls, record)
    if cls in (RunStarted, SettingsChanged):
        _check_config(values["config"])
    if cls is RunFinished and values["status"] not in STATUSES:
        raise ValueError(f"unknown status {short(values['status'])}")
    if cls is MachineSampled:
        _check_machine(values)
    if cls is ClassResults:
        _check_class_results(values)
    return cls(**values)


def _values(cls: type, record: Dict[str, Any]) -> Dict[str, Any]:
    """The fields of dataclass `cls` in `record`, each checked against its type."""
    values = {}
    for name, kind, required in _SCHEMAS[cls]:
        if name not in record:
            if required:
                raise ValueError(f"{cls.__name__} without {name}")
            continue
        values[name] = checked(record[name], kind, name)
    return values


MAX_WRONG = 64
"""A ClassResults record lists at most this many images (the trainer keeps 8)."""


def _dense_class_results(record: Dict[str, Any]) -> Dict[str, Any]:
    """A ClassResults record with its matrix whole: written as cells (to_record) for many
    classes; at most MAX_CLASSES classes either way."""
    classes = record.get("classes")
    if type(classes) is list and len(classes) > MAX_CLASSES:
        raise ValueError(f"ClassResults of {len(classes)} classes (at most {MAX_CLASSES} are kept)")
    if type(classes) is list and isinstance(record.get("matrix"), dict):
        return {**record, "matrix": dense_matrix(record["matrix"], len(classes))}
    return record


def _check_class_results(values: Dict[str, Any]) -> None:
    """A ClassResults' matrix must be C x C for its C class names, of counts (ints >= 0); each
    wrong image's classes must be among them, differ, and its confidence be a probability."""
    size, matrix = len(values["classes"]), values["matrix"]
    if size < 1 or len(matrix) != size or any(len(row) != size for row in matrix):
        raise ValueError(f"the confusion matrix must be {size} x {size} (one row and column per class)")
    if any(n < 0 for row in matrix for n in row):
        raise ValueError("the confusion matrix must hold counts (0 or more)")
    wrong = values.get("wrong", ())
    if len(wrong) > MAX_WRONG:
        raise ValueError(f"more than {MAX_WRONG} wrong images")
    for w in wrong:
        if not (0 <= w.label < size and 0 <= w.predicted < size and w.label != w.predicted
                and 0.0 <= w.confidence <= 1.0 and w.index >= 0):
            raise ValueError(f"wrong image {short(w.file)}: classes, index or confidence out of range")


def as_one_run(events: Iterable[Event]) -> List[Event]:
    """A run's recorded events as one continuous run: at each RunResumed, the steps and epochs
    recorded after the checkpoint it continued from (and done again after it) are dropped, so
    global steps rise and each epoch appears once."""
    out: List[Event] = []
    for event in events:
        if isinstance(event, RunResumed):
            out = [e for e in out if not (isinstance(e, StepEnded) and e.global_step > event.global_step
                                          or isinstance(e, (EpochEnded, ClassResults))
                                          and e.epoch > event.epochs_done)]
        out.append(event)
    return out


MAX_GPUS = 64
"""A MachineSampled with more GPU rows than this is not a real one."""


def _check_machine(values: Dict[str, Any]) -> None:
    """A MachineSampled's figures are counts and shares: none negative, and at least one core."""
    numbers = [values[k] for k in ("cpu_percent", "rss_bytes", "mem_used_bytes", "mem_total_bytes")]
    numbers += [getattr(g, f.name) for g in values.get("gpus", ()) for f in fields(GpuSample)]
    if values["cpus"] < 1 or any(n is not None and n < 0 for n in numbers):
        raise ValueError("MachineSampled with a negative figure or no CPU")


def _gpu_samples(value: Any, name: str) -> Tuple[GpuSample, ...]:
    """The GPU rows of a MachineSampled read from a file: a list of objects with GpuSample's fields."""
    if type(value) not in (list, tuple) or len(value) > MAX_GPUS or not all(type(v) is dict for v in value):
        raise ValueError(f"{name} must be a list of at most {MAX_GPUS} GPU records, got {short(value)}")
    rows = []
    for i, row in enumerate(value):
        if "index" not in row:
            raise ValueError(f"{name}[{i}] without index")
        rows.append(GpuSample(**{f.name: checked(row[f.name], f.type, f"{name}[{i}].{f.name}")
                                 for f in fields(GpuSample) if f.name in row}))
    return tuple(rows)


def _check_config(config: Dict[str, Any]) -> None:
    """A RunStarted's config must be valid settings: replay builds a RunConfig from it."""
    from core.config import from_mapping, validate

    try:
        problems = validate(from_mapping(config))
    except Exception as exc:  # ConfigError, or a value no check foresaw (an int too large for a float)
        problems = getattr(exc, "problems", None) or [f"{type(exc).__name__}: {exc}"]
    if problems:
        raise ValueError(f"config: {problems[0]}")


MAX_INT = 2 ** 53
"""Integers read from files must lie within +-MAX_INT: every one is then exact as a float (plots
convert them), and nothing in a run comes near it."""

STATUSES = (COMPLETED, STOPPED, ABORTED, FAILED)


def short(value: Any) -> str:
    """A short repr of an untrusted value (never huge, never deep)."""
    try:
        return reprlib.repr(value)
    except Exception:
        return f"a {type(value).__name__}"


def checked(value: Any, kind: str, name: str) -> Any:
    """`value` as the type `kind` names ("int", "float", "Optional[float]", "str", ...), or
    ValueError saying what `name` must be. Floats must be finite; ints and floats within
    +-MAX_INT; bools are not numbers."""
    if kind.startswith("Optional["):
        return None if value is None else checked(value, kind[len("Optional["):-1], name)
    ok = True
    if kind == "int":
        ok = type(value) is int and -MAX_INT <= value <= MAX_INT
    elif kind == "float":
        ok = type(value) in (int, float) and -MAX_INT <= value <= MAX_INT  # False for nan, no overflow
        value = float(value) if ok else value
    elif kind == "str":
        ok = type(value) is str
    elif kind == "Dict[str, float]":
        ok = type(value) is dict and all(type(k) is str for k in value)
        value = {k: checked(v, "float", f"{name}[{short(k)}]") for k, v in value.items()} if ok else value
    elif kind == "Dict[str, Any]":
        ok = type(value) is dict and all(type(k) is str for k in value)
    elif kind == "List[List[int]]":
        ok = type(value) is list and all(type(row) is list for row in value)
        value = [[checked(v, "int", f"{name}[{i}][{j}]") for j, v in enumerate(row)]
                 for i, row in enumerate(value)] if ok else value
    elif kind == "Tuple[WrongImage, ...]":
        ok = type(value) is list and all(type(v) is dict for v in value)
        value = tuple(WrongImage(**_values(WrongImage, v)) for v in value) if ok else value
    elif kind == "List[float]":
        ok = type(value) is list
        value = [checked(v, "float", f"{name}[{i}]") for i, v in enumerate(value)] if ok else value
    elif kind == "Tuple[GpuSample, ...]":
        return _gpu_samples(value, name)
    elif kind == "Tuple[str, ...]":
        ok = type(value) in (list, tuple) and all(type(v) is str for v in value)
        value = tuple(value) if ok else value
    else:
        raise TypeError(f"no check for type {kind}")
    if not ok:
        what = {"int": "a whole number", "float": "a finite number", "str": "a string"}.get(kind, kind)
        raise ValueError(f"{name} must be {what}, got {short(value)}")
    return value


def _schema(cls: type) -> Tuple[Tuple[str, str, bool], ...]:
    """(name, type, required) of each field; raises TypeError at import for a type `checked`
    does not know (a new field needs its check)."""
    out = []
    for f in fields(cls):
        try:
            checked(object(), f.type, f.name)
        except ValueError:
            pass
        out.append((f.name, f.type, f.default is MISSING and f.default_factory is MISSING))
    return tuple(out)


_SCHEMAS = {cls: _schema(cls) for cls in (*EVENT_TYPES.values(), WrongImage)}


STATUS_COLOURS = {COMPLETED: "green", STOPPED: "yellow", ABORTED: "red", FAILED: "red"}


def epoch_summary(event: EpochEnded, epochs: int) -> str:
    """One line of an epoch's results, as the CLI and the dashboard print it."""
    return (f"epoch {event.epoch}/{epochs}: train loss {event.train_loss:.4f} acc {event.train_acc:.4f} | "
            f"test loss {event.test_loss:.4f} acc {event.test_acc:.4f} ({event.seconds:.1f} s)"
            + (f"; {event.note}" if event.note else ""))


def finish_summary(event: RunFinished) -> str:
    """One line saying how a run ended and its final test accuracy."""
    final = "n/a" if event.final_test_acc is None else f"{event.final_test_acc:.4f}"
    best = "n/a" if event.best_test_acc is None else f"{event.best_test_acc:.4f}"
    return (f"{event.status} after {event.epochs_done} epoch(s) in {event.seconds:.1f} s: final test accuracy "
            f"{final} (best {best})" + (f" - {event.message}" if event.message else ""))
