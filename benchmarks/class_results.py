"""The cost of the per-class results (confusion matrix + running top-8 of confidently wrong images,
core.trainer.ClassTally) per evaluation.

On digits (CPU, random ResNet-18 weights, the whole test split of 359 images: the default
--limit-test 0), it times the trainer's own `_evaluate` with the tally and with a stand-in that
does nothing, alternated (with, without, with, ...) so that a change of load hits both, and the
tally's own work alone on logits already computed (what a frozen run's cached evaluation adds to
its head-only forward). Prints medians in ms.

Usage: .venv/bin/python benchmarks/class_results.py [--sizes 16,32] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="16,32")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import numpy as np

    import core.trainer as T
    from core.backend import flow
    from core.config import RunConfig
    from core.data import BatchTransform
    from core.distributed import NullWriter
    from oneflow import nn

    class NoTally(T.ClassTally):
        """The tally's interface with nothing computed (the evaluation as before it)."""

        def add(self, *args) -> None:
            pass

        def top(self):
            return flow.zeros(0, dtype=flow.float64, device=self.device)

    real = T.ClassTally
    for size in map(int, args.sizes.split(",")):
        cfg = RunConfig(dataset="digits", pretrained="none", image_size=size, batch_size=64, limit_train=64,
                        device="cpu", runs_dir="/tmp/unused-runs")
        p = T.prepare(cfg, runs_folder=False)
        trainer = T.Trainer(p, NullWriter(), [], T.RunControl())
        trainer.rng, trainer.steps_per_epoch = np.random.default_rng(0), 1
        trainer.eval_loss_fn = nn.CrossEntropyLoss(reduction="sum")
        trainer.test_transform = BatchTransform(flow, p.device, p.test.images.shape[1:3], size, cfg.normalize,
                                                False, False)
        trainer._evaluate(1)  # warm up
        times = {"with": [], "without": []}
        for _ in range(args.repeats):
            for name, cls in (("with", real), ("without", NoTally)):
                T.ClassTally = cls
                start = time.perf_counter()
                trainer._evaluate(1)
                times[name].append(time.perf_counter() - start)
        T.ClassTally = real
        with_, without = (statistics.median(times[k]) * 1000 for k in ("with", "without"))
        # the tally alone, on the logits of the same batches (computed once)
        logits = flow.randn(len(p.test), len(p.train.classes))
        labels = flow.tensor(p.test.labels)
        batch = T.eval_batch_size(cfg.batch_size)
        alone = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            tally = real(len(p.train.classes), T.WRONG_SHOWN, p.device)
            for i in range(0, len(p.test), batch):
                out, y = logits[i:i + batch], labels[i:i + batch]
                tally.add(out, out.argmax(dim=1), y, np.arange(i, min(i + batch, len(p.test))), 1)
            tally.top().numpy()
            alone.append(time.perf_counter() - start)
        print(f"{size} px, {len(p.test)} test images in batches of {batch}: evaluation {with_:.0f} ms with the "
              f"per-class results, {without:.0f} ms without ({with_ - without:+.0f} ms, "
              f"{(with_ - without) / without:+.1%}); the tally alone {statistics.median(alone) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
