"""How runs are shown in tables: the cells of the runs listing and of the tutorial's comparison,
shared by the CLI (`transferlab runs`, `compare`) and the app's runs screen."""
from __future__ import annotations

import math
from typing import Any, Dict, List

COMPARISON_COLUMNS = ("strategy", "final test acc", "best test acc", "vs scratch", "epochs", "time", "img/s",
                      "status", "run")
"""Accuracies first (what the comparison is for), the run's long id last (narrow terminals)."""


def fmt_acc(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def fmt_duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def run_row(run: Any) -> Dict[str, str]:
    """The cells of one run in a listing (CLI table, runs screen). An unreadable run shows its
    status "unreadable"; settings it has no valid config for show as "?"."""
    s, cfg = run.summary, run.config
    if cfg is None:
        strategy = dataset = backbone = lr = "?"
        epochs = "?"
    else:
        strategy, dataset, backbone = cfg.strategy, cfg.dataset, cfg.backbone
        lr = f"{cfg.lr:g}" + (f" / {cfg.lr_backbone:g}" if cfg.strategy == "discriminative" else "")
        epochs = str(cfg.epochs)
    return {"run": run.run_id, "strategy": strategy, "dataset": dataset, "backbone": backbone, "lr": lr,
            "epochs": f"{s['epochs_done'] or 0}/{epochs}", "best test acc": fmt_acc(s["best_test_acc"]),
            "status": str(s["status"]), "duration": fmt_duration(s["seconds"])}


def comparison_rows(runs: List[Any]) -> List[Dict[str, Any]]:
    """The tutorial's comparison: per run, strategy, final and best test accuracy, time, images/s,
    and the difference to the (newest) scratch run among them. The difference is given only when
    the two runs had the same data, classes, backbone, pretrained source, image size, epochs and
    limits (core.experiment.COMPARED); otherwise the row says in what they differ
    ("differs: ..."), never a silent subtraction. Unreadable runs get a row saying so."""
    from core.experiment import mismatches

    scratch = [r for r in runs if not r.unreadable and r.config.strategy == "scratch"
               and r.summary["final_test_acc"] is not None]
    base = scratch[-1] if scratch else None
    rows = []
    for run in runs:
        acc = run.summary["final_test_acc"]
        differs = [] if base is None or run.unreadable else mismatches([base.config, run.config])
        diff = None
        if base is not None and acc is not None and not run.unreadable and not differs:
            diff = acc - base.summary["final_test_acc"]
        rows.append({"run": run.run_id, "strategy": "?" if run.config is None else run.config.strategy,
                     "epochs": run.summary["epochs_done"] or 0,
                     "final_test_acc": acc, "best_test_acc": run.summary["best_test_acc"],
                     "vs_scratch": diff, "differs": differs, "seconds": run.summary["seconds"],
                     "images_per_sec": run.summary.get("images_per_sec"),
                     "status": run.summary["status"], "reason": run.reason})
    return rows


def comparable_groups(runs: List[Any]) -> str:
    """A note when the runs do not all share the settings a comparison needs ("" when they do)."""
    from core.experiment import mismatches

    readable = [r for r in runs if not r.unreadable]
    differs = mismatches([r.config for r in readable]) if len(readable) > 1 else []
    return ("these runs differ in " + ", ".join(differs) + ": their accuracies are not comparable"
            if differs else "")


def newest_per_strategy(runs: List[Any]) -> List[Any]:
    """The newest readable run of each strategy that has a test accuracy (runs given oldest
    first)."""
    newest: Dict[str, Any] = {}
    for run in runs:
        if not run.unreadable and run.summary["final_test_acc"] is not None:
            newest[run.config.strategy] = run
    return list(newest.values())


def comparison_cells(row: Dict[str, Any]) -> List[str]:
    """A comparison row as the text of COMPARISON_COLUMNS."""
    if row["differs"]:
        diff = "differs: " + ", ".join(row["differs"])
    else:
        diff = "-" if row["vs_scratch"] is None else f"{row['vs_scratch']:+.4f}"
    ips = row["images_per_sec"]
    return [row["strategy"], fmt_acc(row["final_test_acc"]), fmt_acc(row["best_test_acc"]), diff,
            str(row["epochs"]), fmt_duration(row["seconds"]), "-" if ips is None else f"{ips:.0f}",
            str(row["status"]), row["run"]]


# ---------------------------------------------------------------------------------------------
# per-class results (core.insight), shared by `transferlab report` and the app's insight screen

CLASS_COLUMNS = ("class", "precision", "recall", "accuracy", "support")
CLASS_NOTE = ("recall: of a class's test images, the share predicted right (its accuracy in the usual sense); "
              "precision: of the images predicted as the class, the share that are; accuracy: one-vs-rest, "
              "the share of all test images on which \"is it this class?\" is answered right")
"""What the per-class columns mean (printed under the table)."""


def class_cells(stats: Any) -> List[str]:
    """A core.insight.ClassStats as the text of CLASS_COLUMNS ("-" where undefined)."""
    return [stats.name, fmt_acc(stats.precision), fmt_acc(stats.recall), fmt_acc(stats.accuracy), str(stats.support)]


def short_name(name: str, width: int) -> str:
    """A class name cut to `width` characters (the last one "…" when cut)."""
    return name if len(name) <= width else name[:max(0, width - 1)] + "…"


def wrong_line(wrong: Any, classes: Any) -> str:
    """One confidently wrong image: "true X, predicted Y (p=0.93)"."""
    return f"true {classes[wrong.label]}, predicted {classes[wrong.predicted]} (p={wrong.confidence:.2f})"
