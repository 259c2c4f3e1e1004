"""`transferlab` (and `python -m tui`): the terminal UI, or a core CLI command."""
from __future__ import annotations

import signal
import sys
from typing import Optional, Sequence, Set


def launch(cfg, explicit: Set[str], attach=None) -> int:
    from tui.app import run_app

    return run_app(cfg, explicit, attach=attach)


def plot_sweep(result, color: bool = True) -> str:
    """The LR finder's curve for `transferlab lr-find` (plotext stays out of core)."""
    from tui.lrplot import sweep_text

    return sweep_text(result, color=color)


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Ctrl-C and SIGTERM wait while numpy is imported: its BLAS starts worker threads then, and a
    # thread keeps the signal mask it starts with. Unblocked, they took a Ctrl-C meant for the
    # main thread during oneflow's import (which blocks it in the main thread only), and ran
    # oneflow's half-installed handler there: abort (-6) or segfault (-11) instead of one line.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        try:
            import numpy  # noqa: F401
            from core.cli import main as cli_main
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a Ctrl-C that waited arrives now
        return cli_main(argv, launch_tui=launch, plot_sweep=plot_sweep)
    except (KeyboardInterrupt, ImportError) as exc:  # Ctrl-C before a command set up its own handling
        from core.errors import interrupted

        if not interrupted(exc):
            raise
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
