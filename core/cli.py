"""The headless command line: `transferlab train | experiment | lr-find | runs | compare | stop | attach | export |
predict | tui`.

Flags are built from the RunConfig fields (core.config), like the TUI's form. Invalid flags or
values print one line per problem and exit with code 2; no traceback reaches the user.
"""
from __future__ import annotations

import argparse
import math
import re
import signal
import sys
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Set

from rich.markup import escape

from core import config as C
from core import events as ev
from core.errors import interrupted, printable
from core.report import (COMPARISON_COLUMNS, comparable_groups, comparison_cells, comparison_rows,
                         newest_per_strategy, run_row)

if TYPE_CHECKING:
    from core.distributed import Topology

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_ABORTED = 0, 1, 2, 3, 130
EXIT_CODES = {ev.COMPLETED: EXIT_OK, ev.STOPPED: EXIT_STOPPED, ev.ABORTED: EXIT_ABORTED,
              ev.FAILED: EXIT_FAILED}

STOP_WAIT_SECONDS = 60.0
"""How long `transferlab stop` waits for the run to end (a step rarely takes more)."""

TuiLauncher = Callable[..., int]
"""Opens the TUI with a pre-filled config and the names of the fields the user gave explicitly
(and `attach=RUN_DIR` to open on that run's dashboard)."""
SweepPlotter = Callable[..., str]
"""The LR finder's curve as text: (core.lrfind.SweepResult, color=bool) -> str (tui.lrplot)."""


