"""Training on several processes (GPUs or nodes) with OneFlow's launcher and DistributedDataParallel.

Two halves:
- In each rank (a process started by `python -m oneflow.distributed.launch`, which sets RANK and
  WORLD_SIZE): `Dist` shards the global batches, reduces losses, counts and stop requests over the
  ranks and wraps the model in DDP. Only rank 0 writes the run folder and talks to listeners.
- In the parent (`transferlab train --nproc-per-node N`): `launch` writes the resolved settings to
  a launch file, starts the launcher in a session of its own, forwards Ctrl-C / SIGTERM to every
  rank, and when a rank dies, stops the others and records the run as failed within seconds.

With a world of one process nothing here is used: the trainer runs exactly as without it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from core import config as C
from core import events as ev
from core.errors import SetupError
from core.store import check_runs_dir, mark_failed

ENV_DDP_LAUNCH = "TRANSFERLAB_DDP_LAUNCH"
"""Set for the ranks: the launch file; rank 0 names its run folder in LAUNCH.run when it starts."""
FAIL_GRACE = 5.0
"""Seconds the other ranks get to end after one died before they are killed (a rank waiting in a
collective for a dead peer never returns to Python, so it cannot stop by itself)."""
STOP_GRACE = 300.0
"""Seconds the ranks get to finish a requested stop (saving a checkpoint) before they are killed."""


class DistributedError(SetupError):
    """The process settings cannot work (batch not divisible by the number of processes...)."""


def world_from_env() -> Tuple[int, int]:
    """(rank, world size) as the launcher set them in the environment; (0, 1) outside it."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def check_batch(batch_size: int, world: int) -> None:
    """--batch-size is the global batch: each process takes batch/N images per step."""
    if world > 1 and batch_size % world:
        raise DistributedError(f"--batch-size {batch_size} is not divisible by the {world} processes "
                               f"(each takes batch/{world} images per step): use a multiple of {world}")


@dataclass
class Dist:
    """This rank's share of a distributed run (only made when the world has more than one process)."""

    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: Any) -> Any:
        """DDP: parameters broadcast from rank 0, gradients averaged over the ranks after backward."""
        from core.backend import flow

        return flow.nn.parallel.DistributedDataParallel(model)

    def shard(self, idx: np.ndarray) -> Tuple[np.ndarray, int]:
        """This rank's images of a global batch: every world-th one from its rank on (the ranks
        together cover the batch once). When the batch has fewer images than ranks, a rank left
        with none takes one image with weight 0 (it must still run the step: DDP's gradient
        reduction needs every rank). Returns (indices, weight 1 or 0)."""
        mine = idx[self.rank::self.world]
        return (mine, 1) if len(mine) else (idx[:1], 0)

    def sum(self, tensor: Any) -> Any:
        """The sum of `tensor` over the ranks (a new tensor, the same on every rank)."""
        from core.backend import flow

        out = tensor.clone()
        flow.comm.all_reduce(out)
        return out

    def agree(self, control: Any) -> None:
        """Make a stop or abort asked on any rank apply on all of them, at the same step (called
        by every rank at the same points; one small all_reduce)."""
        from core.backend import flow

        flags = flow.tensor([float(control.stopping), float(control.aborting)])
        flow.comm.all_reduce(flags)
        stop, abort = flags.numpy().tolist()
        if abort and not control.aborting:
            control.request_abort()
        if stop and not control.stopping:
            control.request_stop("another process asked to stop")


    def share_changes(self, changes: dict) -> dict:
        """Rank 0's settings changes, on every rank (called by all ranks at each epoch boundary)."""
        from core.backend import flow

        mine = changes if self.is_main else {}
        values = flow.tensor([float(mine.get("epochs", 0)), float(mine.get("lr_scale", 0.0)),
                              float(bool(mine.get("unfreeze")))], dtype=flow.float64)
        flow.comm.all_reduce(values)
        epochs, scale, unfreeze = values.numpy().tolist()
        out = {}
        if epochs:
            out["epochs"] = int(epochs)
        if scale:
            out["lr_scale"] = scale
        if unfreeze:
            out["unfreeze"] = True
        return out


def current() -> Optional[Dist]:
    """This process's Dist when it is one rank of several, else None."""
    rank, world = world_from_env()
    return Dist(rank, world) if world > 1 else None


