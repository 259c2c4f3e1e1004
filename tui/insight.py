"""Where a run's model fails: its confusion matrix as a heat map with class names, per-class
precision / recall / accuracy, and its most confidently wrong test images as pictures.

Opened with `i` from the dashboard (the run shown; its latest epoch, updated by the dashboard as
the run evaluates) and from the runs screen (the run under the cursor; followed while it runs).
The run's files are read in thread workers, never on the UI thread: its metrics.jsonl through
core.insight.read_class_results, its pictures through core.insight.read_wrong_image (confined to
the run's wrong/ folder, size-bounded). A bad file is one line on the screen.

Pictures: textual-image picks sixel or the kitty graphics protocol where the terminal answers that
it has them, half-block characters on other terminals, and plain Unicode when stdout is not a
terminal (tests). It asks the terminal when it is imported, which must be before Textual starts
(Textual then reads stdin): this module is imported with the dashboard and the runs screen, which
the app imports when it is built.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

from rich.color import Color
from rich.markup import escape
from rich.style import Style
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container, Horizontal, ScrollableContainer, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Header, Label, Static
from textual_image.widget import Image as Picture

from core import events as ev
from core import insight
from core.errors import printable
from core.report import CLASS_COLUMNS, CLASS_NOTE, class_cells, short_name, wrong_line
from tui.keybar import KeyBar

FOLLOW_SECONDS = 3.0
"""A running run opened from the runs screen: its summary.json is looked at this often (a stat),
and its metrics read again (in a thread) when it changed (the run store rewrites it at each
epoch's end, right after the epoch's ClassResults line, and at most every 30 s otherwise)."""
PICTURE_PIXELS = 64
"""Pictures smaller than this are enlarged to it, pixels kept square and sharp (digits are 8 px)."""
TABLE_WIDTH = 50
"""The per-class table's width: beside the heat map when both fit, else below it."""
NAME_WIDTH = 12
"""Class names in the heat map's rows are cut to this many characters."""


def heat_map(results: ev.ClassResults) -> Text:
    """The confusion matrix as text: a row per true class, a column per predicted class, each
    cell its count on a background as strong as its share of the row (green on the diagonal,
    red off it). Columns are headed by the class names when they fit the cells, else by the
    classes' numbers, which then also start the rows (the table beside lists the names)."""
    names = [printable(c, 80) for c in results.classes]
    biggest = max((n for row in results.matrix for n in row), default=0)
    cell = max(3, len(str(biggest))) + 1
    numbered = any(len(n) > cell - 1 for n in names)
    if numbered:
        cell = max(cell, len(str(len(names) - 1)) + 1)
        digits = len(str(len(names) - 1))
        names = [f"{i:>{digits}} {n}" for i, n in enumerate(names)]
    label = max(3, min(NAME_WIDTH, max(len(n) for n in names)))
    text = Text(no_wrap=True)
    corner = "t\\p"
    text.append(f"{corner:>{label}}"[:label] + " ", style="dim")
    for i, name in enumerate(names):
        text.append(f"{str(i) if numbered else name:>{cell - 1}} ", style="bold")
    text.append("\n")
    for i, (name, row) in enumerate(zip(names, results.matrix)):
        text.append(f"{short_name(name, label):>{label}} ", style="bold")
        total = sum(row) or 1
        for j, n in enumerate(row):
            share = n / total
            base = (40, 160, 60) if i == j else (200, 50, 50)
            if n == 0:
                style = Style(color="grey50")
            else:
                level = 0.25 + 0.75 * share
                bg = Color.from_rgb(*(int(30 + (c - 30) * level) for c in base))
                style = Style(color="white", bgcolor=bg, bold=i == j)
            text.append(f"{n:>{cell - 1}} ", style=style)
        text.append("\n")
    text.rstrip()
    return text


