"""A one-line footer of the active key bindings.

Textual's Footer recomposes a widget per key on every screen switch and binding change; on these
2-core machines that was about 150-200 ms of each F1/F2/F3 switch. This bar shows the same
bindings as one line of text, updated when the screen's bindings change.
"""
from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


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

    def show_bindings(self) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        seen = set()
        palette = self.app.COMMAND_PALETTE_BINDING
        for key, (_node, binding, enabled, _tooltip) in self.screen.active_bindings.items():
            if not binding.show or binding.action in seen or key == palette:
                continue
            seen.add(binding.action)
            text.append(self.app.get_key_display(binding), style="bold" if enabled else "dim")
            text.append(f" {binding.description}  ", style="" if enabled else "dim")
        text.append("^p palette", style="dim")
        self.update(text)
