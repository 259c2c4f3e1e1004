"""The run store: one folder per run, written atomically, readable while a run goes on.

runs/<run id>/
  config.json     the resolved RunConfig
  metrics.jsonl   one event per line (core.events.to_record), appended and flushed as it happens
  summary.json    status, best and final test accuracy, duration, parameter counts
  checkpoints/last, checkpoints/best   model/ and optimizer/ (flow.save folders) and meta.json
  error.txt       the traceback, when the run failed on an unexpected exception
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from core import events as ev
from core.config import RunConfig, from_mapping


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move folder `tmp` to `final`, replacing an older `final` without a moment where neither
    a complete old nor a complete new one exists under a known name."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def new_run_id(cfg: RunConfig, runs_dir: Path) -> str:
    dataset = cfg.dataset.split(":")[0]
    stem = time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.strategy}-{dataset}"
    run_id, n = stem, 1
    while (runs_dir / run_id).exists():
        n += 1
        run_id = f"{stem}-{n}"
    return run_id


class RunWriter:
    """A listener that records a run's events into its folder."""

    def __init__(self, cfg: RunConfig, runs_dir: Optional[str | Path] = None):
        self.runs_dir = Path(runs_dir or cfg.runs_dir).expanduser()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = new_run_id(cfg, self.runs_dir)
        self.path = self.runs_dir / self.run_id
        self.path.mkdir()
        self.started = time.time()
        atomic_write_json(self.path / "config.json", cfg.to_dict())
        self.summary: Dict[str, Any] = {
            "run_id": self.run_id, "status": "running", "started": self.started, "pid": os.getpid(),
            "strategy": cfg.strategy, "dataset": cfg.dataset, "backbone": cfg.backbone,
            "epochs": cfg.epochs, "lr": cfg.lr, "lr_backbone": cfg.lr_backbone,
            "best_test_acc": None, "final_test_acc": None, "epochs_done": 0, "seconds": 0.0,
        }
        atomic_write_json(self.path / "summary.json", self.summary)
        self._metrics = open(self.path / "metrics.jsonl", "a", encoding="utf-8")

    def checkpoint_dir(self, kind: str) -> Path:
        return self.path / "checkpoints" / kind

    def __call__(self, event: ev.Event) -> None:
        if self._metrics.closed:
            return
        self._metrics.write(json.dumps(ev.to_record(event)) + "\n")
        self._metrics.flush()  # a killed run keeps every line written so far
        if isinstance(event, ev.RunStarted):
            self.summary.update(device=event.device, trainable_params=event.trainable_params,
                                total_params=event.total_params)
        elif isinstance(event, ev.EpochEnded):
            best = self.summary["best_test_acc"]
            self.summary.update(final_test_acc=event.test_acc, epochs_done=event.epoch,
                                best_test_acc=event.test_acc if best is None else max(best, event.test_acc),
                                seconds=time.time() - self.started)
        elif isinstance(event, ev.RunFinished):
            self.summary.update(status=event.status, message=event.message, seconds=event.seconds)
            self._metrics.close()
        else:
            return
        atomic_write_json(self.path / "summary.json", self.summary)

    def write_error(self, text: str) -> None:
        atomic_write_text(self.path / "error.txt", text)

    def close(self) -> None:
        if not self._metrics.closed:
            self._metrics.close()


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


@dataclass
class RunRecord:
    path: Path
    config: RunConfig
    summary: Dict[str, Any]
    problems: List[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.path.name

    def events(self) -> List[ev.Event]:
        return read_events(self.path)


def read_events(run_dir: str | Path) -> List[ev.Event]:
    """Every event recorded in a run's metrics.jsonl; a torn last line (killed run) is skipped."""
    out: List[ev.Event] = []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(ev.from_record(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                continue
    return out


def read_run(run_dir: str | Path) -> RunRecord:
    """A run folder's config and summary. A run killed mid-way reads as status "interrupted"."""
    path = Path(run_dir)
    problems: List[str] = []
    try:
        cfg = from_mapping(json.loads((path / "config.json").read_text(encoding="utf-8")))
    except Exception as exc:
        cfg, problems = RunConfig(), [f"config.json unreadable: {exc}"]
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except Exception as exc:
        summary, problems = {"status": "unreadable"}, problems + [f"summary.json unreadable: {exc}"]
    if summary.get("status") == "running" and not _alive(summary.get("pid")):
        summary["status"] = "interrupted"
    return RunRecord(path, cfg, summary, problems)


def _alive(pid: Any) -> bool:
    """True when process `pid` (the one that wrote a "running" summary) still exists."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_runs(runs_dir: str | Path) -> List[RunRecord]:
    """Every run folder under `runs_dir`, oldest first."""
    root = Path(runs_dir).expanduser()
    if not root.is_dir():
        return []
    return [read_run(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / "config.json").exists()]


def find_run(runs_dir: str | Path, ref: str) -> Path:
    """A run folder from its id, a unique id prefix/suffix, or a path."""
    as_path = Path(ref).expanduser()
    if (as_path / "config.json").exists():
        return as_path
    root = Path(runs_dir).expanduser()
    matches = [p for p in root.iterdir() if p.is_dir() and (p.name == ref or ref in p.name)] \
        if root.is_dir() else []
    exact = [p for p in matches if p.name == ref]
    if exact:
        return exact[0]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise LookupError(f"no run {ref!r} in {root}")
    raise LookupError(f"{ref!r} matches {len(matches)} runs in {root}: " + ", ".join(p.name for p in matches[:5]))
