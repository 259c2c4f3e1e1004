"""The experiment form: one row per RunConfig field, validated as you type by core.config, and
below them how the run is started (in the background, on several processes), which is not part of
the settings a preset holds."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.suggester import SuggestFromList
from textual.widgets import Button, Header, Input, Label, Select, Static

from core import config as C
from core.cli import command_line, launcher_line
from core.config import STRATEGIES, RunConfig
from core.data import batch_count
from core.distributed import DistributedError, Topology, check_batch
from core.schedule import curve
from tui.dialogs import PathScreen
from tui.keybar import KeyBar
from tui.plots import LrPlot

LABELS = {"lr": "learning rate", "lr_backbone": "backbone lr", "limit_train": "train subset",
          "limit_test": "test subset", "image_size": "image size", "batch_size": "batch size",
          "weight_decay": "weight decay", "data_root": "data root", "runs_dir": "runs folder",
          "warmup_epochs": "warmup epochs", "step_every": "step every", "step_gamma": "step gamma",
          "label_smoothing": "label smoothing", "no_wd_bn_bias": "no wd bn/bias",
          "early_stopping": "early stopping", "unfreeze_epoch": "unfreeze epoch"}
CHOICE_FIELDS = {n for n in C.FIELDS if C.FIELDS[n].metadata.get("choices") or C.field_type(n) is bool}
"""Fields shown as a Select (a fixed list of options)."""
SUGGESTIONS = {"dataset": ["cifar10", "digits", "synthetic", "imagefolder:"], "pretrained": ["imagenet", "none"]}
PLACEHOLDERS = {"classes": "all (or 0-4, 5,7,9, cat,dog)"}
"""Shown in an empty field whose emptiness means something."""
MAX_PROCESSES = 64
"""More processes than this on one node is a typing slip, not a machine."""
BACKGROUND_NOTE = "several processes run in background"
PREVIEW_STEPS_PER_EPOCH = 100
"""Steps per epoch of the lr preview when the form cannot know them (no train subset): the
curve over epochs is the same but for the rounding of the warmup to whole steps."""


def lr_curves(cfg: RunConfig) -> Dict[str, Tuple[List[float], List[float]]]:
    """The lr of each param group over the run, in epochs, by core.schedule (as the trainer sets
    it): the head's (or all layers'), and the backbone's where it has its own."""
    per_epoch = batch_count(cfg.limit_train, cfg.batch_size) if cfg.limit_train else PREVIEW_STEPS_PER_EPOCH
    xs, factors = curve(cfg, per_epoch)
    curves = {"lr": (xs, [cfg.lr * f for f in factors])}
    if cfg.strategy == "discriminative" or (cfg.strategy == "frozen" and cfg.unfreeze_epoch):
        start = cfg.unfreeze_epoch - 1 if cfg.strategy == "frozen" else 0
        kept = [(x, cfg.lr_backbone * f) for x, f in zip(xs, factors) if x >= start]
        curves["backbone"] = ([x for x, _ in kept], [y for _, y in kept])
    return curves


def field_widget(name: str, value: Any) -> Any:
    """The input widget for one config field: a Select for choices and yes/no, else an Input."""
    meta = C.FIELDS[name].metadata
    wid = f"f-{name}"
    if meta.get("choices"):
        return Select([(c, c) for c in meta["choices"]], value=value, allow_blank=False, compact=True, id=wid)
    if isinstance(value, bool):
        return Select([("yes", True), ("no", False)], value=value, allow_blank=False, compact=True, id=wid)
    text = C.value_text(value)
    suggester = SuggestFromList(SUGGESTIONS[name], case_sensitive=False) if name in SUGGESTIONS else None
    return Input(text, compact=True, id=wid, suggester=suggester, select_on_focus=False,
                 placeholder=PLACEHOLDERS.get(name, ""))


