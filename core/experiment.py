"""Experiments: the same settings trained with several strategies, one after another (the
tutorial's four-way comparison in one action: `transferlab experiment`, ctrl+e on the form).

runs/experiments/<id>/experiment.json
  {"id": ..., "created": time, "settings": {...config...}, "strategies": [...],
   "runs": {strategy: run id}}
The runs are ordinary run folders of the runs folder (listed, replayed, resumed as any other);
the file says which run trained which strategy. It is rewritten (atomically) when a run starts,
so an experiment that was interrupted continues where it stopped: strategies whose run
completed are skipped, a run that stopped before its end is resumed, the rest start.

An experiment.json comes from a folder that may have been copied from elsewhere: it is read
with size, type and name checks (a run id is a plain folder name: nothing outside the runs
folder is ever read through it).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from core import config as C
from core.errors import SetupError
from core.files import is_regular_file, too_large

EXPERIMENTS = "experiments"
"""The folder of experiments inside the runs folder."""
FILE = "experiment.json"
LOCK = ".lock"
"""Held (flock) by the process that runs the experiment: two processes never run it at once."""
MAX_FILE = 1024 * 1024
ORDER = ("finetune", "discriminative", "frozen", "scratch")
"""The tutorial's four ways, in its order (scratch last: the baseline the others are compared with)."""
COMPARED = ("dataset", "data_root", "classes", "backbone", "pretrained", "image_size", "epochs", "limit_train",
            "limit_test", "normalize")
"""Settings that must be equal for two runs' accuracies to be put side by side (data_root only
for data read from a folder; pretrained not for scratch, which loads no weights)."""
BUILT_IN = ("digits", "synthetic")
"""Datasets that need no data folder (data_root does not matter for them)."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ExperimentError(SetupError):
    """An experiment cannot be created, read or continued."""


def parse_strategies(text: str) -> List[str]:
    """`finetune,frozen` -> the strategies, in the tutorial's order; ConfigError for an unknown
    name, a repeated one or none."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in C.STRATEGIES]
    if unknown:
        raise C.ConfigError([f"strategies: unknown {', '.join(map(repr, unknown))} (choose from "
                             f"{', '.join(C.STRATEGIES)})"])
    if len(set(names)) != len(names):
        raise C.ConfigError(["strategies: each may be given once"])
    if not names:
        raise C.ConfigError(["strategies: name at least one (e.g. finetune,frozen)"])
    return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))


def mismatches(configs: List[Optional[C.RunConfig]]) -> List[str]:
    """The settings (of COMPARED) in which the runs differ: their accuracies are then not
    comparable. A run without a readable config counts as a mismatch."""
    if any(c is None for c in configs):
        return ["config"]
    out = []
    for name in COMPARED:
        if name == "data_root" and all(c.dataset in BUILT_IN for c in configs):
            continue  # built into the package: read from no folder
        compared = [c for c in configs if c.strategy != "scratch"] if name == "pretrained" else configs
        if len({repr(getattr(c, name, None)) for c in compared}) > 1:
            out.append(name)
    return out


