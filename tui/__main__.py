"""`transferlab` (and `python -m tui`): the terminal UI, or a core CLI command."""
from __future__ import annotations

import sys
from typing import Optional, Sequence, Set


def launch(cfg, explicit: Set[str]) -> int:
    from tui.app import run_app

    return run_app(cfg, explicit)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from core.cli import main as cli_main

    return cli_main(argv, launch_tui=launch)


if __name__ == "__main__":
    sys.exit(main())