def parse_processes(text: str) -> int:
    """The "processes" field as a number of processes, or ValueError saying what is wrong."""
    try:
        processes = int(text.strip())
    except ValueError:  # also a number of more than 4,300 digits
        raise ValueError(f"processes must be a whole number, got {C.shown(text.strip())}") from None
    if not 1 <= processes <= MAX_PROCESSES:
        raise ValueError(f"processes must be between 1 and {MAX_PROCESSES}, got {processes}")
    return processes


class FormScreen(Screen):
    """Settings of the next run. Start is refused while anything is invalid."""

    AUTO_FOCUS = "#f-strategy"
    BINDINGS = [
        Binding("ctrl+r", "start", "Start", priority=True),
        Binding("ctrl+s", "save_preset", "Save preset", show=False),  # (in the palette; README)
        Binding("ctrl+o", "load_preset", "Load preset", show=False),
        Binding("ctrl+e", "experiment", "Experiment", priority=True),
        Binding("ctrl+l", "lr_find", "LR finder"),
    ]

    def __init__(self, cfg: RunConfig, notes: List[str]) -> None:
        super().__init__()
        self.cfg = cfg
        self.notes = list(notes)
        self.problems: List[str] = []
        self.preset_path = "preset.toml"
        self._shown: Dict[str, Any] = {}
        self.processes = 1
        """The last valid "processes" value (start is refused while the field is not valid)."""
        self._background_choice = False
        """What the person chose for "in background", kept while several processes force yes."""

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="form-body"):
            with VerticalScroll(id="fields", can_focus=False):
                for name in C.FIELDS:
                    with Horizontal(classes="row", id=f"row-{name}"):
                        yield Label(LABELS.get(name, name), classes="field-label")
                        yield field_widget(name, getattr(self.cfg, name))
                with Vertical(id="launch") as launch:
                    launch.border_title = "launch"
                    with Horizontal(classes="row", id="row-background"):
                        yield Label("in background", classes="field-label")
                        yield Select([("yes", True), ("no", False)], value=False, allow_blank=False,
                                     compact=True, id="f-background")
                    with Horizontal(classes="row", id="row-processes"):
                        yield Label("processes", classes="field-label")
                        yield Input("1", compact=True, id="f-processes", select_on_focus=False)
                    yield Static(id="launch-note")  # always there: its line is laid out before it says anything
            with VerticalScroll(id="side", can_focus=False):
                yield Static(id="problems")
                yield Button("Start  ctrl+r", id="start", variant="success", compact=True)
                yield Static(id="strategy-help")
                yield Static(id="params")
                yield Static(id="notes")
                yield Static(id="command")
                yield LrPlot("learning rate (preview)", xlabel="epoch", id="lr-preview")
        yield KeyBar()

    def on_mount(self) -> None:
        self.sub_title = "new run"
        self.revalidate()

    # -- reading the form -------------------------------------------------------------------------

    def raw_values(self) -> Dict[str, Any]:
        values: Dict[str, Any] = {}
        for name in C.FIELDS:
            widget = self.query_one(f"#f-{name}")
            values[name] = widget.value
        return values

    @property
    def background(self) -> bool:
        """Start the run as a process of its own (always so with several processes)."""
        return bool(self.query_one("#f-background", Select).value)

    def read_launch(self, cfg: Optional[RunConfig]) -> Tuple[Optional[int], List[str]]:
        """The "processes" field (None while it is not a valid number) and its problems, among them
        a batch the processes cannot share evenly (checked only when the config is valid)."""
        try:
            processes = parse_processes(self.query_one("#f-processes", Input).value)
        except ValueError as exc:
            return None, [str(exc)]
        if cfg is not None:
            try:
                check_batch(cfg.batch_size, processes)
            except DistributedError as exc:
                return processes, [str(exc)]
        return processes, []

    def _force_background(self, forced: bool) -> None:
        """Several processes always start in the background: "in background" then shows yes and
        cannot be changed, with a note why; back to one process, it shows what the person chose."""
        select, note = self.query_one("#f-background", Select), self.query_one("#launch-note", Static)
        if forced and not select.disabled:
            self._background_choice = bool(select.value)
            select.value = True
            select.disabled = True
            note.update(BACKGROUND_NOTE)
            note.scroll_visible(animate=False)  # the form's last line: below the fold at 80x24
        elif not forced and select.disabled:
            select.disabled = False
            select.value = self._background_choice
            note.update("")

    def command_text(self) -> str:
        """The "same run headless" panel: the CLI line, and with several processes, dimmed, the
        launcher line that it runs. With several processes the CLI line runs the launcher in the
        terminal, without --detach: `train` refuses --detach with --nproc-per-node."""
        text = "[dim]same run headless:[/dim]\n" + escape(command_line(
            self.cfg, detach=self.background, processes=self.processes))
        if self.processes > 1:
            text += "\n[dim]" + escape(launcher_line(Topology(nproc_per_node=self.processes))) + "[/dim]"
        return text

    def valid_config(self) -> Optional[RunConfig]:
        """The config in the form, or None while anything is invalid."""
        return None if self.problems else self.cfg

    def revalidate(self) -> None:
        problems: List[str] = []
        try:
            cfg = C.from_mapping(self.raw_values())
        except C.ConfigError as exc:
            problems = exc.problems
            cfg = None
        if cfg is not None:
            problems = C.validate(cfg)
            self.cfg = cfg
        processes, launch_problems = self.read_launch(None if problems else cfg)
        if processes is not None:
            self.processes = processes
            self._force_background(processes > 1)
        bad = {p.split(" ")[0] for p in problems} | ({"processes"} if launch_problems else set())
        problems = problems + launch_problems
        self.problems = problems
        for name in [*C.FIELDS, "processes"]:  # set_class and `disabled` do nothing when nothing changes
            self.query_one(f"#row-{name}").set_class(name in bad, "-invalid")
        strategy = self.query_one("#f-strategy", Select).value
        unfreezes = strategy == "frozen" and self.query_one("#f-unfreeze_epoch", Input).value.strip() not in ("", "0")
        self.query_one("#f-lr_backbone").disabled = strategy != "discriminative" and not unfreezes
        stepped = self.query_one("#f-schedule", Select).value == "step"
        for name in ("step_every", "step_gamma"):
            self.query_one(f"#f-{name}").disabled = not stepped
        self._show("#strategy-help", f"[b]{strategy}[/b]: {STRATEGIES.get(strategy, '')}")
        self._show("#problems", "\n".join(f"[red]✗[/red] {escape(p)}" for p in problems) if problems
                   else "[green]✓ ready to start[/green]")
        self._show("#notes", "\n".join(f"[yellow]•[/yellow] {escape(n)}" for n in self.notes))
        self._show("#command", "" if problems else self.command_text())
        self.query_one("#start", Button).disabled = bool(problems)
        if not problems:
            self._preview_lr()
            self._count_params(self.cfg.backbone, self.cfg.strategy, self.cfg.dataset, self.cfg.data_root,
                               self.cfg.classes)

    def _preview_lr(self) -> None:
        """Redraw the lr preview when the settings it depends on changed (the plot is rebuilt
        on its own timer, on the UI thread)."""
        key = tuple(getattr(self.cfg, n) for n in ("schedule", "warmup_epochs", "step_every", "step_gamma",
                                                     "epochs", "lr", "lr_backbone", "strategy",
                                                     "unfreeze_epoch", "limit_train", "batch_size"))
        if self._shown.get("#lr-preview") != key:
            self._shown["#lr-preview"] = key
            self.query_one(LrPlot).set_curves(lr_curves(self.cfg))

    def _show(self, selector: str, text: str) -> None:
        """Update a Static only when its text changes (an update re-lays out the side panel)."""
        if self._shown.get(selector) != text:
            self._shown[selector] = text
            self.query_one(selector, Static).update(text)

    @on(Input.Changed)
    @on(Select.Changed)
    def _changed(self) -> None:
        if self.is_mounted:
            self.revalidate()

    @work(thread=True, exclusive=True, group="params")
    def _count_params(self, backbone: str, strategy: str, dataset: str, data_root: str, subset: str) -> None:
        from core.suggest import class_count, param_counts

        try:
            classes = class_count(dataset, data_root, subset)
            trainable, total = param_counts(backbone, strategy, classes or 10)
            text = (f"trainable parameters [b]{trainable:,}[/b] of {total:,} "
                    f"({100 * trainable / total:.1f}%)" + ("" if classes else " (class count unknown)"))
        except Exception as exc:
            text = escape(f"parameter count unavailable: {exc}")
        self.app.call_from_thread(self.query_one("#params", Static).update, text)

    # -- actions ----------------------------------------------------------------------------------

    @on(Button.Pressed, "#start")
    async def action_start(self) -> None:
        self.revalidate()
        if self.problems:
            self.notify("Fix the settings marked in red first:\n" + "\n".join(self.problems),
                        title="Cannot start", severity="error")
            return
        await self.app.start_run(self.cfg, background=self.background, processes=self.processes)

    def action_experiment(self) -> None:
        """The form's settings trained with several strategies, one after another (asks which)."""
        from core.experiment import ORDER, parse_strategies

        self.revalidate()
        if self.problems:
            self.notify("Fix the settings marked in red first:\n" + "\n".join(self.problems),
                        title="Cannot start", severity="error")
            return

        async def chosen(text: Optional[str]) -> None:
            if not text:
                return
            try:
                strategies = parse_strategies(text)
            except C.ConfigError as exc:
                self.notify("\n".join(exc.problems), title="Experiment", severity="error")
                return
            await self.app.start_experiment(self.cfg, strategies, background=self.background,
                                            processes=self.processes)

        self.app.push_screen(PathScreen("Experiment: strategies, trained one after another:", ",".join(ORDER)), chosen)

    def load_config(self, cfg: RunConfig, note: str = "") -> None:
        """Fill the config fields with `cfg`; how the run is started stays as it was."""
        for name in C.FIELDS:
            widget = self.query_one(f"#f-{name}")
            value = getattr(cfg, name)
            if isinstance(widget, Input):
                widget.value = C.value_text(value)
            else:
                widget.value = value
        if note:
            self.notes = [note]
        self.revalidate()

    def action_lr_find(self) -> None:
        from tui.lrfind import open_lr_finder

        open_lr_finder(self)

    def set_learning_rates(self, cfg: RunConfig) -> None:
        """Put cfg's lr and lr_backbone in their fields (the LR finder's suggestion)."""
        self.query_one("#f-lr", Input).value = C.value_text(cfg.lr)
        self.query_one("#f-lr_backbone", Input).value = C.value_text(cfg.lr_backbone)

    def action_save_preset(self) -> None:
        if self.problems:
            self.notify("Only a valid form can be saved.", severity="error")
            return

        def save(path: Optional[str]) -> None:
            if not path:
                return
            try:
                C.save(self.cfg, path)
            except (OSError, ValueError) as exc:
                self.notify(f"Could not save {path}: {exc}", severity="error")
                return
            self.preset_path = path
            self.notify(f"Saved the settings to {path} (use it with transferlab train --config {path})")

        self.app.push_screen(PathScreen("Save the settings to (.toml or .json):", self.preset_path), save)

    def action_load_preset(self) -> None:
        def load(path: Optional[str]) -> None:
            if not path:
                return
            try:
                cfg = C.load(path)
                unshowable = [p for p in C.validate(cfg) if p.split(" ")[0] in CHOICE_FIELDS]
                if unshowable:  # a Select cannot hold a value that is not among its options
                    raise C.ConfigError(unshowable)
            except C.ConfigError as exc:
                self.notify("\n".join(exc.problems), title=f"Could not load {path}", severity="error")
                return
            self.preset_path = path
            self.load_config(cfg, note=f"Loaded {path}.")
            self.notify(f"Loaded {path}")

        self.app.push_screen(PathScreen("Load settings from (.toml or .json):", self.preset_path), load)