class NullWriter:
    """What ranks other than 0 have instead of a RunWriter: they write nothing."""

    run_id = ""
    path = None

    def __call__(self, event: ev.Event) -> None:
        pass

    def write_error(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def name_run_listener() -> Optional["NameRun"]:
    """Rank 0's listener naming its run folder for the parent (LAUNCH.run), when launched."""
    from core.launch import NameRun

    launch = os.environ.get(ENV_DDP_LAUNCH)
    return NameRun(launch) if launch else None


# ---------------------------------------------------------------------------------------------
# The parent: start the launcher and watch it


@dataclass
class Topology:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def world(self) -> int:
        return self.nproc_per_node * self.nnodes

    def problems(self) -> List[str]:
        out = []
        if self.nproc_per_node < 1:
            out.append("--nproc-per-node must be at least 1")
        if self.nnodes < 1:
            out.append("--nnodes must be at least 1")
        if not 0 <= self.node_rank < max(self.nnodes, 1):
            out.append(f"--node-rank must be between 0 and {max(self.nnodes, 1) - 1} (--nnodes {self.nnodes})")
        if not 1 <= self.master_port < 65536:
            out.append("--master-port must be between 1 and 65535")
        return out


def launcher_command(topo: Topology, launch_file: Path) -> List[str]:
    """The `python -m oneflow.distributed.launch ... -m tui train --config LAUNCH` line."""
    return [sys.executable, "-m", "oneflow.distributed.launch", "--nproc_per_node", str(topo.nproc_per_node),
            "--nnodes", str(topo.nnodes), "--node_rank", str(topo.node_rank),
            "--master_addr", topo.master_addr, "--master_port", str(topo.master_port),
            "-m", "tui", "train", "--config", str(launch_file)]


@dataclass
class Launched:
    status: str
    """A RunFinished status; FAILED also when no run started."""
    message: str = ""
    run_dir: Optional[Path] = None
    errors: List[str] = field(default_factory=list)
    """The ranks' `error:` lines (setup errors), from their stderr."""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def launch(cfg: C.RunConfig, topo: Topology, on_signal: Optional[Callable[[str], None]] = None,
           poll: float = 0.2, on_run: Optional[Callable[[Path], None]] = None) -> Launched:
    """Run `cfg` on this node's ranks through OneFlow's launcher and wait for the end.

    The launcher and its ranks get a session of their own (Ctrl-C on the terminal reaches this
    process only); this process forwards the first SIGINT/SIGTERM as SIGTERM (every rank asks for a
    graceful stop and the ranks agree on the step) and a second SIGINT as SIGINT (abort). The
    ranks' stdout is this terminal (rank 0's progress); their stderr goes to a log that ends in
    the run folder as ranks.log. When a rank dies, the launcher signals the others and exits: the
    rest get FAIL_GRACE seconds, are then killed, and a run folder still saying "running" is
    marked failed. `on_run` is told the run folder as soon as rank 0 has named it (an experiment
    records its run then)."""
    check_batch(cfg.batch_size, topo.world)
    from core.launch import tidy_launch_files

    runs_dir = check_runs_dir(cfg.runs_dir)
    tidy_launch_files(runs_dir)
    stem = f".launch-ddp-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    launch_file = runs_dir / f"{stem}.json"
    C.save(cfg, launch_file)
    log, named = launch_file.with_suffix(".log"), launch_file.with_suffix(".run")
    env = {**os.environ, ENV_DDP_LAUNCH: str(launch_file), "GLOG_minloglevel": "2"}
    env.setdefault("OMP_NUM_THREADS", "1")  # what the launcher would set, without its banner
    signals: List[int] = []

    def forward(signum: int, frame: Any) -> None:
        signals.append(signum)
        if len(signals) == 1 or signum == signal.SIGTERM:
            _signal_group(child.pid, signal.SIGTERM)
            if on_signal:
                on_signal("stop")
        else:
            _signal_group(child.pid, signal.SIGINT)
            if on_signal:
                on_signal("abort")

    with open(os.devnull, "rb") as stdin, open(log, "ab") as err:
        child = subprocess.Popen(launcher_command(topo, launch_file), stdin=stdin, stderr=err, env=env,
                                 start_new_session=True)
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        told = on_run is None
        while (code := child.poll()) is None:
            if not told and named.exists():
                told = True
                on_run(Path(named.read_text(encoding="utf-8").strip()))
            time.sleep(poll)
        # The launcher has exited: with 0 when every rank did; else it has just signalled them.
        grace = STOP_GRACE if signals else FAIL_GRACE
        deadline = time.monotonic() + grace
        while _group_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(poll)
        killed = _group_alive(child.pid)
        if killed:
            _signal_group(child.pid, signal.SIGKILL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    result = _outcome(named, log, code, killed, topo.node_rank)
    for leftover in (launch_file, named):
        leftover.unlink(missing_ok=True)
    return result


def _outcome(named: Path, log: Path, code: int, killed: bool, node_rank: int = 0) -> Launched:
    """How the run ended, from its summary; a run left "running" by a dead rank is marked failed.
    On a node other than 0 there is no run folder (node 0 writes it): the launcher's exit code says."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    if node_rank != 0:
        if code == 0:
            log.unlink(missing_ok=True)
            return Launched(ev.COMPLETED, "this node's processes ended; node 0 holds the run folder")
        return Launched(ev.FAILED, f"this node's processes ended with launcher exit code {code}: see {log}",
                        None, errors)
    run_dir = Path(named.read_text(encoding="utf-8").strip()) if named.exists() else None
    if run_dir is None:
        log_note = f" (their output: {log})" if text.strip() and not errors else ""
        if not log_note:
            log.unlink(missing_ok=True)
        return Launched(ev.FAILED, f"the training processes ended before the run started (launcher exit code "
                                   f"{code}){log_note}", None, errors)
    try:
        os.replace(log, run_dir / "ranks.log")
    except OSError:
        pass
    why = (f"a training process ended unexpectedly (launcher exit code {code})"
           + ("; the others were stopped" if killed else "") + f": see {run_dir / 'ranks.log'}")
    mark_failed(run_dir, why)
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        status, message = summary.get("status", ev.FAILED), summary.get("message") or ""
    except (OSError, ValueError):
        status, message = ev.FAILED, why
    if status not in ev.STATUSES:
        status = ev.FAILED
    return Launched(status, message, run_dir, errors)
