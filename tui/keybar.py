"""A one-line footer of the active key bindings.

Textual's Footer recomposes a widget per key on every screen switch and binding change; on these
2-core machines that was about 150-200 ms of each F1/F2/F3 switch. This bar shows the same
bindings as one line of text, updated when the screen's bindings change.
"""
from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


MODE_KEYS = ("f1", "f2", "f3")
"""Shown without their descriptions when even the short form does not fit (80 columns, many keys)."""
SPARE = "spare-"
"""A binding whose id starts with this is shown only where there is room: left out, last first,
before anything else is shortened further (it must be in the command palette too)."""


class KeyBar(Static):
    DEFAULT_CSS = """
    KeyBar { dock: bottom; height: 1; background: $footer-background; color: $footer-foreground;
             padding: 0 1; }
    """

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, lambda _screen: self.show_bindings())
        self.show_bindings()

    def on_unmount(self) -> None:
        self.screen.bindings_updated_signal.unsubscribe(self)

    def on_resize(self) -> None:
        self.show_bindings()

    def show_bindings(self) -> None:
        """Every shown binding as "key description"; when that does not fit the width, the
        short form ("key first-word", single spaces), then without the spare keys (SPARE), and
        then f1 f2 f3 without their words, so that no key is cut off at 80 columns."""
        entries, seen, spare = [], set(), []
        palette = self.app.COMMAND_PALETTE_BINDING
        for key, (_node, binding, enabled, _tooltip) in self.screen.active_bindings.items():
            if not binding.show or binding.action in seen or key == palette:
                continue
            seen.add(binding.action)
            entries.append((self.app.get_key_display(binding), binding.description, enabled))
            spare.append((binding.id or "").startswith(SPARE))
        width = self.size.width - 2 if self.size.width else 1_000
        full = sum(len(k) + len(d) + 3 for k, d, _ in entries) + len("^p palette")
        short = full > width
        if short:
            entries = [(k, d.split(" ")[0], e) for k, d, e in entries]
        while sum(len(k) + len(d) + 2 for k, d, _ in entries) > width and any(spare):
            last = len(spare) - 1 - spare[::-1].index(True)
            del entries[last], spare[last]
        if sum(len(k) + len(d) + 2 for k, d, _ in entries) > width:  # still too wide: the screens' keys
            entries = [(k, "" if k in MODE_KEYS else d, e) for k, d, e in entries]  # (f1 f2 f3 are known)
        text = Text(no_wrap=True, overflow="ellipsis")
        for key, description, enabled in entries:
            text.append(key, style="bold" if enabled else "dim")
            text.append((f" {description}" if description else "") + (" " if short else "  "),
                        style="" if enabled else "dim")
        if not short or text.cell_len + len("^p palette") <= width:
            text.append("^p palette", style="dim")
        self.update(text)
