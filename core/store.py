"""The run store: one folder per run, written atomically, readable while a run goes on.

runs/<run id>/
  config.json     the resolved RunConfig
  metrics.jsonl   one event per line (core.events.to_record), appended as it happens
  summary.json    status, best and final test accuracy, duration, parameter counts
  checkpoints/last, checkpoints/best   model.safetensors, optimizer.safetensors, meta.json (core.weights)
  error.txt       the traceback, when the run failed on an unexpected exception
  heartbeat.json, control.json   while the run trains: who trains it, and requests to it (core.live)

Faults: every byte the store writes goes through `write_bytes` (one place to inject a full disk in
tests). A write that fails ends the run "failed" with a message naming the file and the reason;
what a killed run leaves half-done is repaired or removed the next time the run is read
(`tidy_run`). Files read back are untrusted: `read_run` type-checks them and marks a run it
cannot make sense of "unreadable" with the reason, instead of raising.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from core import events as ev
from core import live
from core.config import RunConfig, from_mapping, validate
from core.errors import SetupError
from core.files import is_regular_file, lines

MIN_FREE_BYTES = 50 * 2 ** 20
"""A run does not start in a runs folder with less free space than this (a ResNet-18 checkpoint
alone takes ~90 MB; this floor only catches a folder that is already full)."""

SUMMARY_EVERY = 30.0
"""While steps go on, summary.json (its duration) is rewritten at least this often (seconds)."""


WRONG_DIR = "wrong"
"""The run folder's subfolder of the most confidently wrong test images, one folder per epoch."""
KEEP_WRONG_EPOCHS = 5
"""Only the latest this many epochs keep their wrong images (a long run on large images would
otherwise gather thousands of files); earlier ClassResults keep their matrix and list."""


class RunsDirError(SetupError):
    """The runs folder cannot receive a run (missing and not creatable, a file, read-only, full)."""


class StoreWriteError(RuntimeError):
    """Writing a run's files failed (disk full, read-only...); the message names file and reason."""


def error_reason(exc: BaseException) -> str:
    """The readable part of an OSError ("No space left on device"); see io_error_reason."""
    return io_error_reason(exc) or str(exc) or type(exc).__name__