@dataclass
class Experiment:
    path: Path
    """Its folder: RUNS/experiments/<id>."""
    settings: C.RunConfig
    strategies: List[str]
    runs: Dict[str, str] = field(default_factory=dict)
    created: float = 0.0

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def runs_dir(self) -> Path:
        return self.path.parent.parent

    def config(self, strategy: str) -> C.RunConfig:
        """The run settings of one strategy: the experiment's, with that strategy."""
        return replace(self.settings, strategy=strategy, runs_dir=str(self.runs_dir))

    def save(self) -> None:
        from core.store import atomic_write_json

        atomic_write_json(self.path / FILE, {"id": self.id, "created": self.created,
                                             "settings": self.settings.to_dict(), "strategies": self.strategies,
                                             "runs": self.runs})

    def record(self, strategy: str, run_id: str) -> None:
        """`run_id` trains `strategy` (called when the run starts)."""
        self.runs[strategy] = run_id
        self.save()

    def run_path(self, strategy: str) -> Optional[Path]:
        run_id = self.runs.get(strategy)
        return self.runs_dir / run_id if run_id else None

    def plan(self) -> List[Tuple[str, Optional[Path]]]:
        """What is left to do, in order: (strategy, None) for a run to start, (strategy, folder)
        for a run to resume. Completed runs are done; a run still running is an ExperimentError
        (continue the experiment when it has ended); a run that cannot be resumed (it ended
        before its first checkpoint, or its folder is gone) starts again."""
        from core.store import read_run
        from core.trainer import ResumeError, plan_resume

        todo: List[Tuple[str, Optional[Path]]] = []
        for strategy in self.strategies:
            path = self.run_path(strategy)
            if path is None or not path.is_dir():
                todo.append((strategy, None))
                continue
            status = read_run(path).summary["status"]
            if status == "completed":
                continue
            if status == "running":
                raise ExperimentError(f"run {path.name} ({strategy}) of experiment {self.id} is still running: "
                                      "stop it, or wait until it ends, then continue the experiment")
            try:
                plan_resume(path)
                todo.append((strategy, path))
            except ResumeError:
                todo.append((strategy, None))
        return todo

    def hold(self) -> None:
        """Take the experiment for this process (until it ends: the lock goes with the process),
        and check that its file can be rewritten. ExperimentError when another process runs it or
        its folder cannot be written (before any run starts, so nothing is trained for nothing)."""
        import fcntl

        try:
            self._lock = open(self.path / LOCK, "a+")
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExperimentError(f"experiment {self.id} is being run by another process: wait until it pauses "
                                  "or ends") from None
        except OSError as exc:
            raise ExperimentError(f"cannot write the experiment folder {self.path}: {exc.strerror or exc}") from None
        try:
            self.save()
        except OSError as exc:
            raise ExperimentError(f"cannot write {self.path / FILE}: {exc.strerror or exc}") from None

    def held_elsewhere(self) -> bool:
        """Another process (or another holder in this one) runs the experiment now."""
        import fcntl

        try:
            with open(self.path / LOCK, "a+") as probe:
                fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def reread(self) -> "Experiment":
        """The experiment as its file says now (the process that runs it rewrites the file when a
        run starts); itself when the file cannot be read."""
        try:
            return read(self.path)
        except ExperimentError:
            return self

    def statuses(self) -> List[Tuple[str, Path, str]]:
        """(strategy, run folder, status) of the runs it has started, in its order."""
        from core.store import read_run

        return [(s, p, read_run(p).summary["status"]) for s in self.strategies
                if (p := self.run_path(s)) is not None and p.is_dir()]

    def running(self) -> List[Tuple[str, Path]]:
        """(strategy, run folder) of its runs that are training now, as its file says now."""
        return [(s, p) for s, p, status in self.reread().statuses() if status == "running"]

    def complete(self) -> bool:
        """Every strategy has a completed run."""
        done = [status for _, _, status in self.statuses() if status == "completed"]
        return len(done) == len(self.strategies)

    def discard_if_empty(self) -> bool:
        """Remove the folder of an experiment none of whose runs started (its first failed to set
        up): there is nothing to continue. True when it was removed."""
        import shutil

        try:
            if read(self.path).runs or self.held_elsewhere():
                return False
        except ExperimentError:
            return False
        self.release()
        shutil.rmtree(self.path, ignore_errors=True)
        return True

    def release(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()
            self._lock = None

    def records(self) -> List[Any]:
        """The experiment's runs as the run store reads them, in its strategies' order."""
        from core.store import read_run

        return [read_run(p) for p in map(self.run_path, self.strategies) if p is not None and p.is_dir()]


class Recorder:
    """A core listener: when the run of `strategy` starts, the experiment's file names it."""

    def __init__(self, exp: Experiment, strategy: str) -> None:
        self.exp, self.strategy = exp, strategy

    def __call__(self, event: Any) -> None:
        from core import events as ev

        if isinstance(event, ev.RunStarted):
            self.exp.record(self.strategy, event.run_id)


def create(cfg: C.RunConfig, strategies: List[str]) -> Experiment:
    """A new experiment folder for `cfg` trained with `strategies`."""
    from core.store import check_runs_dir

    root = check_runs_dir(cfg.runs_dir) / EXPERIMENTS
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = root / (f"{stamp}-{cfg.dataset.split(':')[0]}" + (f"-{n}" if n else ""))
        try:
            path.mkdir(parents=True)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise ExperimentError(f"cannot create the experiment folder {path}: {exc.strerror or exc}") from None
    else:
        raise ExperimentError(f"cannot name a new experiment folder in {root}")
    exp = Experiment(path, replace(cfg, strategy=strategies[0]), list(strategies), {}, time.time())
    exp.save()
    return exp


def read(path: Path) -> Experiment:
    """The experiment in folder `path`; ExperimentError (one line) when its file makes no sense."""
    file = Path(path) / FILE
    if not is_regular_file(file):
        raise ExperimentError(f"{file} is missing or not a regular file")
    if too_large(file, MAX_FILE):
        raise ExperimentError(f"{file} is larger than {MAX_FILE} bytes: not an experiment file")
    try:
        data = json.loads(file.read_bytes().decode("utf-8"), parse_constant=_refuse)
    except (OSError, ValueError, RecursionError) as exc:
        raise ExperimentError(f"{file} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ExperimentError(f"{file}: not an object")
    try:
        settings = C.from_mapping(data.get("settings") if isinstance(data.get("settings"), dict) else {})
        problems = C.validate(settings)
    except C.ConfigError as exc:
        problems = exc.problems
    if problems or not isinstance(data.get("settings"), dict):
        raise ExperimentError(f"{file}: settings: {problems[0] if problems else 'missing'}")
    names = data.get("strategies")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ExperimentError(f"{file}: strategies must be a list of names, got {str(names)[:80]}")
    try:
        strategies = parse_strategies(",".join(names))
    except C.ConfigError as exc:
        raise ExperimentError(f"{file}: {exc.problems[0]}") from None
    runs = data.get("runs", {})
    if not isinstance(runs, dict) or not all(
            k in strategies and isinstance(v, str) and _NAME.match(v) and ".." not in v for k, v in runs.items()):
        raise ExperimentError(f"{file}: runs must map its strategies to run folder names")
    created = data.get("created")
    return Experiment(Path(path), settings, strategies, dict(runs),
                      float(created) if type(created) in (int, float) else 0.0)


def _refuse(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def list_experiments(runs_dir: str | Path) -> List[Tuple[Path, Optional[Experiment], str]]:
    """Every experiment folder of the runs folder, oldest first: (folder, experiment or None,
    why it is unreadable)."""
    root = Path(runs_dir).expanduser() / EXPERIMENTS
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    except OSError:
        return []
    out = []
    for folder in folders:
        try:
            out.append((folder, read(folder), ""))
        except ExperimentError as exc:
            out.append((folder, None, str(exc)))
    return out


def of_run(run_dir: Path) -> Optional[Experiment]:
    """The experiment (of its runs folder) that the run in `run_dir` belongs to, if any."""
    run_dir = Path(run_dir)
    for _, exp, _ in list_experiments(run_dir.parent):
        if exp is not None and run_dir.name in exp.runs.values():
            return exp
    return None


def find(runs_dir: str | Path, ref: str) -> Experiment:
    """An experiment of the runs folder `runs_dir` by its id, a unique part of one, or its folder's
    path (which must be in RUNS/experiments: its runs are in that runs folder)."""
    root = (Path(runs_dir).expanduser() / EXPERIMENTS)
    if not str(ref).strip():
        raise ExperimentError("name the experiment to continue (its id, or a unique part of one)")
    as_path = Path(ref).expanduser()
    try:
        is_folder = (as_path / FILE).exists()
    except OSError:  # a name too long for a path, and the like: it can only be a part of an id
        is_folder = False
    if is_folder:
        try:
            inside = as_path.resolve().parent == root.resolve()
        except OSError:
            inside = False
        if not inside:
            raise ExperimentError(f"{ref} is not an experiment of the runs folder {runs_dir}: give its id, with "
                                  "--runs-dir the runs folder it belongs to")
        return read(root / as_path.resolve().name)
    found = [(p, e, why) for p, e, why in list_experiments(runs_dir) if ref in p.name]
    exact = [f for f in found if f[0].name == ref]
    found = exact or found
    if not found:
        raise ExperimentError(f"no experiment {ref!r} in {root}")
    if len(found) > 1:
        raise ExperimentError(f"{ref!r} matches {len(found)} experiments: " + ", ".join(p.name for p, _, _ in found[:5]))
    path, exp, why = found[0]
    if exp is None:
        raise ExperimentError(why)
    return exp
