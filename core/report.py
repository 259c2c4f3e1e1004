"""How runs are shown in tables: the cells of the runs listing and of the tutorial's comparison,
shared by the CLI (`transferlab runs`, `compare`) and the app's runs screen."""
from __future__ import annotations

import math
from typing import Any, Dict, List

COMPARISON_COLUMNS = ("strategy", "run", "epochs", "final test acc", "best test acc", "vs scratch", "status")


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
    """The tutorial's comparison: per run, strategy and final test accuracy, and the difference to
    the (newest) scratch run among them, if any. Unreadable runs get a row saying so."""
    scratch = [r for r in runs if not r.unreadable and r.config.strategy == "scratch"
               and r.summary["final_test_acc"] is not None]
    base = scratch[-1].summary["final_test_acc"] if scratch else None
    rows = []
    for run in runs:
        acc = run.summary["final_test_acc"]
        rows.append({"run": run.run_id, "strategy": "?" if run.config is None else run.config.strategy,
                     "epochs": run.summary["epochs_done"] or 0,
                     "final_test_acc": acc, "best_test_acc": run.summary["best_test_acc"],
                     "vs_scratch": None if base is None or acc is None or run.unreadable else acc - base,
                     "status": run.summary["status"], "reason": run.reason})
    return rows


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
    diff = "-" if row["vs_scratch"] is None else f"{row['vs_scratch']:+.4f}"
    return [row["strategy"], row["run"], str(row["epochs"]), fmt_acc(row["final_test_acc"]),
            fmt_acc(row["best_test_acc"]), diff, str(row["status"])]
