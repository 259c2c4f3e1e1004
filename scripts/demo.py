"""The tutorial's experiment in miniature, offline (`make demo`): pretrain ResNet-18 from random
weights on the built-in digits 0-4 (presets/demo-pretrain.toml), then train it on digits 5-9 from
100 images with each strategy (presets/transfer-demo.toml), every run starting from step 1's best
checkpoint, and print the comparison. Runs go to the runs folder like any other (the app's runs
screen shows them).

    python scripts/demo.py [--pretrained RUN/checkpoints/best] [--strategies finetune,frozen,...]
                           [--runs-dir DIR]

--pretrained skips step 1 and uses that checkpoint.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import cli  # noqa: E402
from core.config import STRATEGIES  # noqa: E402

PRETRAIN = ROOT / "presets" / "demo-pretrain.toml"
TRANSFER = ROOT / "presets" / "transfer-demo.toml"


def train(runs_dir: str, *flags: str) -> Path:
    """Run `transferlab train FLAGS` in this process; the new run's folder (exits on failure)."""
    root = Path(runs_dir)
    before = set(root.iterdir()) if root.is_dir() else set()
    argv = ["train", *flags, "--runs-dir", runs_dir]
    print("\n$ transferlab " + " ".join(argv[:-2]), flush=True)
    code = cli.main(argv)
    if code != cli.EXIT_OK:
        sys.exit(code)
    (new,) = [p for p in root.iterdir() if p not in before and (p / "config.json").exists()]
    return new


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", help="a checkpoint to transfer from (skips the pretraining)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated (default: all four)")
    parser.add_argument("--runs-dir", default="./runs")
    args = parser.parse_args(argv)
    strategies: List[str] = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        parser.error(f"--strategies must list some of {', '.join(STRATEGIES)}, got {args.strategies!r}")
    start = time.monotonic()
    source = args.pretrained
    if source is None:
        source = str(train(args.runs_dir, "--config", str(PRETRAIN)) / "checkpoints" / "best")
    runs = [train(args.runs_dir, "--config", str(TRANSFER), "--strategy", s, "--pretrained", source).name
            for s in strategies]
    print(f"\npretrained source: {source}")
    cli.cmd_compare(args.runs_dir, runs)
    print(f"demo took {(time.monotonic() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
