"""UI latency during training, and training throughput: TUI vs CLI vs the tutorial's own loop.

Runs, side by side on this machine, the same digits run (ResNet-18, random init, 32 px, batch 64):

1. the TUI in a real terminal (tmux, 120x36): while it trains, presses `r` (toggle the raw loss
   curve) N times and F3, F1, F2 (runs, form, dashboard) N times each, and measures
   key-press-to-screen latency: after the key is sent, each time the app writes to the
   terminal (tmux pipe-pane) the screen is read (tmux capture-pane, ~5 ms) until it shows the
   change;
2. the same run through `transferlab train` (the headless CLI);
3. the tutorial's own pipeline: its per-image PIL transforms in a DataLoader (num_workers=4) and
   its training loop, on the same images, model and optimizer.

Prints p50/p95/max latency (target: p95 < 100 ms) and the throughput ratios.
Usage: .venv/bin/python benchmarks/ui_latency.py [--presses 40] [--epochs 6]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("transferlab"))
ARGS = ["--dataset", "digits", "--pretrained", "none", "--image-size", "32", "--batch-size", "64",
        "--device", "cpu"]
SESSION = "transferlab-bench"


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def screen() -> str:
    return tmux("capture-pane", "-p", "-t", SESSION)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate(screen()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}:\n{screen()}")
        time.sleep(0.05)


def step_rates(run_dir: Path) -> list:
    """images/s of every StepEnded after each epoch's first step (start-up excluded)."""
    rates = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["event"] == "StepEnded" and record["step"] > 1:
            rates.append(record["images_per_sec"])
    return rates


class PaneOutput:
    """Counts the chunks the app writes to its terminal (tmux pipe-pane into a FIFO), so that a
    key press is checked with capture-pane once per new output instead of in a busy loop: each
    capture starts a tmux client, and a tight loop of them took CPU from the app under test."""

    def __init__(self, fifo: Path):
        os.mkfifo(fifo)
        self.count = 0
        self.changed = threading.Condition()
        threading.Thread(target=self._read, args=(fifo,), daemon=True).start()
        tmux("pipe-pane", "-t", SESSION, "-o", f"cat > {fifo}")

    def _read(self, fifo: Path) -> None:
        with open(fifo, "rb", buffering=0) as pipe:
            while pipe.read(1 << 16):
                with self.changed:
                    self.count += 1
                    self.changed.notify_all()

    def wait_after(self, count: int, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.count > count, timeout)


def press(output: PaneOutput, key: str, changed) -> float:
    """Send `key`; milliseconds until the terminal shows `changed(screen)`."""
    seen = output.count
    start = time.perf_counter()
    tmux("send-keys", "-t", SESSION, key)
    while True:
        if not output.wait_after(seen, timeout=max(0.0, start + 5 - time.perf_counter())):
            raise TimeoutError(f"pressing {key} never showed:\n{screen()}")
        seen = output.count  # read before the capture: output during it wakes the next wait
        if changed(screen()):
            return (time.perf_counter() - start) * 1000


def bench_tui(work: Path, presses: int, epochs: int) -> tuple:
    runs = work / "tui-runs"
    cmd = " ".join([EXE, "tui", *ARGS, "--epochs", str(epochs), "--runs-dir", str(runs)])
    subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
    tmux("new-session", "-d", "-s", SESSION, "-x", "120", "-y", "36", "-c", str(work), cmd)
    try:
        output = PaneOutput(work / "pane.fifo")
        wait_for(lambda s: "Start" in s and "strategy" in s, 60, "the form")
        tmux("send-keys", "-t", SESSION, "C-r")
        wait_for(lambda s: "status running · epoch 1/" in s, 120, "the first steps")
        latencies = {"r (re-plot the loss)": [], "F1/F2/F3 (switch screens)": []}
        for i in range(presses):
            # r toggles the raw loss curve: the plot is rebuilt and its title changes
            before = "raw hidden" in screen()
            latencies["r (re-plot the loss)"].append(
                press(output, "r", lambda s: ("raw hidden" in s) != before))
            time.sleep(random.uniform(0.2, 0.5))
            # F3 opens the runs screen (a table and two plots), F1 the form (every field of the
            # config), F2 comes back to the dashboard; each press waits for a text only it shows
            for key, sign in (("F3", "run(s) in"), ("F1", "Start  ctrl+r"), ("F2", "status running")):
                latencies["F1/F2/F3 (switch screens)"].append(press(output, key, lambda s: sign in s))
                time.sleep(random.uniform(0.2, 0.5))
        wait_for(lambda s: "completed after" in s, 1800, "the end of the run")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
    (run_dir,) = runs.iterdir()
    return latencies, step_rates(run_dir)


def bench_cli(work: Path, epochs: int) -> list:
    runs = work / "cli-runs"
    subprocess.run([EXE, "train", *ARGS, "--epochs", str(epochs), "--runs-dir", str(runs)], cwd=work,
                   check=True, capture_output=True)
    (run_dir,) = runs.iterdir()
    return step_rates(run_dir)


def bench_tutorial() -> float:
    """The tutorial's pipeline and loop (benchmarks/tutorial.py: its transforms, DataLoader with
    num_workers=4 and train step), in img/s over one epoch (its workers' start included, as in
    each of its epochs)."""
    from oneflow import nn

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import tutorial
    from core.data import load_digits

    train, _ = load_digits()
    loader = tutorial.loader(train.images, train.labels, 32, True, 64, 4)
    model, optimizer = tutorial.model_and_optimizer(1, 10)
    start = time.perf_counter()
    tutorial.train_epoch(model, loader, optimizer, nn.CrossEntropyLoss())
    return len(train) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presses", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=6, help="long enough for the presses (default 6)")
    parser.add_argument("--latency-only", action="store_true", help="skip the throughput runs")
    args = parser.parse_args()
    if shutil.which("tmux") is None:
        sys.exit("tmux is needed (apt-get install tmux)")
    work = Path(tempfile.mkdtemp(prefix="transferlab-bench-"))
    try:
        print(f"TUI: {args.presses} key presses while training ({args.epochs} epochs of digits)...", flush=True)
        latencies, tui_rates = bench_tui(work, args.presses, args.epochs)
        if not args.latency_only:
            print("CLI: the same run...", flush=True)
            cli_rates = bench_cli(work, args.epochs)
            print("tutorial pipeline: one epoch...", flush=True)
            tutorial = bench_tutorial()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    for name, values in latencies.items():
        values.sort()
        p95 = values[min(len(values) - 1, int(round(0.95 * len(values))) - 1)]
        print(f"key-press-to-screen latency during training, {name} ({len(values)} presses): "
              f"p50 {statistics.median(values):.0f} ms, p95 {p95:.0f} ms, max {values[-1]:.0f} ms "
              f"-> target p95 < 100 ms: {'MET' if p95 < 100 else 'NOT MET'}")
    tui = statistics.median(tui_rates)
    if args.latency_only:
        print(f"training throughput in the TUI (median img/s per step): {tui:.1f}")
        return
    cli = statistics.median(cli_rates)
    print(f"training throughput (median img/s per step): TUI {tui:.1f}, CLI {cli:.1f}, "
          f"tutorial pipeline {tutorial:.1f}")
    print(f"ratio TUI/CLI {tui / cli:.2f}; CLI/tutorial {cli / tutorial:.2f}; TUI/tutorial {tui / tutorial:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