class WrongCard(Vertical):
    """One confidently wrong image: its picture and "true X, predicted Y (p=0.93)"."""

    DEFAULT_CSS = """
    WrongCard { width: 20; height: 11; }
    WrongCard Image { width: 16; height: 8; }
    WrongCard .wrong-missing { width: 16; height: 8; color: $text-muted; }
    WrongCard .wrong-text { width: 20; height: auto; }
    """

    def __init__(self, picture: Any, caption: str) -> None:
        super().__init__()
        self.picture, self.caption = picture, caption

    def compose(self) -> ComposeResult:
        if isinstance(self.picture, str):  # why it could not be read
            yield Static(escape(self.picture), classes="wrong-missing")
        else:
            yield Picture(self.picture)
        yield Static(escape(self.caption), classes="wrong-text")


class InsightScreen(Screen):
    """Per-class results of one run: heat map, per-class table, wrong images."""

    CSS_PATH = "insight.tcss"
    BINDINGS = [Binding("escape", "close", "Close")]

    class Loaded(Message):
        """A run's per-class results read off the UI thread (the latest epoch's, or why not)."""

        def __init__(self, results: Optional[ev.ClassResults], error: str = "", mtime: float = 0.0) -> None:
            super().__init__()
            self.results, self.error, self.mtime = results, error, mtime

    class PicturesRead(Message):
        """The pictures of an epoch's wrong images (a PIL image each, or why it is missing)."""

        def __init__(self, epoch: int, pictures: List[Any]) -> None:
            super().__init__()
            self.epoch, self.pictures = epoch, pictures

    def __init__(self, run_dir: Optional[Path], results: Optional[ev.ClassResults] = None,
                 follow: bool = False, live: bool = False) -> None:
        """`results`: the latest known (the dashboard's), else they are read from `run_dir`;
        `follow`: the run trains elsewhere (runs screen): read again as it evaluates; `live`: it
        trains and its dashboard calls show_results (no results yet is then no surprise)."""
        super().__init__()
        self.run_dir, self.results, self.follow, self.live = run_dir, results, follow, live or follow
        self._mtime = 0.0
        self._heat_width = 0

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="insight-body"):
            yield Static("loading...", id="insight-title")
            with Horizontal(id="insight-top"):
                with ScrollableContainer(id="heat-box"):
                    yield Static("", id="heat-map")
                # not focusable: the arrow keys scroll the page (down to the pictures at 80x24)
                yield DataTable(id="class-table", cursor_type="none", zebra_stripes=True)
            yield Static(escape(CLASS_NOTE), id="class-note")
            yield Label("", id="wrong-title")
            yield Container(id="wrong-grid")
        yield KeyBar()

    def on_mount(self) -> None:
        self.sub_title = "per-class results"
        table = self.query_one(DataTable)
        table.can_focus = False
        table.add_columns(*CLASS_COLUMNS)
        if self.results is not None:
            self.show_results(self.results)
        elif self.run_dir is not None:
            self._read(self.run_dir)
        else:
            self._say("No run shown yet: start one (F1) or open one (F3).")
        if self.follow:
            self.set_interval(FOLLOW_SECONDS, self._poll)
        self._fit()

    def on_resize(self) -> None:
        self._fit()

    def _fit(self) -> None:
        """Heat map and table side by side when there is room, else one above the other; as
        many picture cards per row as fit."""
        width = self.size.width
        heat = self._heat_width + 4  # (its scroll bar and margin)
        self.query_one("#insight-top").set_class(width - 2 < heat + TABLE_WIDTH, "narrow")
        self.query_one("#wrong-grid").styles.grid_size_columns = max(1, (width - 2) // 21)

    def _say(self, text: str) -> None:
        self.query_one("#insight-title", Static).update(text)

    # -- reading (threads) --------------------------------------------------------------------

    @work(thread=True, exclusive=True, exit_on_error=False, group="insight-read")
    def _read(self, run_dir: Path) -> None:
        try:
            mtime = (run_dir / "summary.json").stat().st_mtime
        except OSError:
            mtime = 0.0
        try:
            results = insight.pick_epoch(insight.read_class_results(run_dir))
        except Exception as exc:  # an unreadable file is a line on the screen, not a crash
            self.post_message(self.Loaded(None, f"{type(exc).__name__}: {exc}", mtime))
            return
        self.post_message(self.Loaded(results, "", mtime))

    def _poll(self) -> None:
        try:
            mtime = (self.run_dir / "summary.json").stat().st_mtime
        except OSError:
            return
        if mtime != self._mtime:
            self._mtime = mtime
            self._read(self.run_dir)

    @on(Loaded)
    def _loaded(self, message: Loaded) -> None:
        self._mtime = message.mtime or self._mtime
        if message.error:
            self._say(f"[b red]per-class results unreadable[/b red]: {escape(printable(message.error))}")
        elif message.results is None:
            self._say("No per-class results in this run: they are recorded at each evaluation (runs trained "
                      f"before TransferLab recorded them, and runs of over {ev.MAX_CLASSES} classes, have none)."
                      if not self.live else
                      "No per-class results yet: they come with the run's first evaluation.")
        elif self.results is None or message.results.epoch >= self.results.epoch:
            self.show_results(message.results)

    @work(thread=True, exclusive=True, exit_on_error=False, group="insight-pictures")
    def _read_pictures(self, run_dir: Path, results: ev.ClassResults) -> None:
        from PIL import Image

        pictures: List[Any] = []
        for wrong in results.wrong:
            try:
                picture = insight.read_wrong_image(run_dir, wrong.file)
                if max(picture.size) < PICTURE_PIXELS:
                    scale = PICTURE_PIXELS // max(picture.size)
                    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
                pictures.append(picture)
            except ValueError as exc:
                pictures.append(printable(str(exc), 120))
        self.post_message(self.PicturesRead(results.epoch, pictures))

    # -- showing (UI thread) --------------------------------------------------------------------

    def show_results(self, results: ev.ClassResults) -> None:
        """Show `results` (the dashboard calls this as the run evaluates); the pictures follow
        from a thread."""
        self.results = results
        total = sum(map(sum, results.matrix))
        right = sum(results.matrix[i][i] for i in range(len(results.classes)))
        name = self.run_dir.name if self.run_dir is not None else "the run"
        self._say(f"[b]{escape(name)}[/b], epoch {results.epoch}: {right}/{total} test images right "
                  f"({right / total if total else 0:.4f}) · rows: true class, columns: predicted")
        text = heat_map(results)
        self._heat_width = max(line.cell_len for line in text.split())
        self.query_one("#heat-map", Static).update(text)
        self._fit()
        table = self.query_one(DataTable)
        table.clear()
        for stats in insight.class_stats(results):
            cells = class_cells(stats)
            table.add_row(escape(printable(cells[0], 40)), *cells[1:])
        self.query_one("#wrong-title", Label).update(
            f"[b]Most confidently wrong[/b] ({len(results.wrong)} test images)" if results.wrong
            else "No test image was predicted wrong.")
        grid = self.query_one("#wrong-grid")
        grid.remove_children()
        if results.wrong and self.run_dir is not None:
            self._read_pictures(self.run_dir, results)

    @on(PicturesRead)
    def _pictures_read(self, message: PicturesRead) -> None:
        if self.results is None or message.epoch != self.results.epoch:
            return  # an older epoch's, overtaken
        grid = self.query_one("#wrong-grid")
        grid.remove_children()
        names = [printable(c, 40) for c in self.results.classes]
        grid.mount_all(WrongCard(picture, wrong_line(wrong, names).replace(", ", ",\n").replace(" (", "\n("))
                       for wrong, picture in zip(self.results.wrong, message.pictures))

    def action_close(self) -> None:
        self.dismiss()
