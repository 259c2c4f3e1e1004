"""All runs in the runs folder: a table, overlaid curves of the selected runs, a comparison."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Header, Label, Static

from core import events as ev
from core.report import (COMPARISON_COLUMNS, comparable_groups, comparison_cells, comparison_rows,
                         newest_per_strategy, run_row)
from core.live import HEARTBEAT_FILE, STALE_SECONDS
from core.experiment import list_experiments
from core.store import RunRecord, RunsDirError, list_runs, read_events
from tui.dialogs import ChoiceScreen, PathScreen
from tui.insight import InsightScreen
from tui.keybar import KeyBar
from tui.plots import CONTROL_KEYS, AccuracyPlot, LossPlot, PlotControlsMixin, palette_commands, spare_bindings


WATCH_SECONDS = 2.0
"""While the runs screen is shown, its folder is looked at this often (a stat per run) and the
table rebuilt only when something changed."""


class CompareScreen(ModalScreen):
    """The tutorial's comparison: strategy -> final test accuracy, difference to scratch."""

    BINDINGS = [Binding("escape,c,q", "close", "Close")]

    def __init__(self, runs: List[RunRecord], title: str = "") -> None:
        super().__init__()
        self.runs = runs
        self.title_text = title

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label(f"[b]{escape(self.title_text) or 'Transfer learning comparison'}[/b] "
                        "(final test accuracy; Esc closes)")
            yield DataTable(id="compare-table", cursor_type="row")
            yield Static(escape(comparable_groups(self.runs)), id="compare-note")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns(*COMPARISON_COLUMNS)
        for row in comparison_rows(self.runs):
            table.add_row(*map(escape, comparison_cells(row)))  # names read from files are not markup

    def action_close(self) -> None:
        self.dismiss()