def io_error_reason(exc: BaseException) -> Optional[str]:
    """Why a write failed, when `exc` is an I/O error: an OSError's strerror; for shutil.copytree's
    shutil.Error (which gathers its errors), the first one's; for a library in Rust
    (safetensors: "I/O error: No space left on device (os error 28)"), the OS error it names.
    None when `exc` is not an I/O error."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        first = str(exc.args[0][0][-1])  # "[Errno 28] No space left on device: 'path'"
        match = re.match(r"\[Errno \d+\] ([^:]+)", first)
        return match.group(1) if match else first
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    match = re.search(r"\(os error (\d+)\)", str(exc))
    return os.strerror(int(match.group(1))) if match else None


def write_bytes(fd: int, data: bytes) -> None:
    """Write all of `data` to the open file `fd`. Every byte the run store puts on disk goes
    through here, so that a test can make the disk "full" (raise OSError ENOSPC) at any write."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def strict_json(data: Any, **kwargs: Any) -> str:
    """JSON with every non-finite float written as null: bare NaN/Infinity are not JSON, and
    other readers (browsers, jq, pandas) reject them."""
    return json.dumps(_finite(data), allow_nan=False, **kwargs)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """atomic_write_text for bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        try:
            write_bytes(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, strict_json(data, indent=2) + "\n")


def overwrite_text(path: Path, text: str) -> None:
    """Rewrite an existing file in place, over its own bytes (padded with spaces, which JSON
    ignores, up to its old length): the last resort when a full disk leaves no room for a
    temporary copy. Not atomic, but it needs no new space, and a write refused outright leaves
    the old content as it was (no truncation first)."""
    data = text.encode("utf-8")
    data += b" " * max(0, path.stat().st_size - len(data))
    fd = os.open(path, os.O_WRONLY)
    try:
        write_bytes(fd, data)
    finally:
        os.close(fd)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move folder `tmp` to `final`, replacing an older `final` without a moment where neither
    a complete old nor a complete new one exists under a known name (`final`, or `final`.old:
    see tidy_run)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def check_runs_dir(runs_dir: str | Path, min_free: Optional[int] = None) -> Path:
    """Raise RunsDirError unless a run can be written under `runs_dir`: it is a folder or can be
    created as one, a file can be written in it, and it has at least `min_free` bytes free
    (default MIN_FREE_BYTES). Nothing is created: a missing folder is checked through its
    nearest existing parent. Called before data and model load, so a bad folder costs nothing."""
    text = str(runs_dir)
    shown = text if len(text) <= 120 else text[:117] + "..."
    if "\0" in text:
        raise RunsDirError(f"runs folder {shown!r} holds a NUL byte: choose another folder name")
    try:
        return _check_runs_dir(Path(text).expanduser(), MIN_FREE_BYTES if min_free is None else min_free)
    except (OSError, RuntimeError) as exc:  # a name too long, ~user without a home...
        if isinstance(exc, RunsDirError):
            raise
        raise RunsDirError(f"runs folder {shown}: {error_reason(exc)}") from None


def _check_runs_dir(path: Path, min_free: int) -> Path:
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            raise RunsDirError(f"runs folder {path}: {existing} is a broken link")
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file, not a folder" if existing == path else f"cannot be created: {existing} is a file"
        raise RunsDirError(f"runs folder {path} {what}: choose another --runs-dir")
    try:
        fd, probe = tempfile.mkstemp(prefix=".transferlab-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        target = path if existing == path else f"{path} (in {existing})"
        raise RunsDirError(f"cannot write in the runs folder {target}: {error_reason(exc)}") from None
    free = shutil.disk_usage(existing).free
    if free < min_free:
        raise RunsDirError(f"the runs folder {path} has only {free / 2 ** 20:.1f} MB free (a run needs "
                           f"at least {min_free / 2 ** 20:.0f} MB for its checkpoints): free some space "
                           "or choose another --runs-dir")
    return path


def run_stem(cfg: RunConfig) -> str:
    """<date>-<time>-<strategy>-<dataset>: the id of a run started now."""
    return time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.strategy}-{cfg.dataset.split(':')[0]}"


def reserve_run_dir(cfg: RunConfig, runs_dir: Path) -> Path:
    """Create and return a new run folder. Its id is the run's stem, or stem-2, stem-3... when
    taken: `mkdir` (never exist_ok) is what reserves an id, so runs started in the same second
    by several processes each get their own folder."""
    stem = run_stem(cfg)
    for n in range(1, 10_000):
        path = runs_dir / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{runs_dir / stem}: 10000 runs with this id")


class RunWriter:
    """A listener that records a run's events into its folder.

    A failed write raises StoreWriteError (the trainer then ends the run "failed"); on the last
    event (RunFinished) it still tries every way to leave summary.json saying how the run ended."""

    def __init__(self, cfg: RunConfig, runs_dir: Optional[str | Path] = None, resume: Optional[Path] = None):
        """A new run folder under `runs_dir` (default cfg.runs_dir); or, with `resume`, that
        existing run folder, continued: its config.json is rewritten (the epochs may have been
        extended), its summary says "running" again and keeps its results, duration and start
        time, and metrics.jsonl is appended to."""
        if resume is not None:
            self._reopen(Path(resume), cfg)
        else:
            self._create(cfg, Path(runs_dir or cfg.runs_dir))
        self._metrics: Optional[int] = None
        self._torn = False  # a metrics line was cut short by a failed write
        self._summary_at = time.monotonic()
        self._speed = (0.0, 0)
        try:
            atomic_write_json(self.path / "config.json", cfg.to_dict())
            atomic_write_json(self.path / "summary.json", self.summary)
            self._metrics = os.open(self.path / "metrics.jsonl",
                                    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if resume is None:
                shutil.rmtree(self.path, ignore_errors=True)  # nothing of the run was written yet
            raise RunsDirError(f"cannot write the run folder {self.path}: {error_reason(exc)}") from None

    def _create(self, cfg: RunConfig, runs_dir: Path) -> None:
        self.runs_dir = runs_dir
        try:
            self.runs_dir = self.runs_dir.expanduser()
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            self.path = reserve_run_dir(cfg, self.runs_dir)
        except (OSError, ValueError, RuntimeError) as exc:
            raise RunsDirError(f"cannot create a run folder in {self.runs_dir}: {error_reason(exc)}") from None
        self.run_id = self.path.name
        self.started = time.time()
        self.summary: Dict[str, Any] = {
            "run_id": self.run_id, "status": "running", "started": self.started, "pid": os.getpid(),
            "strategy": cfg.strategy, "dataset": cfg.dataset, "backbone": cfg.backbone,
            "epochs": cfg.epochs, "lr": cfg.lr, "lr_backbone": cfg.lr_backbone,
            "best_test_acc": None, "final_test_acc": None, "epochs_done": 0, "seconds": 0.0,
        }

    def _reopen(self, path: Path, cfg: RunConfig) -> None:
        self.path, self.runs_dir, self.run_id = path, path.parent, path.name
        try:
            self.summary = _read_summary(path)
        except ValueError as exc:
            raise RunsDirError(f"cannot continue the run {path}: {exc}") from None
        # the duration counts the time trained before, not the time the run lay stopped
        self.started = time.time() - (self.summary["seconds"] or 0.0)
        self.summary.update(status="running", pid=os.getpid(), epochs=cfg.epochs, message=None)

    def checkpoint_dir(self, kind: str) -> Path:
        return self.path / "checkpoints" / kind

    def save_wrong_images(self, epoch: int, images: List[Any]) -> List[str]:
        """Save an epoch's most confidently wrong test images (uint8 H x W x 3 arrays) as
        wrong/epoch-NNN/<i>.png and return their names relative to the run folder (what the
        ClassResults event lists). Only the latest KEEP_WRONG_EPOCHS epochs' folders are kept
        (an epoch redone after a resume is written again)."""
        import io

        from PIL import Image

        folder = self.path / WRONG_DIR / f"epoch-{epoch:03d}"
        names = []
        try:
            for i, image in enumerate(images):
                out = io.BytesIO()
                Image.fromarray(image).save(out, format="PNG")
                atomic_write_bytes(folder / f"{i}.png", out.getvalue())
                names.append(f"{WRONG_DIR}/{folder.name}/{i}.png")
            for old in (self.path / WRONG_DIR).iterdir() if _real_dir(self.path / WRONG_DIR) else ():
                number = old.name[len("epoch-"):]
                if old.name.startswith("epoch-") and number.isdigit() and not (
                        epoch - KEEP_WRONG_EPOCHS < int(number) <= epoch) and _real_dir(old):
                    shutil.rmtree(old)
        except OSError as exc:
            raise StoreWriteError(f"could not write the wrong images in {folder}: {error_reason(exc)}") from None
        return names

    def __call__(self, event: ev.Event) -> None:
        if self._metrics is None:
            return
        if isinstance(event, ev.RunFinished):
            self._finish(event)
            return
        self._append(event)
        if isinstance(event, ev.RunStarted):
            self.summary.update(device=event.device, trainable_params=event.trainable_params,
                                total_params=event.total_params)
        elif isinstance(event, ev.SettingsChanged):
            self._settings_changed(event)
        elif isinstance(event, ev.EpochEnded):
            best = self.summary["best_test_acc"]
            self.summary.update(final_test_acc=event.test_acc, epochs_done=event.epoch,
                                best_test_acc=event.test_acc if best is None else max(best, event.test_acc))
        elif isinstance(event, ev.StepEnded):
            self._speed = (self._speed[0] + event.images_per_sec, self._speed[1] + 1)
            self.summary["images_per_sec"] = self._speed[0] / self._speed[1]  # this life's mean
            if time.monotonic() - self._summary_at < SUMMARY_EVERY:
                return
        else:
            return
        self.summary["seconds"] = time.time() - self.started
        self._write_summary()

    def _settings_changed(self, event: ev.SettingsChanged) -> None:
        """The run's settings from now on: config.json (what a resume reads), the summary, and a
        line in settings-history.jsonl (when, after which epoch, what changed, the settings)."""
        line = strict_json({"time": time.time(), "after_epoch": event.epoch, "change": event.summary,
                            "config": event.config}) + "\n"
        try:
            fd = os.open(self.path / "settings-history.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                write_bytes(fd, line.encode("utf-8"))
            finally:
                os.close(fd)
            atomic_write_json(self.path / "config.json", event.config)
        except OSError as exc:
            raise StoreWriteError(f"could not record the new settings in {self.path}: {error_reason(exc)}") from None
        self.summary.update(epochs=event.config["epochs"], lr=event.config["lr"], lr_backbone=event.config["lr_backbone"])

    def _append(self, event: ev.Event) -> None:
        """One line of metrics.jsonl, in one write (a reader never sees half a line unless the
        disk fills up mid-line; the next line then starts on a fresh line)."""
        line = ("\n" if self._torn else "") + strict_json(ev.to_record(event)) + "\n"
        try:
            write_bytes(self._metrics, line.encode("utf-8"))
            self._torn = False
        except OSError as exc:
            self._torn = True
            raise StoreWriteError(f"could not write {self.path / 'metrics.jsonl'}: {error_reason(exc)}") from None

    def _write_summary(self) -> None:
        self._summary_at = time.monotonic()
        try:
            atomic_write_json(self.path / "summary.json", self.summary)
        except OSError as exc:
            raise StoreWriteError(f"could not write {self.path / 'summary.json'}: {error_reason(exc)}") from None

    def _finish(self, event: ev.RunFinished) -> None:
        """Record how the run ended: summary.json first (what every listing reads; rewritten in
        place if the disk has no room for a copy), then the metrics line; close the file."""
        self.summary.update(status=event.status, message=event.message, seconds=event.seconds)
        errors = []
        try:
            self._write_summary()
        except StoreWriteError as exc:
            try:
                overwrite_text(self.path / "summary.json", strict_json(self.summary, indent=2) + "\n")
            except OSError:
                errors.append(str(exc))
        try:
            self._append(event)
        except StoreWriteError as exc:
            errors.append(str(exc))
        self.close()
        if errors:
            raise StoreWriteError("; ".join(errors))

    def write_error(self, text: str) -> None:
        """error.txt with a traceback; best effort (the run's outcome is recorded either way)."""
        try:
            atomic_write_text(self.path / "error.txt", text)
        except OSError:
            pass

    def close(self) -> None:
        if self._metrics is not None:
            os.close(self._metrics)
            self._metrics = None


def mark_failed(run_dir: str | Path, message: str, details: str = "") -> bool:
    """Record in a run's folder that it failed, when its writer could not: an error escaped the
    trainer. Only a summary that still says "running" is changed; `details` (a traceback) goes
    to error.txt. True when the summary was updated; never raises (the caller has an error to
    report already)."""
    path = Path(run_dir)
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        if not isinstance(summary, dict) or summary.get("status") != "running":
            return False
        started = summary.get("started")
        summary.update(status=ev.FAILED, message=message)
        if isinstance(started, (int, float)):
            summary["seconds"] = max(0.0, time.time() - started)
        if details:
            atomic_write_text(path / "error.txt", details)
        atomic_write_json(path / "summary.json", summary)
        return True
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# Reading runs back

UNREADABLE = "unreadable"
"""The status of a run whose files cannot be made sense of; RunRecord.problems says why."""

SUMMARY_FIELDS = {
    "run_id": "str", "status": "str", "started": "float", "pid": "int", "strategy": "str",
    "dataset": "str", "backbone": "str", "epochs": "int", "lr": "float", "lr_backbone": "float",
    "best_test_acc": "float", "final_test_acc": "float", "epochs_done": "int", "seconds": "float",
    "device": "str", "trainable_params": "int", "total_params": "int", "message": "str",
    "images_per_sec": "float",
}
"""The keys of summary.json and their types (core.events.checked); each may also be null."""

RUN_STATUSES = ("running", *ev.STATUSES)

MAX_SMALL_FILE = 1 << 20
"""config.json and summary.json larger than this are not read (they are under 1 KB)."""


@dataclass
class RunRecord:
    """A run folder as read back. When `problems` is not empty the run is unreadable: its
    summary's status is "unreadable" and `config` is None if config.json was the problem (a
    broken config is never shown as default settings)."""

    path: Path
    config: Optional[RunConfig]
    summary: Dict[str, Any]
    """Every key of SUMMARY_FIELDS, each of its type or None."""
    problems: List[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def unreadable(self) -> bool:
        return bool(self.problems)

    @property
    def reason(self) -> str:
        """Why the run is unreadable (empty when it is not)."""
        return "; ".join(self.problems)

    def events(self) -> List[ev.Event]:
        return read_events(self.path)


def read_events(run_dir: str | Path) -> List[ev.Event]:
    """Every well-formed event recorded in a run's metrics.jsonl. A line that is not a valid
    event (torn by a kill, bytes that are not UTF-8, wrong types...) is skipped, so every
    event returned can be plotted and formatted."""
    out: List[ev.Event] = []
    path = Path(run_dir) / "metrics.jsonl"
    if not is_regular_file(path):
        return out
    try:
        with open(path, "rb") as f:
            out.extend(e for e in map(ev.from_line, lines(f)) if e is not None)
    except OSError:
        pass
    return out


def _load_json(path: Path) -> Any:
    """The JSON in a small regular file; ValueError saying what is wrong otherwise."""
    if not path.exists():
        raise ValueError(f"{path.name} is missing")
    if not is_regular_file(path):
        raise ValueError(f"{path.name} is not a regular file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SMALL_FILE + 1)
    except OSError as exc:
        raise ValueError(f"{path.name} cannot be read: {error_reason(exc)}") from None
    if len(data) > MAX_SMALL_FILE:
        raise ValueError(f"{path.name} is larger than {MAX_SMALL_FILE // 1024} KB")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path.name} is not UTF-8 text") from None
    except RecursionError:
        raise ValueError(f"{path.name} is nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"{path.name} is not valid JSON: {str(exc)[:80]}") from None


def _read_config(path: Path) -> RunConfig:
    data = _load_json(path / "config.json")
    if not isinstance(data, dict):
        raise ValueError(f"config.json must hold settings, got {ev.short(data)}")
    try:
        cfg = from_mapping(data)
        problems = validate(cfg)
    except Exception as exc:  # ConfigError, or a value no check foresaw
        problems = getattr(exc, "problems", None) or [str(exc)]
    if problems:
        raise ValueError(f"config.json: {problems[0]}")
    return cfg


def _read_summary(path: Path) -> Dict[str, Any]:
    data = _load_json(path / "summary.json")
    if not isinstance(data, dict):
        raise ValueError(f"summary.json must hold an object, got {ev.short(data)}")
    summary = {}
    for key, kind in SUMMARY_FIELDS.items():
        summary[key] = ev.checked(data.get(key), "Optional[" + kind + "]", "summary.json: " + key)
    if summary["status"] not in RUN_STATUSES:
        raise ValueError(f"summary.json: unknown status {ev.short(summary['status'])}")
    return summary


def read_run(run_dir: str | Path) -> RunRecord:
    """A run folder's config and summary, checked. A run killed mid-way (process gone, or its
    heartbeat stale: core.live.judge) reads as status "interrupted" (and its leftovers are tidied
    once its process is surely gone); a run whose files make no sense reads as
    "unreadable", with the reasons in `problems`. Never raises."""
    path = Path(run_dir)
    problems: List[str] = []
    try:
        cfg: Optional[RunConfig] = _read_config(path)
    except ValueError as exc:
        cfg, problems = None, [str(exc)]
    try:
        summary = _read_summary(path)
    except ValueError as exc:
        summary, problems = dict.fromkeys(SUMMARY_FIELDS), problems + [str(exc)]
    gone = True
    if problems:
        summary["status"] = UNREADABLE  # left untidied: it may be a run whose files are being created
    elif summary["status"] == "running":
        running, gone = live.judge(path, summary["pid"])
        summary["status"] = "running" if running else "interrupted"
    if summary["status"] not in ("running", UNREADABLE) and gone:
        tidy_run(path)
    return RunRecord(path, cfg, summary, problems)


def tidy_run(path: Path) -> None:
    """Repair or remove what a run killed (or failed) mid-write leaves, in a run no process
    writes to: checkpoints/last (or best) lost between the two renames of replace_dir comes back
    from last.old; a leftover .old beside a present checkpoint, half-written .last.tmp-* /
    .best.tmp-* folders and .summary.json.* style temporary files are removed. Best effort:
    what cannot be changed (a read-only runs folder) is left as it is. Links are never followed:
    a run folder whose folders are links (to anywhere) is left alone, so that tidying can only
    touch what lies inside the run folder itself."""
    ckpt = path / "checkpoints"
    if not _real_dir(path) or (os.path.lexists(ckpt) and not _real_dir(ckpt)):
        return
    for kind in ("last", "best"):
        final, old = ckpt / kind, ckpt / f"{kind}.old"
        try:
            if _real_dir(old):
                if os.path.lexists(final):
                    shutil.rmtree(old)
                else:
                    os.replace(old, final)
        except OSError:
            pass
    for folder in (path, ckpt, ckpt / "last", ckpt / "best"):
        try:
            leftovers = [e for e in folder.iterdir() if _is_leftover(e.name)] if _real_dir(folder) else []
        except OSError:
            continue
        for entry in leftovers:
            try:
                if _real_dir(entry):
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError:
                pass


def _real_dir(path: Path) -> bool:
    """A folder that is not a link (nor reached through one as its last part)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except (OSError, ValueError):
        return False


def _is_leftover(name: str) -> bool:
    """A temporary name of the store: .last.tmp-N / .best.tmp-N (checkpoint folders being
    written) or .<file>.<random> (atomic_write_text's temporary files)."""
    if name.startswith((".last.tmp-", ".best.tmp-")):
        return True
    return any(name.startswith(f".{base}.") for base in ("summary.json", "config.json", "meta.json", "error.txt",
                                                   "heartbeat.json", "control.json", "change.json"))


def list_runs(runs_dir: str | Path) -> List[RunRecord]:
    """Every run folder under `runs_dir` (one holding a config.json or summary.json), oldest
    first; a malformed one is in the list as unreadable. A missing folder has no runs; one that
    cannot be listed raises RunsDirError."""
    try:
        root = Path(runs_dir).expanduser()
        if not root.is_dir():
            return []
        entries = sorted(root.iterdir())
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: ~user without a home
        raise RunsDirError(f"cannot list the runs folder {runs_dir}: {error_reason(exc)}") from None
    return [read_run(p) for p in entries if _is_run_dir(p)]


def _is_run_dir(path: Path) -> bool:
    try:
        return path.is_dir() and ((path / "config.json").exists() or (path / "summary.json").exists())
    except (OSError, ValueError):  # a name too long, a NUL in it
        return False


def find_run(runs_dir: str | Path, ref: str) -> Path:
    """A run folder from its id, a unique id prefix/suffix, or a path."""
    try:
        as_path, root = Path(ref).expanduser(), Path(runs_dir).expanduser()
    except RuntimeError as exc:  # ~user without a home
        raise LookupError(str(exc)) from None
    if _is_run_dir(as_path):
        return as_path
    try:
        matches = [p for p in root.iterdir() if p.is_dir() and (p.name == ref or ref in p.name)] \
            if root.is_dir() else []
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        raise LookupError(f"cannot list the runs folder {root}: {error_reason(exc)}") from None
    exact = [p for p in matches if p.name == ref]
    if exact:
        return exact[0]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise LookupError(f"no run {ref!r} in {root}")
    raise LookupError(f"{ref!r} matches {len(matches)} runs in {root}: " + ", ".join(p.name for p in matches[:5]))
