"""`transferlab` (and `python -m tui`): the terminal UI, or a core CLI command."""
from __future__ import annotations

import sys
from typing import Optional, Sequence, Set


def launch(cfg, explicit: Set[str], attach=None) -> int:
    from tui.app import run_app

    return run_app(cfg, explicit, attach=attach)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        from core.cli import main as cli_main

        return cli_main(argv, launch_tui=launch)
    except KeyboardInterrupt:  # Ctrl-C before a command set up its own handling
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