class RunsScreen(PlotControlsMixin, Screen):
    """Every run; space selects runs to overlay, enter opens one, c compares."""

    BINDINGS = [
        Binding("space", "toggle_select", "Select"),
        Binding("enter", "open", "Open"),
        Binding("c", "compare", "Compare"),
        Binding("e", "edit", "Edit & rerun"),
        Binding("R", "resume", "Resume"),
        Binding("x", "experiment", "Experiment"),
        Binding("E", "export", "Export"),
        Binding("i", "insight", "Classes", show=False),  # (in the hint line: the bar is full at 80 columns)
        Binding("g", "reload", "Reload", show=False),  # (it reloads by itself while shown)
        *spare_bindings(CONTROL_KEYS),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.runs: List[RunRecord] = []
        self.selected: Set[str] = set()
        self.curves: Dict[str, tuple] = {}
        self._reading: Set[str] = set()
        self._seen: tuple = ()
        self.experiments: Dict[str, Any] = {}
        """Run id -> the experiment it belongs to (core.experiment)."""

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="runs-body"):
            yield DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
            yield Static("", id="runs-hint")
            with Horizontal(id="overlay"):
                yield LossPlot("smoothed loss per step", overlay=True, id="overlay-loss")
                yield AccuracyPlot("test accuracy per epoch", id="overlay-acc")
        yield KeyBar()

    def on_mount(self) -> None:
        self.sub_title = "runs"
        table = self.query_one(DataTable)
        table.add_column("✓", key="sel", width=1)
        for label in ("run", "strategy", "dataset", "lr", "epochs", "best acc", "status", "time", "experiment"):
            table.add_column(label, key=label)
        self.reload()
        self.set_controls(self.app.plot_controls)
        self.set_interval(WATCH_SECONDS, self._watch)

    def on_screen_resume(self) -> None:  # (PlotControlsMixin's too: Textual calls each class's handler)
        self.reload(only_if_changed=True)

    def palette_commands(self) -> list:
        return palette_commands(self, CONTROL_KEYS)

    def _watch(self) -> None:
        """While shown, follow runs of other processes starting, ending or dying."""
        if self.is_current:
            self.reload(only_if_changed=True)

    def _signature(self) -> tuple:
        """Which run folders exist, when their summaries last changed, and whether their
        heartbeats are fresh (a run whose process died changes no file: only time tells)."""
        try:
            root = Path(self.app.runs_dir).expanduser()
            entries = sorted(root.iterdir()) if root.is_dir() else []
        except (OSError, RuntimeError):  # RuntimeError: ~user without a home
            return ()
        out, now = [], time.time()
        for path in entries:
            try:
                changed = (path / "summary.json").stat().st_mtime_ns
            except OSError:
                continue
            try:
                beat = "fresh" if now - (path / HEARTBEAT_FILE).stat().st_mtime < STALE_SECONDS else "stale"
            except OSError:
                beat = "none"
            out.append((path.name, changed, beat))
        return tuple(out)

    def reload(self, only_if_changed: bool = False) -> None:
        signature = self._signature()
        if only_if_changed and signature == self._seen:
            return  # nothing new: skip the table rebuild and the replot
        self._seen = signature
        table = self.query_one(DataTable)
        try:
            self.runs = list_runs(self.app.runs_dir)
        except RunsDirError as exc:
            self.runs = []
            self.notify(str(exc), severity="error")
        self.experiments = {run_id: exp for _, exp, _ in list_experiments(self.app.runs_dir) if exp is not None
                            for run_id in exp.runs.values()}
        row_key = None
        if table.row_count and table.cursor_row < table.row_count:
            row_key = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value
        table.clear()
        for run in reversed(self.runs):  # newest first
            row = run_row(run)
            cells = [row[c] for c in ("run", "strategy", "dataset", "lr", "epochs", "best test acc", "status", "duration")]
            exp = self.experiments.get(run.run_id)
            cells.append(exp.id if exp is not None else "")
            table.add_row("✓" if run.run_id in self.selected else "", *map(escape, cells), key=run.run_id)
        if row_key is not None and row_key in {r.run_id for r in self.runs}:
            table.move_cursor(row=table.get_row_index(row_key))
        self._update_hint()
        self._replot()

    def _update_hint(self) -> None:
        self.query_one("#runs-hint", Static).update(
            f"{len(self.runs)} run(s) in {escape(str(self.app.runs_dir))} · space: select to overlay ({len(self.selected)} "
            f"selected) · enter: open · c: compare · e: edit & rerun · R: resume · x: experiment · E: export · i: classes" if self.runs else
            f"No runs in {escape(str(self.app.runs_dir))} yet: start one from the form (F1, then ctrl+r).")

    def current(self) -> RunRecord | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value
        return next((r for r in self.runs if r.run_id == key), None)

    def readable_current(self) -> RunRecord | None:
        """The run under the cursor, or None (with a toast saying why) when it is unreadable."""
        run = self.current()
        if run is not None and run.unreadable:
            self.notify(f"{run.run_id} is unreadable: {run.reason}", title="Unreadable run", severity="warning")
            return None
        return run

    def action_toggle_select(self) -> None:
        run = self.readable_current()
        if run is None:
            return
        self.selected.symmetric_difference_update({run.run_id})
        table = self.query_one(DataTable)
        table.update_cell(run.run_id, "sel", "✓" if run.run_id in self.selected else "")
        self._update_hint()
        self._replot()

    class CurvesRead(Message):
        """A run's curves, read from its metrics.jsonl off the UI thread."""

        def __init__(self, run_id: str, mtime: float, steps: tuple, accs: list, error: str = "") -> None:
            super().__init__()
            self.run_id, self.mtime, self.steps, self.accs, self.error = run_id, mtime, steps, accs, error

    def _curves(self, run: RunRecord, load: bool = True) -> Optional[tuple]:
        """((global steps, losses, steps per epoch), test accuracy per epoch) of a run, or None until
        they are read.

        A run's metrics are read once per version of its file, in a thread (20,000 steps take
        ~0.2 s to parse, too long for the UI thread). With `load`, a missing or out-of-date
        version is read; the one at hand, if any, is returned meanwhile."""
        metrics = run.path / "metrics.jsonl"
        try:
            mtime = metrics.stat().st_mtime
        except OSError:
            mtime = 0
        cached = self.curves.get(run.run_id)
        if load and (cached is None or cached[0] != mtime) and run.run_id not in self._reading:
            self._reading.add(run.run_id)
            self._read_curves(run.run_id, run.path, mtime)
        return None if cached is None else cached[1:]

    @work(thread=True, exit_on_error=False, group="curves")
    def _read_curves(self, run_id: str, path: Path, mtime: float) -> None:
        steps, losses, accs, per_epoch = [], [], [], 0
        try:
            for event in ev.as_one_run(read_events(path)):
                if isinstance(event, ev.RunStarted):
                    per_epoch = event.steps_per_epoch
                elif isinstance(event, ev.StepEnded):
                    steps.append(event.global_step)
                    losses.append(event.loss)
                elif isinstance(event, ev.EpochEnded):
                    accs.append((event.epoch, event.test_acc))
        except Exception as exc:  # an unreadable file is a message, not a crash
            self.post_message(self.CurvesRead(run_id, mtime, ([], [], 0), [], f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(self.CurvesRead(run_id, mtime, (steps, losses, per_epoch), accs))

    @on(CurvesRead)
    def _curves_read(self, message: CurvesRead) -> None:
        self._reading.discard(message.run_id)
        self.curves[message.run_id] = (message.mtime, message.steps, message.accs)
        if message.error:
            self.notify(f"{message.run_id}: metrics unreadable: {message.error}", severity="warning")
        if message.run_id in self.selected:
            self._replot(load=False)
            for plot in ("#overlay-loss", "#overlay-acc"):
                self.query_one(plot).redraw_now()  # now, not on the next tick: the read took a while

    def _replot(self, load: bool = True) -> None:
        """Overlay the selected runs' curves: each series in one call, drawn once."""
        loss, acc = self.query_one("#overlay-loss", LossPlot), self.query_one("#overlay-acc", AccuracyPlot)
        loss.reset()
        acc.reset()
        waiting = 0
        for run in self.runs:
            if run.run_id not in self.selected or run.unreadable:
                continue
            curves = self._curves(run, load)
            if curves is None:
                waiting += 1
                continue
            label = f"{run.config.strategy} {run.run_id[9:15]}"
            (steps, losses, per_epoch), accs = curves
            loss.extend(label, steps, losses)
            loss.set_steps_per_epoch(label, per_epoch)
            for epoch, value in accs:
                acc.add(label, epoch, value)
        loss.set_note(f"loading {waiting} run(s)..." if waiting else "")

    def action_open(self) -> None:
        """Open the run under the cursor: this app's own live run on the dashboard (F2), a run
        trained elsewhere attached (followed as it grows), any other one replayed."""
        run = self.readable_current()
        if run is None:
            return
        own = getattr(self.app, "live", None)
        if own is not None and own.run_id == run.run_id and self.app.running:
            self.app.switch_mode("dashboard")
            return
        self.open_run(run.path, run.summary["status"] == "running")

    def open_run(self, path: Path, running: bool) -> None:
        """A dashboard over this screen on the run in `path`: attached to it while it trains
        (core.runner.attach), else replayed."""
        from core.runner import attach
        from tui.dashboard import DashboardScreen

        self.app.push_screen(DashboardScreen(run=attach(path)) if running else DashboardScreen(run_dir=path))

    @on(DataTable.RowSelected)
    def _row_selected(self) -> None:
        self.action_open()

    def action_compare(self) -> None:
        chosen = [r for r in self.runs if r.run_id in self.selected and not r.unreadable]
        chosen = chosen or newest_per_strategy(self.runs)
        if not chosen:
            self.notify("No finished runs to compare yet.", severity="warning")
            return
        self.app.push_screen(CompareScreen(chosen))

    async def action_edit(self) -> None:
        run = self.readable_current()
        if run is not None:
            await self.app.edit_config(run.config)

    async def action_resume(self) -> None:
        """Continue the run under the cursor from its last checkpoint (the app says why not)."""
        run = self.readable_current()
        if run is not None:
            await self.app.start_run(resume=run.path)

    def select_only(self, run_ids: Set[str]) -> None:
        """Select exactly these runs (their curves overlaid)."""
        self.selected = {r.run_id for r in self.runs if r.run_id in run_ids}
        table = self.query_one(DataTable)
        for run in self.runs:
            table.update_cell(run.run_id, "sel", "✓" if run.run_id in self.selected else "")
        self._update_hint()
        self._replot()

    async def action_experiment(self) -> None:
        """The experiment of the run under the cursor: its runs overlaid and compared when it is
        complete; followed when another process trains it now; else continued (a paused
        experiment goes on where it stopped, in the background when the form says so)."""
        from core.experiment import ExperimentError

        run = self.current()
        exp = self.experiments.get(run.run_id) if run is not None else None
        if exp is None:
            self.notify("This run is not part of an experiment (start one from the form: ctrl+e).",
                        severity="warning")
            return
        if exp.held_elsewhere():  # trained by another process now: follow it
            await self.app.follow_experiment(exp)
            return
        try:
            todo = exp.plan()
        except ExperimentError as exc:
            self.notify(str(exc), title="Experiment", severity="warning", timeout=8)
            return
        if todo:
            form = self.app.mode_screen("form")
            await self.app.start_experiment(exp=exp, background=form.background, processes=form.processes)
        else:
            self.app._show_experiment(exp)

    def action_insight(self) -> None:
        """The per-class results of the run under the cursor (followed while it runs)."""
        run = self.readable_current()
        if run is not None:
            self.app.push_screen(InsightScreen(run.path, follow=run.summary["status"] == "running"))

    def action_reload(self) -> None:
        self.reload()

    EXPORTS = [("c", "metrics as CSV", "--csv", "csv"), ("s", "weights as safetensors", "--safetensors", "safetensors"),
               ("o", "model as ONNX (checked with ONNX Runtime)", "--onnx", "onnx")]
    """(key, what, flag of `transferlab export`, file suffix) of each export offered."""

    def action_export(self) -> None:
        """Ask what to export of the run under the cursor and where, then export it (export_run)."""
        run = self.readable_current()
        if run is None:
            return

        def chosen(key: str) -> None:
            export = next((e for e in self.EXPORTS if e[0] == key), None)
            if export is None:
                return
            default = str(Path.cwd() / f"{run.run_id}.{export[3]}")
            self.app.push_screen(PathScreen(f"Export the {export[1]} of {escape(run.run_id)} to:", default),
                                 lambda path: path and self.export_run(run.path, export[2], path))

        self.app.push_screen(ChoiceScreen(f"Export {escape(run.run_id)}: what?",
                                          [(key, what) for key, what, _, _ in self.EXPORTS]), chosen)

    class Exported(Message):
        """An export ended: `ok`, and its output line (the path written) or its error line."""

        def __init__(self, ok: bool, text: str) -> None:
            super().__init__()
            self.ok, self.text = ok, text

    @work(thread=True, exit_on_error=False, group="export")
    def export_run(self, run_dir: Path, flag: str, path: str) -> None:
        """`transferlab export RUN FLAG PATH` in a process of its own: the ONNX export compiles an
        nn.Graph, which OneFlow does only on a main thread, and the UI thread never calls OneFlow.
        One path for every kind keeps the app and the CLI from drifting."""
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        target = str(Path(path).expanduser().absolute())
        try:
            done = subprocess.run([sys.executable, "-m", "core.cli", "export", str(run_dir.absolute()), flag, target],
                                  capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
        except OSError as exc:
            self.post_message(self.Exported(False, f"cannot start the export: {exc}"))
            return
        ok = done.returncode == 0
        lines = [line for line in (done.stdout if ok else done.stderr).splitlines()
                 if line.strip() and not line.startswith(("W20", "E20", "I20", "libibverbs"))]  # OneFlow's log
        errors = [line for line in lines if line.startswith("error:")]
        self.post_message(self.Exported(ok, (lines[-1:] if ok else errors[:1] or lines[-1:] or
                                             [f"transferlab export ended with exit code {done.returncode}"])[0]))

    @on(Exported)
    def _exported(self, message: Exported) -> None:
        self.notify(message.text, title="Exported" if message.ok else "Export failed", markup=False,
                    severity="information" if message.ok else "error", timeout=10)
