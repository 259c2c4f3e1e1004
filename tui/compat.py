"""Workarounds that reach into private parts of libraries: all of them, in one place.

Written for textual 8.2.8, plotext 5.3.2 and textual-plotext 1.0.1 (pinned in pyproject.toml).
When a pin moves, check each function here against the new version; the tests that notice a
change are named beside each one.
"""
from __future__ import annotations

from typing import Optional

from textual.app import App
from textual.screen import Screen


class InstantSwitchApp(App):
    """An App whose mode switches (F1/F2/F3) draw the whole screen in their first frame.

    Textual 8.2.8 holds every repaint for 50 ms after `switch_mode` (`delay_update`, to hide a
    half-built screen), then draws only the widgets that changed while the screen was away over
    what the last screen left on the terminal: 60-80 ms per switch, 200+ ms while training. A
    screen that exists is complete: skip the hold and mark its whole region dirty.
    Guarded by tests/test_tui.py::test_screens_are_built_at_start_and_switch_in_one_whole_frame.
    """

    _switch_at_once = False

    def switch_mode(self, mode: str):
        stack = self._screen_stacks.get(mode)  # private: the screens of each mode
        self._switch_at_once = bool(stack) and mode != self.current_mode
        if self._switch_at_once:
            stack[-1]._compositor._dirty_regions.add(self.size.region)  # private: redraw all of it
        try:
            return super().switch_mode(mode)
        finally:
            self._switch_at_once = False

    def delay_update(self, delay: float = 0.05) -> None:
        if not self._switch_at_once:
            super().delay_update(delay)

    async def build_mode(self, mode: str) -> None:
        """Create a mode's screen now (Textual does it on the first switch to it), so that the
        first switch does not wait for it and the CSS it brings."""
        await self._init_mode(mode)  # private

    def mode_screen(self, mode: str) -> Optional[Screen]:
        """The base screen of `mode`, or None while it is not built."""
        stack = self._screen_stacks.get(mode)  # private
        return stack[0] if stack else None


def build_plotext_matrix(plot, width: int, height: int, theme: str):
    """What plotext's `build()` does before it turns the figure into an ANSI string: size,
    theme, layout and the character matrix (returned: plot.monitor.matrix). Skipping the ANSI
    string (which textual-plotext would parse back) saves 40% of a redraw.
    Guarded by tests/test_tui.py::test_plots_draw_exactly_what_plotext_draws."""
    plot.plotsize(width, height)
    plot._set_size(width, height)  # private (plotext 5.3.2)
    plot.theme(theme)
    plot._set_sizes()  # private
    plot._build_matrix()  # private
    return plot.monitor.matrix