class UsageError(Exception):
    def __init__(self, problems: List[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit itself
        raise UsageError([message])


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field (values parsed by core.config), plus --config FILE."""
    parser.add_argument("--config", metavar="FILE", help="read settings from a .toml or .json preset "
                        "(flags given as well override it)")
    for name, f in C.FIELDS.items():
        help_text = f.metadata["help"] + ("" if f.default == "" else f" (default: {f.default})")
        if C.field_type(name) is bool:
            group = parser.add_mutually_exclusive_group()
            group.add_argument(flag(name), dest=name, action="store_const", const="yes", help=help_text)
            group.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_const", const="no",
                               help=f"turn {name} off")
        else:
            choices = f.metadata.get("choices")
            metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
            parser.add_argument(flag(name), dest=name, metavar=metavar, help=help_text)


def config_from_args(args: argparse.Namespace, base: Optional[C.RunConfig] = None) -> C.RunConfig:
    """The RunConfig the flags describe (over --config and `base`); raises UsageError listing every
    problem."""
    problems: List[str] = []
    cfg = base or C.RunConfig()
    if getattr(args, "config", None) == "":
        problems.append("--config needs the path of a .toml or .json file")
    elif getattr(args, "config", None):
        try:
            cfg = C.load(args.config, cfg)
        except C.ConfigError as exc:
            problems.extend(exc.problems)
    given: Dict[str, Any] = {n: getattr(args, n) for n in C.FIELDS if getattr(args, n, None) is not None}
    try:
        cfg = C.from_mapping(given, cfg)
    except C.ConfigError as exc:
        problems.extend(exc.problems)
    if not problems:
        problems = C.validate(cfg)
    if problems:
        raise UsageError([_as_flag(p) for p in problems])
    return cfg


def _as_flag(problem: str) -> str:
    """"lr must be ..." -> "--lr must be ..." (messages start with the field they are about)."""
    first, _, rest = problem.partition(" ")
    return f"{flag(first)} {rest}" if first in C.FIELDS else problem


def command_line(cfg: C.RunConfig, detach: bool = False, processes: int = 1) -> str:
    """The `transferlab train ...` command that runs `cfg` (flags only where it differs from the
    defaults), started in the background with `detach`, on `processes` processes through OneFlow's
    launcher when more than one."""
    parts = ["transferlab", "train"]
    default = C.RunConfig()
    for name in C.FIELDS:
        value = getattr(cfg, name)
        if value == getattr(default, name):
            continue
        if isinstance(value, bool):
            parts.append(flag(name) if value else "--no-" + name.replace("_", "-"))
        else:
            parts += [flag(name), shlex.quote(C.value_text(value))]
    if detach:
        parts.append("--detach")
    if processes > 1:
        parts += ["--nproc-per-node", str(processes)]
    return " ".join(parts)


def launcher_line(topo: Topology) -> str:
    """The launcher command a `--nproc-per-node` run executes, as cmd_launch and the app's form show
    it (the launch file's real name is only known once the run starts)."""
    from core.distributed import launcher_command

    return " ".join(shlex.quote(a) for a in launcher_command(topo, Path("RUNS/.launch-ddp-*.json")))


NEGATIVE_NUMBER = re.compile(r"^-\.?\d")


def attach_negative_values(argv: List[str]) -> List[str]:
    """["--lr", "-1e-3"] -> ["--lr=-1e-3"]: argparse takes "-1e-3" for an option and would say
    "expected one argument"; joined, the value reaches validation, which explains what is wrong."""
    value_flags = {flag(n) for n in C.FIELDS if C.field_type(n) is not bool} | {"--config", "--runs-dir", "--wait"}
    value_flags |= set(SWEEP_FLAGS)
    out: List[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in value_flags and i + 1 < len(argv) and NEGATIVE_NUMBER.match(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _seconds(text: str) -> float:
    """A --wait value: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds (0 or more), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="transferlab", description="Transfer learning of image classifiers with "
                     "OneFlow and FlowVision. With no command, opens the terminal UI.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    train = sub.add_parser("train", help="train one run headless, with a progress bar")
    add_config_flags(train)
    train.add_argument("--detach", action="store_true",
                       help="start the run as its own background process (it outlives this terminal; "
                            "output in RUN/output.log), print its id and return; also with --resume, and with "
                            "--nproc-per-node (the launcher and its processes in the background)")
    train.add_argument("--resume", metavar="RUN", help="continue a stopped, interrupted or failed run (an id, a "
                       "unique part of one, or a path) in its folder, from its checkpoints/last, with its own "
                       "settings; only --epochs (to train it further) and --runs-dir may be given with it")
    add_launch_flags(train)
    experiment = sub.add_parser("experiment", help="the tutorial's comparison in one action: the same settings "
                                "trained with several strategies, one after another, then the comparison table")
    add_config_flags(experiment)
    experiment.add_argument("--strategies", default=",".join(EXPERIMENT_ORDER), metavar="LIST",
                            help="comma-separated strategies to train (default: all four: "
                                 f"{','.join(EXPERIMENT_ORDER)}); --strategy is not used here")
    experiment.add_argument("--continue", dest="continue_", metavar="EXP",
                            help="continue an interrupted experiment (an id, a unique part of one, or its folder): "
                                 "completed runs are kept, a stopped one resumes, the others start")
    experiment.add_argument("--detach", action="store_true",
                            help="run the experiment as its own background process (it outlives this terminal; "
                                 "output in RUNS/experiments/ID/output.log), print its id and return")
    add_launch_flags(experiment, nodes=False)
    add_lrfind_parser(sub)
    tui = sub.add_parser("tui", help="open the terminal UI (flags pre-fill its form)")
    add_config_flags(tui)
    runs = sub.add_parser("runs", help="list the runs in the runs folder")
    runs.add_argument("--runs-dir", default="./runs", help="folder holding the runs (default: ./runs)")
    compare = sub.add_parser("compare", help="compare runs' final test accuracy, as in the tutorial")
    compare.add_argument("runs", nargs="*", metavar="RUN",
                         help="run ids (or unique parts of them); default: the newest run of each strategy")
    compare.add_argument("--runs-dir", default="./runs", help="folder holding the runs (default: ./runs)")
    attach = sub.add_parser("attach", help="open the app on a run's dashboard, following it as it trains")
    attach.add_argument("run", metavar="RUN", nargs="?",
                        help="run id, a unique part of one, or the run's folder; or an experiment (its id), whose "
                             "runs it then follows one after another (default: the newest running run)")
    attach.add_argument("--runs-dir", default="./runs", help="folder holding the runs (default: ./runs)")
    stop = sub.add_parser("stop", help="stop a running run (from any terminal or host sharing its folder)",
                          description="Ask a running run to stop after its current step, saving a "
                          "checkpoint (status stopped), or with --abort to end at once (status aborted); "
                          "then wait until it has. Exit 0 when it ended as asked, 1 when it did not "
                          "(the request stays), 2 for a run that is unknown or not running.")
    stop.add_argument("run", metavar="RUN", help="run id, a unique part of one, or the run's folder; or an experiment "
                      "(its id): its current run stops and the experiment pauses")
    stop.add_argument("--abort", action="store_true", help="end at once, without a checkpoint")
    stop.add_argument("--wait", type=_seconds, default=STOP_WAIT_SECONDS, metavar="SECONDS",
                      help=f"how long to wait for the run to end (default: {STOP_WAIT_SECONDS:g})")
    stop.add_argument("--runs-dir", default="./runs", help="folder holding the runs (default: ./runs)")
    add_export_parsers(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None, launch_tui: Optional[TuiLauncher] = None,
         plot_sweep: Optional[SweepPlotter] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    err = _console(stderr=True)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["tui", *argv]
    argv = attach_negative_values(argv)
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help printed the help
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        if args.command is None:
            build_parser().print_help()
            return EXIT_OK
        if args.command == "runs":
            return cmd_runs(args.runs_dir)
        if args.command == "compare":
            return cmd_compare(args.runs_dir, args.runs)
        if args.command == "attach":
            run_dir = attach_target(args.runs_dir, args.run)
            if launch_tui is None:
                raise UsageError(["the terminal UI is not available in this installation"])
            return launch_tui(C.RunConfig(runs_dir=args.runs_dir), set(), attach=run_dir)
        if args.command == "stop":
            return cmd_stop(args.runs_dir, args.run, "abort" if args.abort else "stop", args.wait)
        if args.command == "experiment":
            return cmd_experiment(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "train" and args.resume is not None:
            if args.nproc_per_node or args.nnodes:
                raise UsageError(["--resume continues a run in one process: --nproc-per-node/--nnodes "
                                  "cannot go with it yet"])
            run_dir, epochs = resume_from_args(args)
            if args.detach:
                return cmd_detach(None, resume=(run_dir, epochs))
            return cmd_train(None, resume=(run_dir, epochs))
        sweep = sweep_from_args(args) if args.command == "lr-find" else None
        cfg = config_from_args(args)
    except UsageError as exc:
        for problem in exc.problems:
            err.print(f"[red]error:[/red] {escape(printable(problem))}", markup=True)
        err.print("run [bold]transferlab COMMAND --help[/bold] for the flags")
        return EXIT_USAGE
    if args.command == "tui":
        if launch_tui is None:
            err.print("error: the terminal UI is not available in this installation; use transferlab train")
            return EXIT_FAILED
        explicit = set(C.FIELDS) if args.config else {n for n in C.FIELDS if getattr(args, n) is not None}
        return launch_tui(cfg, explicit)
    if args.command == "lr-find":
        return cmd_lr_find(cfg, sweep, plot_sweep)
    if args.detach and (args.nnodes or 1) == 1:  # with --nproc-per-node: the launcher in the background
        processes = 1 if args.nproc_per_node is None else args.nproc_per_node
        return cmd_detach(cfg, processes=processes, port=args.master_port)  # port None: a free one
    if args.nproc_per_node is not None or args.nnodes is not None:
        return cmd_launch(cfg, args)
    return cmd_train(cfg)


# ---------------------------------------------------------------------------------------------
# train


RESUME_FLAGS = ("epochs", "runs_dir")
"""The settings that may go with --resume (a resumed run keeps the rest of its config.json)."""


def resume_from_args(args: argparse.Namespace) -> tuple:
    """(run folder, epochs or None) of `train --resume RUN`; UsageError for other settings given
    with it, a bad --epochs, or a RUN that names no run (or several)."""
    from core.store import find_run

    others = [flag(n) for n in C.FIELDS if n not in RESUME_FLAGS and getattr(args, n, None) is not None]
    others += ["--config"] if args.config else []
    if others:
        raise UsageError([f"--resume continues a run with the settings in its config.json: {', '.join(others)} "
                          "cannot be given with it (only --epochs and --runs-dir)"])
    epochs = None
    if args.epochs is not None:
        try:
            epochs = C.from_mapping({"epochs": args.epochs}).epochs
        except C.ConfigError as exc:
            raise UsageError([_as_flag(p) for p in exc.problems]) from None
        problems = [p for p in C.validate(C.RunConfig(epochs=epochs)) if p.startswith("epochs ")]
        if problems:
            raise UsageError([_as_flag(p) for p in problems])
    try:
        run_dir = find_run(args.runs_dir or C.RunConfig().runs_dir, args.resume)
    except LookupError as exc:
        raise UsageError([str(exc)]) from None
    return run_dir, epochs


def _console(stderr: bool = False, quiet: bool = False) -> Any:
    """A rich console; when the output is not a terminal, wide enough that tables keep their
    columns and lines are not broken. quiet: prints nothing (ranks other than 0)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, soft_wrap=not stream.isatty(),
                   width=None if stream.isatty() else 200, quiet=quiet)


def attach_target(runs_dir: str, ref: Optional[str]):
    """The run folder `attach` opens: RUN, or the newest running run; UsageError otherwise."""
    from core.store import RunsDirError, find_run, list_runs

    if ref is not None:
        try:
            return run_or_experiment(runs_dir, ref)
        except LookupError as exc:
            raise UsageError([str(exc)]) from None
    try:
        running = [r for r in list_runs(runs_dir) if r.summary["status"] == "running"]
    except RunsDirError as exc:
        raise UsageError([str(exc)]) from None
    if not running:
        raise UsageError([f"no run is running in {runs_dir}: name one (transferlab attach RUN), "
                          f"or see transferlab runs --runs-dir {runs_dir}"])
    return running[-1].path


def run_or_experiment(runs_dir: str, ref: str) -> Path:
    """The run folder `ref` names, or, when it names an experiment instead, the experiment's run
    that is training now (else its newest); LookupError (one line) when it names neither."""
    from core import experiment as X
    from core.store import find_run

    try:
        return find_run(runs_dir, ref)
    except LookupError as exc:
        try:
            exp = X.find(runs_dir, ref)
        except X.ExperimentError:
            raise exc from None
    running = exp.running()
    if running:
        return running[-1][1]
    ran = [p for s in exp.strategies if (p := exp.run_path(s)) is not None and p.is_dir()]
    if not ran:
        raise LookupError(f"experiment {exp.id} has no run yet")
    return ran[-1]


def cmd_detach(cfg: Optional[C.RunConfig], resume: Optional[tuple] = None, processes: int = 1,
               port: Optional[int] = None) -> int:
    """train --detach: start the run (or the resumption of `resume` = (run folder, epochs)) in the
    background, through the launcher with processes > 1; say which run it is; return. Ctrl-C while
    it starts ends the child too (nothing is left running unnamed)."""
    from core.distributed import Topology, check_batch
    from core.errors import SetupError
    from core.launch import START_TIMEOUT, Child

    console, err = _console(), _console(stderr=True)
    run_dir, epochs = resume or (None, None)
    child = None
    try:
        if processes != 1:
            problems = Topology(processes).problems()
            if problems:
                raise UsageError(problems)
            try:
                check_batch(cfg.batch_size, processes)
            except SetupError as exc:
                raise UsageError([str(exc)]) from None
        with console.status("starting the run in the background (loading data and model)..."):
            child = Child(cfg, run_dir, epochs, processes, port)
            started = child.wait(START_TIMEOUT)
    except UsageError as exc:
        for problem in exc.problems:
            err.print(f"error: {problem}", markup=False)
        return EXIT_USAGE
    except (SetupError, OSError) as exc:
        err.print(f"error: {exc}", markup=False)
        return EXIT_FAILED
    except KeyboardInterrupt:
        if child is not None:
            child.terminate()
            child.process.wait(30)
            child.poll()
            if child.state.run_dir is not None:  # it had just started: it stops with a checkpoint
                err.print(f"interrupted: run {child.state.run_dir.name} was asked to stop", markup=False)
                return EXIT_ABORTED
            child.state.log.unlink(missing_ok=True)
        err.print("interrupted: the background run was not started", markup=False)
        return EXIT_ABORTED
    if started.exit_code is not None:  # it could not start: its log holds the one-line reason
        for line in started.reason():
            err.print(line, markup=False)
        return EXIT_FAILED if started.exit_code not in (EXIT_USAGE, EXIT_ABORTED) else started.exit_code
    if started.run_dir is None:
        console.print(f"started in the background (pid {started.pid}); still loading data and model after "
                      f"{START_TIMEOUT:.0f} s: its output is in {started.log} until its run starts, then in "
                      "RUN/output.log; transferlab runs shows it once it has started", markup=False)
        return EXIT_OK
    run_id, runs_dir = started.run_dir.name, started.run_dir.parent
    how = f" on {processes} processes" if processes > 1 else ""
    ref = f"{shlex.quote(run_id)} --runs-dir {shlex.quote(str(runs_dir))}"
    console.print(f"run {run_id} {'resumed' if resume else 'started'} in the background{how} (pid {started.pid})",
                  markup=False)
    console.print(f"  output: {started.log}\n  watch:  transferlab attach {ref}\n"
                  f"  stop:   transferlab stop {ref}   (saves a checkpoint; --abort: at once)", markup=False)
    return EXIT_OK


def print_setup_error(err: Any, exc: Any) -> None:
    """A SetupError's problems, one line each, with nothing in them read as markup."""
    for line in exc.lines():
        err.print(f"[red]error:[/red] {escape(line)}", markup=True, soft_wrap=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


DEFAULT_PORT = 29500
"""The launcher's own default --master-port."""


def add_launch_flags(parser: argparse.ArgumentParser, nodes: bool = True) -> None:
    """train's flags for several processes (OneFlow's launcher; core.distributed); an
    experiment's (nodes=False) are those of one node."""
    group = parser.add_argument_group(
        "several GPUs" + (" or nodes" if nodes else ""), "run through `python -m oneflow.distributed.launch` with "
        "DistributedDataParallel; --batch-size stays the global batch: each process takes batch/N "
        "images per step (N = processes in all), so it must be divisible by N")
    group.add_argument("--nproc-per-node", type=int, metavar="N",
                       help="processes on this node (one per GPU; on a CPU, one per few cores)")
    if not nodes:
        group.add_argument("--master-port", type=int, metavar="P",
                           help="a free TCP port for the processes of each run (default: a free one)")
        return
    group.add_argument("--nnodes", type=int, metavar="M", help="number of nodes (default: 1)")
    group.add_argument("--node-rank", type=int, default=0, metavar="R",
                       help="this node's rank, 0 to M-1 (default: 0; node 0 writes the run folder)")
    group.add_argument("--master-addr", default="127.0.0.1", metavar="A",
                       help="address of node 0, reachable from every node (default: 127.0.0.1)")
    group.add_argument("--master-port", type=int, metavar="P",
                       help=f"a free TCP port on node 0 (default: {DEFAULT_PORT}; with --detach, a free one)")


def cmd_launch(cfg: C.RunConfig, args: argparse.Namespace) -> int:
    """train --nproc-per-node N: the run on this node's N processes through OneFlow's launcher."""
    from core.distributed import Topology, check_batch, launch
    from core.errors import SetupError

    err = _console(stderr=True)
    given = lambda value, default: default if value is None else value  # noqa: E731  (0 is a value)
    topo = Topology(given(args.nproc_per_node, 1), given(args.nnodes, 1), args.node_rank, args.master_addr,
                    given(args.master_port, DEFAULT_PORT))
    problems = topo.problems()
    if args.detach:
        problems.append("--detach starts the processes of this node only: with --nnodes, start each node's "
                        "command in the background yourself (nohup ... &)")
    try:
        check_batch(cfg.batch_size, topo.world)
    except SetupError as exc:
        problems.append(str(exc))
    if problems:
        for problem in problems:
            err.print(f"error: {problem}", markup=False)
        return EXIT_USAGE
    return launched(cfg, topo)


def launched(cfg: C.RunConfig, topo: Any, on_run: Optional[Callable[[Path], None]] = None) -> int:
    """Run `cfg` on the processes of `topo` (checked) through the launcher, and say how it ended;
    `on_run` gets the run folder once it started."""
    from core.distributed import launch
    from core.errors import SetupError

    err = _console(stderr=True)

    def told(what: str) -> None:
        err.print("stopping every process after this step (Ctrl-C again to abort)" if what == "stop"
                  else "aborting every process", markup=False)

    err.print(f"{topo.world} processes ({topo.nproc_per_node} on this node, rank {topo.node_rank} of "
              f"{topo.nnodes} nodes): " + launcher_line(topo),
              markup=False)
    try:
        result = launch(cfg, topo, on_signal=told, on_run=on_run)
    except (SetupError, OSError) as exc:
        err.print(f"error: {exc}", markup=False)
        return EXIT_FAILED
    for line in result.errors:
        err.print(line, markup=False)
    if result.status == ev.FAILED and result.message:
        err.print(f"error: {result.message}" if result.run_dir is None else f"failed: {result.message}",
                  markup=False)
    elif result.run_dir is None and result.message:  # a node other than 0: node 0 has the run folder
        err.print(result.message, markup=False)
    return EXIT_CODES.get(result.status, EXIT_FAILED)


EXPERIMENT_ORDER = ("finetune", "discriminative", "frozen", "scratch")


def cmd_experiment(args: argparse.Namespace) -> int:
    """`transferlab experiment`: train the strategies one after another with the same settings
    (or continue an experiment), then print the comparison; with --detach, in a process of its
    own. UsageError for bad settings."""
    from core import experiment as X
    from core.errors import SetupError

    err = _console(stderr=True)
    given = [flag(n) for n in C.FIELDS if n != "runs_dir" and getattr(args, n, None) is not None]
    if args.continue_ and (given or args.config):
        raise UsageError([f"--continue takes the experiment's own settings: {', '.join(given or ['--config'])} "
                          "cannot be given with it"])
    if getattr(args, "strategy", None) is not None:
        raise UsageError(["--strategy: an experiment trains --strategies (default: all four)"])
    if args.continue_ is not None and not args.continue_.strip():
        raise UsageError(["--continue needs an experiment (its id, or a unique part of one)"])
    try:
        strategies = X.parse_strategies(args.strategies)
        cfg = None if args.continue_ else config_from_args(args)
    except C.ConfigError as exc:
        raise UsageError([_as_flag(p) for p in exc.problems]) from None
    processes = 1 if args.nproc_per_node is None else args.nproc_per_node
    if cfg is not None:
        _check_processes(cfg, processes)
    namer = _experiment_namer()
    if not args.detach and not training_imported(err):
        return EXIT_ABORTED
    try:
        exp = X.find(args.runs_dir or C.RunConfig().runs_dir, args.continue_) if args.continue_ \
            else X.create(cfg, strategies)
        _check_processes(exp.settings, processes)
        if args.detach:
            return cmd_detach_experiment(exp, processes, args.master_port, continued=bool(args.continue_))
        exp.hold()
        todo = exp.plan()
    except SetupError as exc:  # the experiment's file or folder, the runs folder
        print_setup_error(err, exc)
        return EXIT_FAILED
    except KeyboardInterrupt:
        err.print("interrupted before training started; nothing was trained")
        return EXIT_ABORTED
    again = f"transferlab experiment --continue {shlex.quote(exp.id)} --runs-dir {shlex.quote(str(exp.runs_dir))}"
    err.print(f"experiment {exp.id}: {', '.join(exp.strategies)} ({len(todo)} run(s) to go) in {exp.path}",
              markup=False)
    for i, (strategy, resume) in enumerate(todo, 1):
        alone = resume is not None and processes > 1
        err.print(f"experiment {exp.id}: run {i} of {len(todo)}: {strategy}" + (" (resumed" + (
            ", in one process: a run resumes in one process only)" if alone else ")") if resume else ""),
            markup=False)
        code = experiment_run(exp, strategy, resume, processes, args.master_port, namer)
        namer = None  # (only the first run is named to the parent that waits)
        if code != EXIT_OK:
            if not args.continue_ and exp.discard_if_empty():
                err.print(f"experiment {exp.id} removed: its first run did not start", markup=False)
            else:
                err.print(f"experiment {exp.id} paused at {strategy}; continue it with: {again}", markup=False)
            return code
    print_comparison(_console(), exp.records(), f"experiment {exp.id}")
    return EXIT_OK


def _check_processes(cfg: C.RunConfig, processes: int) -> None:
    """UsageError when the runs cannot be trained on `processes` processes (a bad count, or a
    batch they cannot share)."""
    from core.distributed import Topology, check_batch
    from core.errors import SetupError

    if processes == 1:
        return
    problems = Topology(processes).problems()
    if not problems:
        try:
            check_batch(cfg.batch_size, processes)
        except SetupError as exc:
            problems = [str(exc)]
    if problems:
        raise UsageError(problems)


def _experiment_namer() -> Any:
    """In a detached experiment process: the NameRun that tells the parent its first run started."""
    import os

    from core.launch import ENV_EXPERIMENT, NameRun

    launch = os.environ.pop(ENV_EXPERIMENT, None)
    return NameRun(launch) if launch else None


def experiment_run(exp: Any, strategy: str, resume: Optional[Path], processes: int, port: Optional[int],
                   namer: Any = None) -> int:
    """One run of an experiment: in this process, or on `processes` processes through the
    launcher (a resumed run: in this process); the experiment's file names it when it starts."""
    from core import experiment as X
    from core.distributed import Topology
    from core.launch import free_port

    if resume is None and processes > 1:
        def started(run_dir: Path) -> None:
            exp.record(strategy, run_dir.name)
            if namer is not None:
                namer.name(run_dir)

        topo = Topology(processes, master_port=port or free_port())  # a new port each run: the last one may linger
        return launched(exp.config(strategy), topo, on_run=started)
    listeners = [X.Recorder(exp, strategy)] + ([namer] if namer is not None else [])
    return cmd_train(exp.config(strategy) if resume is None else None,
                     resume=(resume, None) if resume is not None else None, listeners=listeners)


def cmd_detach_experiment(exp: Any, processes: int, port: Optional[int], continued: bool) -> int:
    """experiment --detach: the experiment in a background process of its own; say which it is
    and how to follow and stop it once its first run started (or why it could not); return."""
    from core.launch import START_TIMEOUT, Child

    console, err = _console(), _console(stderr=True)
    if exp.held_elsewhere():
        err.print(f"error: experiment {exp.id} is being run by another process: wait until it pauses or ends",
                  markup=False)
        return EXIT_FAILED
    child = None
    try:
        with console.status(f"starting experiment {exp.id} in the background (loading data and model)..."):
            child = Child.experiment(exp.path, processes, port)
            started = child.wait(START_TIMEOUT)
    except OSError as exc:
        err.print(f"error: cannot start the experiment's process: {exc}", markup=False)
        return EXIT_FAILED
    except KeyboardInterrupt:
        if child is not None:
            child.terminate()
        err.print(f"interrupted: experiment {exp.id} was asked to stop; continue it with "
                  f"transferlab experiment --continue {exp.id}", markup=False)
        return EXIT_ABORTED
    ref = f"{shlex.quote(exp.id)} --runs-dir {shlex.quote(str(exp.runs_dir))}"
    if started.exit_code is not None:  # it could not start a run: its output says why
        text = started.log.read_text(encoding="utf-8", errors="replace") if started.log.exists() else ""
        if started.exit_code == EXIT_OK:  # nothing left to train: the comparison
            console.print(text.rstrip(), markup=False)
            return EXIT_OK
        for line in started.reason():
            err.print(line, markup=False)
        if continued or not exp.discard_if_empty():
            err.print(f"experiment {exp.id} paused; continue it with transferlab experiment --continue {ref}",
                      markup=False)
        return EXIT_FAILED if started.exit_code not in (EXIT_USAGE, EXIT_ABORTED) else started.exit_code
    how = f" on {processes} processes" if processes > 1 else ""
    what = "continued" if continued else "started"
    if started.run_dir is None:
        console.print(f"experiment {exp.id} {what} in the background{how} (pid {started.pid}); still loading "
                      f"after {START_TIMEOUT:.0f} s: its output is in {started.log}", markup=False)
        return EXIT_OK
    console.print(f"experiment {exp.id} {what} in the background{how} (pid {started.pid}): "
                  f"{', '.join(exp.strategies)}; first run {started.run_dir.name}", markup=False)
    console.print(f"  output: {started.log}\n  watch:  transferlab attach {ref}\n"
                  f"  stop:   transferlab stop {ref}   (stops its current run with a checkpoint; "
                  f"continue it with transferlab experiment --continue {ref})", markup=False)
    return EXIT_OK


def training_imported(err: Any) -> bool:
    """Import the training code (oneflow) with Ctrl-C and SIGTERM held back until it is done (a
    signal in the middle of oneflow's import crashed it or gave a traceback); False, having said
    so, when one came (nothing was written)."""
    signal.signal(signal.SIGTERM, _interrupt)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        try:
            import core.trainer  # noqa: F401
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
    except (KeyboardInterrupt, ImportError) as exc:
        if not interrupted(exc):
            raise
        err.print("interrupted before training started; nothing was written")
        return False
    return True



def cmd_train(cfg: Optional[C.RunConfig], resume: Optional[tuple] = None, listeners: Sequence[Any] = ()) -> int:
    """Train `cfg`, or with `resume` = (run folder, epochs or None) continue that run; `listeners`
    get its events too."""
    from core import distributed
    from core.errors import SetupError

    console, err = _console(), _console(stderr=True)
    dist = distributed.current()  # one rank of several, started by OneFlow's launcher
    if dist is not None and not dist.is_main:
        console = _console(quiet=True)
    signal.signal(signal.SIGTERM, _interrupt)  # before training: nothing to save, end at once
    # Ctrl-C and SIGTERM wait while the spinner's thread starts and oneflow is imported: the
    # kernel hands a signal to any thread that does not block it, and one reaching the spinner
    # thread mid-import met oneflow's own handler (exit 255, no word). Threads started now keep
    # them blocked; the main thread takes a waiting one as soon as the import is done.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    with console.status("loading data and model..."):
        try:
            try:
                from core.launch import adopt_log_listener
                from core.runner import Local
                from core.trainer import OUT_OF_MEMORY, NothingToResume, halved
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        except (KeyboardInterrupt, ImportError) as exc:  # oneflow's import turns a Ctrl-C into ImportError
            if not interrupted(exc):
                raise
            err.print("interrupted before training started; nothing was written")
            return EXIT_ABORTED
        progress = ProgressPrinter(console)
        listeners = [progress, *listeners, *filter(None, [adopt_log_listener(), distributed.name_run_listener()])]
        run = Local(cfg, *(resume or (None, None)), listeners=listeners, dist=dist)
        try:
            if dist is not None:
                distributed.check_batch(cfg.batch_size, dist.world)
            run.prepare()
        except NothingToResume as exc:
            print_setup_error(err, exc)
            return EXIT_USAGE
        except SetupError as exc:
            print_setup_error(err, exc)
            return EXIT_FAILED
        except (KeyboardInterrupt, ImportError) as exc:  # the data's imports (scikit-learn's) too
            if not interrupted(exc):
                raise
            err.print("interrupted before training started; nothing was written")
            return EXIT_ABORTED
    previous = {sig: signal.signal(sig, _stop_handler(run.control, console)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = run.train()
    except SetupError as exc:  # the run folder could not be created
        print_setup_error(err, exc)
        return EXIT_FAILED
    finally:
        progress.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if result.status == ev.FAILED and result.message.startswith(OUT_OF_MEMORY) and halved(run.cfg) is not None:
        err.print("the same run with half the batch: " + command_line(halved(run.cfg)), markup=False, soft_wrap=True)
    return EXIT_CODES[result.status]


def _stop_handler(control: Any, console: Any) -> Callable[[int, Any], None]:
    """The SIGINT/SIGTERM handler of a training run. The first Ctrl-C, and every SIGTERM, asks
    for a graceful stop (finish the step, save a checkpoint: exit 3). A second Ctrl-C aborts at
    once: it raises KeyboardInterrupt wherever the main thread is (mid-step, or writing the
    stop's checkpoint, whose partial folder is then removed), which ends the run "aborted"
    (exit 130) - unless the run is already recording how it ended."""

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and control.stopping:
            control.request_abort()
            if not control.ending:
                raise KeyboardInterrupt
            return
        if not control.stopping:
            control.request_stop()
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            console.print(f"[yellow]{name}: stopping after this step and saving a checkpoint "
                          "(Ctrl-C again to abort at once)[/yellow]")

    return handler


class ProgressPrinter:
    """A listener drawing a rich progress bar per epoch and printing each epoch's results."""

    def __init__(self, console: Any):
        self.console = console
        self.progress = None
        self.task = None
        self.epochs = 0
        self.resumed: Optional[ev.RunResumed] = None

    gone = False
    """Its output went away (a closed pipe: `| head`, a `tee` ended by Ctrl-C): the run goes on
    unprinted (rich turns the broken pipe into SystemExit, which would end training unrecorded)."""

    def __call__(self, event: ev.Event) -> None:
        if self.gone:
            return
        try:
            self._show(event)
        except (BrokenPipeError, SystemExit):
            self.gone = True
            try:
                self.close()
            except (BrokenPipeError, SystemExit, OSError):
                self.progress = None

    def _show(self, event: ev.Event) -> None:
        c = self.console
        if isinstance(event, ev.SettingsChanged):
            self.epochs = event.config["epochs"]
            c.print(f"after epoch {event.epoch}: {event.summary}", markup=False)
        elif isinstance(event, ev.RunResumed):
            self.resumed = event
            c.print(f"resuming run {event.run_id} at epoch {event.epoch} step {event.step} "
                    f"(global step {event.global_step}), to {event.epochs} epochs", markup=False)
        elif isinstance(event, ev.RunStarted):
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            cfg = event.config
            self.epochs = cfg["epochs"]
            c.print(f"[bold]run {escape(event.run_id)}[/bold]  " + escape(
                    f"{cfg['strategy']} {cfg['backbone']} on {cfg['dataset']} ({event.train_size} train / "
                    f"{event.test_size} test images, {event.num_classes} classes) on {event.device}"))
            c.print(f"trainable parameters {event.trainable_params:,} of {event.total_params:,}; "
                    f"folder {event.run_dir}", markup=False)
            for note in event.notes:
                c.print(f"[yellow]note:[/yellow] {escape(note)}")
            self.progress = Progress(
                TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
                MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                TextColumn("{task.fields[rate]:.1f} img/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=c, transient=True)
            self.progress.start()
            at = self.resumed or ev.RunResumed("", 1, 0, 0, 0, self.epochs)
            self.task = self.progress.add_task("train", total=event.steps_per_epoch, completed=at.step,
                                               epoch=at.epoch, epochs=self.epochs, loss=float("nan"), rate=0.0)
        elif isinstance(event, ev.StepEnded) and self.progress is not None:
            self.progress.update(self.task, completed=event.step, epoch=event.epoch, loss=event.loss,
                                 rate=event.images_per_sec)
        elif isinstance(event, ev.EpochEnded) and self.progress is not None:
            self.progress.console.print(ev.epoch_summary(event, self.epochs), markup=False)
            self.progress.reset(self.task, epoch=min(event.epoch + 1, self.epochs), epochs=self.epochs,
                                loss=float("nan"), rate=0.0)
        elif isinstance(event, ev.RunFinished):
            self.close()
            c.print(ev.finish_summary(event), style=ev.STATUS_COLOURS[event.status], markup=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


# ---------------------------------------------------------------------------------------------
# lr-find


SWEEP_FLAGS = {"--steps": "steps", "--start-lr": "start_lr", "--end-lr": "end_lr"}


def add_lrfind_parser(sub: Any) -> None:
    from core import lrfind

    parser = sub.add_parser("lr-find", help="sweep the learning rate on a copy of the model and suggest one",
                            description="An exponential learning-rate sweep (one batch per rate, at most one "
                            "pass over the training data) with the settings of a run, on a model of its own: "
                            "nothing is written. Prints the loss curve and, last, `suggested lr: VALUE` (the "
                            "rate of the steepest fall of the smoothed loss). For discriminative the rate swept "
                            "is the head's (--lr); the backbone's keeps its ratio.")
    add_config_flags(parser)
    parser.add_argument("--steps", metavar="N", help=f"most steps (default: {lrfind.DEFAULT_STEPS}; fewer when "
                        "one pass over the training data has fewer batches)")
    parser.add_argument("--start-lr", metavar="A", help=f"first learning rate (default: {lrfind.DEFAULT_START_LR:g})")
    parser.add_argument("--end-lr", metavar="B", help=f"last learning rate (default: {lrfind.DEFAULT_END_LR:g})")


def sweep_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """lr-find's --steps/--start-lr/--end-lr as lr_find's keyword arguments; UsageError otherwise."""
    from core import lrfind

    values: Dict[str, Any] = {"steps": lrfind.DEFAULT_STEPS, "start_lr": lrfind.DEFAULT_START_LR,
                              "end_lr": lrfind.DEFAULT_END_LR}
    problems = []
    for option, name in SWEEP_FLAGS.items():
        text = getattr(args, name)
        if text is None:
            continue
        try:
            values[name] = int(text) if name == "steps" else float(text)
        except ValueError:
            problems.append(f"{option} must be a {'whole ' if name == 'steps' else ''}number, got {C.shown(text)}")
    problems = problems or lrfind.check_sweep(**values)
    if problems:
        raise UsageError(problems)
    return values


def cmd_lr_find(cfg: C.RunConfig, sweep: Dict[str, Any], plot_sweep: Optional[SweepPlotter]) -> int:
    """lr-find: the sweep with a progress line (stderr), its curve, then `suggested lr: VALUE`.
    Exit 0 with a suggestion, 1 without one or when the settings cannot be set up, 130 on Ctrl-C."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from core import lrfind
    from core.errors import SetupError, one_line

    console, err = _console(), _console(stderr=True)
    signal.signal(signal.SIGTERM, _interrupt)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err, transient=True)
    task = progress.add_task("loading data and model", total=None, info="")

    def on_step(s: Any) -> None:
        progress.update(task, description="lr sweep", total=s.total, completed=s.point.step,
                        info=f"lr {lrfind.format_lr(s.point.lr)}  loss {s.point.loss:.4f}")

    try:
        import core.backend  # noqa: F401  oneflow, imported before any other thread starts (Ctrl-C held)

        with progress:
            result = lrfind.lr_find(cfg, on_step=on_step, **sweep)
    except (KeyboardInterrupt, ImportError) as exc:  # oneflow's import turns a Ctrl-C into ImportError
        if not interrupted(exc):
            raise
        err.print("interrupted: no learning rate suggested; nothing was written", markup=False)
        return EXIT_ABORTED
    except SetupError as exc:
        print_setup_error(err, exc)
        return EXIT_FAILED
    except Exception as exc:  # OneFlow's own errors: one line, not its page
        err.print(f"error: {printable(one_line(exc))}", markup=False)
        return EXIT_FAILED
    if plot_sweep is not None and result.points:
        print(plot_sweep(result, color=sys.stdout.isatty()), flush=True)
    console.print(f"{result.why} ({result.seconds:.1f} s)", markup=False)
    if result.suggestion is None:
        return EXIT_FAILED
    if result.backbone_ratio is not None:
        console.print(f"(the head's rate; the backbone's keeps its ratio {result.backbone_ratio:g}: --lr-backbone "
                      f"{result.suggestion * result.backbone_ratio:.3g})", markup=False)
    console.print(f"suggested lr: {lrfind.format_lr(result.suggestion)}", markup=False)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# runs and compare


def cmd_runs(runs_dir: str) -> int:
    from rich.table import Table
    from rich.text import Text

    from core.store import RunsDirError, list_runs

    console, err = _console(), _console(stderr=True)
    try:
        runs = list_runs(runs_dir)
    except RunsDirError as exc:
        err.print(f"error: {exc}", markup=False)
        return EXIT_FAILED
    if not runs:
        console.print(f"no runs in {runs_dir} yet: start one with transferlab train", markup=False)
        return EXIT_OK
    columns = ("run", "strategy", "dataset", "backbone", "lr", "epochs", "best test acc", "status", "duration")
    table = Table(*columns, title=Text(f"runs in {runs_dir}"))
    for run in runs:
        row = run_row(run)
        table.add_row(*(Text(row[c]) for c in columns))  # Text: names from files are not markup
    console.print(table)
    for run in runs:
        if run.unreadable:
            console.print(f"unreadable: {run.run_id}: {run.reason}", markup=False)
    return EXIT_OK


def cmd_compare(runs_dir: str, refs: List[str]) -> int:
    from core.store import RunsDirError, find_run, list_runs, read_run

    console, err = _console(), _console(stderr=True)
    if refs:
        try:
            runs = [read_run(find_run(runs_dir, ref)) for ref in refs]
        except LookupError as exc:
            err.print(f"error: {exc}", markup=False)
            return EXIT_USAGE
    else:
        try:
            runs = newest_per_strategy(list_runs(runs_dir))
        except RunsDirError as exc:
            err.print(f"error: {exc}", markup=False)
            return EXIT_FAILED
    if not runs:
        console.print(f"no runs in {runs_dir} to compare", markup=False)
        return EXIT_OK
    print_comparison(console, runs)
    return EXIT_OK


def print_comparison(console: Any, runs: List[Any], title: str = "transfer learning comparison") -> None:
    """The comparison table of `runs`, then what keeps rows from being compared."""
    from rich.table import Table
    from rich.text import Text

    table = Table(*COMPARISON_COLUMNS, title=title)
    rows = comparison_rows(runs)
    for row in rows:
        table.add_row(*(Text(cell) for cell in comparison_cells(row)))
    console.print(table)
    note = comparable_groups(runs)
    if note:
        console.print(f"note: {note}", markup=False)
    for row in rows:
        if row["reason"]:
            console.print(f"unreadable: {row['run']}: {row['reason']}", markup=False)


# ---------------------------------------------------------------------------------------------
# stop


def cmd_stop(runs_dir: str, ref: str, action: str, wait: float) -> int:
    """Write the run's control request, then wait (a spinner line) until its summary no longer
    says "running", and say how it ended."""
    import time

    from core import live
    from core.runner import attach
    from core.store import error_reason, find_run, read_run

    console, err = _console(), _console(stderr=True)
    try:
        path = run_or_experiment(runs_dir, ref)
    except LookupError as exc:
        err.print(f"error: {exc}", markup=False)
        return EXIT_USAGE
    run = read_run(path)
    status = run.summary["status"]
    if status != "running":
        err.print(f"error: run {run.run_id} is not running (status: {status})", markup=False)
        return EXIT_USAGE
    try:
        target = attach(path)
        target.stop() if action == "stop" else target.abort()
    except OSError as exc:
        err.print(f"error: cannot write the request in {path}: {error_reason(exc)}", markup=False)
        return EXIT_FAILED
    wanted = ev.STOPPED if action == "stop" else ev.ABORTED
    asked = time.monotonic()
    try:
        with console.status(f"asked run {run.run_id} to {action}; waiting for it to end..."):
            while status == "running" and time.monotonic() - asked < wait:
                time.sleep(0.1)
                run = read_run(path)
                status = run.summary["status"]
    except KeyboardInterrupt:
        err.print(f"no longer waiting; the request stays in {path / live.CONTROL_FILE}", markup=False)
        return EXIT_ABORTED
    if status == "running":
        err.print(f"run {run.run_id} has not ended after {wait:g} s; the request stays in "
                  f"{path / live.CONTROL_FILE} and the run acts on it after its current step", markup=False)
        return EXIT_FAILED
    message = run.summary["message"]
    line = f"run {run.run_id} {status} after {time.monotonic() - asked:.1f} s" + (f": {message}" if message else "")
    console.print(line, style=ev.STATUS_COLOURS.get(status, "red"), markup=False)
    return EXIT_OK if status == wanted else EXIT_FAILED


# ---------------------------------------------------------------------------------------------
# export, predict


RUN_HELP = "run id, a unique part of one, or the run's folder"


def run_parser(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand that takes a RUN (and --runs-dir, where RUN is looked up)."""
    parser = sub.add_parser(name, **kwargs)
    parser.add_argument("run", metavar="RUN", help=RUN_HELP)
    parser.add_argument("--runs-dir", default="./runs", help="folder holding the runs (default: ./runs)")
    return parser


def add_export_parsers(sub: Any) -> None:
    export = run_parser(sub, "export", help="a run's metrics as CSV, its model as safetensors or ONNX",
                        description="Write a run's metrics as CSV and/or its trained model as a safetensors "
                        "file (weights; class names, backbone, image size, normalisation and run id in its "
                        "metadata) or an ONNX file (the same metadata; checked against OneFlow on the run's test "
                        "images with ONNX Runtime). At least one of --csv, --safetensors, --onnx.")
    export.add_argument("--csv", metavar="PATH", help="the metrics: a row per step and per epoch")
    export.add_argument("--safetensors", metavar="PATH", help="the model's weights with what is needed to use them")
    export.add_argument("--onnx", metavar="PATH", help="the model as ONNX: input one image, (1, 3, S, S) float32 at the run's "
                        "image size S, normalised as in the safetensors metadata; output (1, classes) logits")
    export.add_argument("--checkpoint", choices=("best", "last"),
                        help="which checkpoint (default: best when the run has one, else last)")
    predict = run_parser(sub, "predict", help="classify image files with a run's model",
                         description="The top classes of each image, with probabilities, using the run's "
                         "preprocessing (its image size and normalisation). A file that is not a readable "
                         "image gets one line; the others are still predicted (exit 1 if any failed).")
    predict.add_argument("images", metavar="IMAGE", nargs="+", help="image files (PNG, JPEG...)")
    predict.add_argument("--top-k", type=int, default=5, metavar="K", help="classes shown per image (default: 5)")
    predict.add_argument("--checkpoint", choices=("best", "last"),
                         help="which checkpoint (default: best when the run has one, else last)")
    report = run_parser(sub, "report", help="a run's per-class results: precision, recall, the confusion matrix",
                        description="Per-class precision, recall and accuracy, the confusion matrix (rows: "
                        "true class, columns: predicted) and the most confidently wrong test images of a "
                        "run's latest evaluated epoch (or --epoch N). Exit 2 for a run without per-class "
                        "results (one older than them) or an epoch not recorded.")
    report.add_argument("--epoch", type=int, metavar="N", help="the epoch to show (default: the latest)")


def _run_arg(args: argparse.Namespace) -> Path:
    from core.store import find_run

    try:
        return find_run(args.runs_dir, args.run)
    except LookupError as exc:
        raise UsageError([str(exc)]) from None


def cmd_export(args: argparse.Namespace) -> int:
    """Each output asked for, in the order CSV, safetensors, ONNX; a path printed per file written."""
    from core import export as X
    from core.errors import SetupError
    from core.store import error_reason

    outputs = [p for p in (args.csv, args.safetensors, args.onnx) if p]
    if not outputs:
        raise UsageError(["export needs at least one of --csv PATH, --safetensors PATH, --onnx PATH"])
    for path in outputs:  # before the work (an ONNX export takes a while): the usual mistakes
        try:
            folder, is_dir = Path(path).absolute().parent, Path(path).is_dir()
            if is_dir:
                raise UsageError([f"{path} is a folder: give the path of the file to write"])
            if not folder.is_dir():
                raise UsageError([f"cannot write {path}: no folder {folder}"])
        except (OSError, ValueError) as exc:  # a name too long, a NUL in it
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UsageError([f"cannot write there ({reason}): {path}"]) from None
    run_dir = _run_arg(args)
    console, err = _console(), _console(stderr=True)
    target = ""
    try:
        if args.csv:
            target = args.csv
            rows = X.write_metrics_csv(run_dir, args.csv)
            console.print(f"metrics: {rows} rows -> {args.csv}", markup=False)
        if args.safetensors or args.onnx:
            target = ""
            run = X.load_run_model(run_dir, args.checkpoint)
            if args.safetensors:
                target = args.safetensors
                X.export_safetensors(run, args.safetensors)
                console.print(f"weights ({run.checkpoint} checkpoint) -> {args.safetensors}", markup=False)
            if args.onnx:
                target = args.onnx
                check = X.export_onnx(run, args.onnx)
                console.print(f"ONNX ({run.checkpoint} checkpoint) -> {args.onnx}: checked on {check.source}, "
                              f"max abs difference {check.max_abs_diff:.2g} (tolerance {check.tolerance:.2g} = "
                              f"{X.ONNX_ATOL:g} + {X.ONNX_RTOL:g} x the largest |logit|), "
                              f"{check.seconds:.1f} s", markup=False)
    except SetupError as exc:
        print_setup_error(err, exc)
        return EXIT_FAILED
    except OSError as exc:
        err.print(f"error: cannot write {target}: {error_reason(exc)}", markup=False)
        return EXIT_FAILED
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from core import export as X
    from core.errors import SetupError

    if args.top_k < 1:
        raise UsageError(["--top-k must be 1 or more"])
    run_dir = _run_arg(args)
    console, err = _console(), _console(stderr=True)
    try:
        run = X.load_run_model(run_dir, args.checkpoint)
    except SetupError as exc:
        print_setup_error(err, exc)
        return EXIT_FAILED
    failed = 0
    for p in X.predict(run, args.images, args.top_k):
        if p.error:
            failed += 1
            err.print(f"error: {printable(p.error)}", markup=False)
        else:
            top = ", ".join(f"{printable(name, 40)} {prob:.3f}" for name, prob in p.top)
            console.print(f"{printable(p.path)}: {top}", markup=False)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """The per-class table, the confusion matrix and the wrong images' paths of one epoch."""
    from rich.table import Table
    from rich.text import Text

    from core import insight
    from core.report import CLASS_COLUMNS, CLASS_NOTE, class_cells, short_name, wrong_line

    run_dir = _run_arg(args)
    console, err = _console(), _console(stderr=True)
    recorded = insight.read_class_results(run_dir)
    results = insight.pick_epoch(recorded, args.epoch)
    if results is None:
        if not recorded:
            err.print(f"error: run {printable(run_dir.name)} has no per-class results (it was trained before "
                      f"TransferLab recorded them, has not finished an epoch, or has over {ev.MAX_CLASSES} classes)",
                      markup=False)
        else:
            err.print(f"error: run {printable(run_dir.name)} has no per-class results for epoch {args.epoch}; "
                      f"recorded: {', '.join(str(r.epoch) for r in recorded)}", markup=False)
        return EXIT_USAGE
    names = [printable(c, 40) for c in results.classes]
    total = sum(map(sum, results.matrix))
    correct = sum(results.matrix[i][i] for i in range(len(names)))
    table = Table(*CLASS_COLUMNS, title=Text(f"run {run_dir.name}, epoch {results.epoch}: {correct}/{total} test "
                                             f"images right ({correct / total if total else 0:.4f})"))
    for name, stats in zip(names, insight.class_stats(results)):
        table.add_row(*(Text(cell) for cell in [name, *class_cells(stats)[1:]]))  # names from a file: never markup
    console.print(table)
    console.print(CLASS_NOTE, markup=False, style="dim")
    width = max(4, len(str(max((n for row in results.matrix for n in row), default=0))))
    matrix = Table(title=Text("confusion matrix (rows: true class, columns: predicted)"))
    for header in ["", *(short_name(n, width) for n in names)]:
        matrix.add_column(Text(header), justify="right")
    for i, (name, row) in enumerate(zip(names, results.matrix)):
        matrix.add_row(Text(name), *(Text(str(n), style="bold" if i == j else "") for j, n in enumerate(row)))
    console.print(matrix)
    if results.wrong:
        console.print("most confidently wrong test images:", markup=False)
        for w in results.wrong:
            kept = "" if insight.image_kept(run_dir, w.file) else " (not kept: only the latest epochs' images are)"
            console.print(f"  {printable(str(run_dir / w.file))}{kept}: test image {w.index}, "
                          f"{wrong_line(w, names)}", markup=False)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
