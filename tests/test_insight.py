"""Per-class results: the evaluation's confusion matrix and most confidently wrong images
(core.trainer.ClassTally), their records (core.events.ClassResults), reading them back safely
(core.insight), `transferlab report`, and the app's insight screen."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from core import events as ev
from core import insight
from core.cli import main
from core.config import RunConfig
from core.data import load_dataset
from core.store import list_runs, read_events
from core.trainer import train

from conftest import ROOT


def tiny_run(runs, strategy):
    """A tiny digits run (tests/conftest.py tiny_cfg's settings, 16 px, 1 epoch of 4 steps)."""
    cfg = RunConfig(dataset="digits", pretrained="none", image_size=16, batch_size=16, epochs=1,
                    limit_train=64, limit_test=32, device="cpu", runs_dir=str(runs), strategy=strategy)
    assert train(cfg).status == ev.COMPLETED
    (run,) = list_runs(runs)
    return run.path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("insight") / "runs", "finetune")


def recorded(run_dir, cls):
    return [e for e in read_events(run_dir) if isinstance(e, cls)]


def numpy_predictions(run_dir):
    """The test images, labels and softmax probabilities of the run's saved model, computed
    here: the model from checkpoints/last (written after the epoch's evaluation), the test
    subset as the run drew it, plain numpy for everything after the logits."""
    from core.export import load_run_model

    model = load_run_model(run_dir, "last")
    cfg = model.cfg
    _, test = load_dataset(cfg.dataset, cfg.data_root, cfg.image_size, cfg.seed, download=False)
    test = test.subset(cfg.limit_test, cfg.seed + 1)
    logits = model.logits(test.images).astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return test, probs / probs.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("strategy", ["finetune", "frozen"])  # frozen: the feature cache's path
def test_confusion_matrix_and_wrong_images_equal_numpy_on_the_saved_model(strategy, run_dir, tmp_path):
    if strategy != "finetune":
        run_dir = tiny_run(tmp_path / "runs", strategy)
    (results,) = recorded(run_dir, ev.ClassResults)
    (epoch,) = recorded(run_dir, ev.EpochEnded)
    (started,) = recorded(run_dir, ev.RunStarted)
    test, probs = numpy_predictions(run_dir)
    predicted = probs.argmax(axis=1)
    expected = np.zeros((10, 10), np.int64)
    np.add.at(expected, (test.labels, predicted), 1)
    matrix = np.array(results.matrix)
    assert results.classes == tuple(str(c) for c in range(10))
    assert (matrix == expected).all()
    assert matrix.sum() == started.test_size == len(test) == 32
    assert np.trace(matrix) / len(test) == pytest.approx(epoch.test_acc)

    wrong = np.flatnonzero(predicted != test.labels)
    top = sorted(probs[wrong].max(axis=1), reverse=True)[:8]
    assert len(results.wrong) == min(8, len(wrong)) > 0
    confidences = [w.confidence for w in results.wrong]
    assert confidences == sorted(confidences, reverse=True)
    assert confidences == pytest.approx(top, abs=1e-5)  # the most confident of all wrong ones
    for w in results.wrong:
        assert w.label == test.labels[w.index] != w.predicted == predicted[w.index]
        assert w.confidence == pytest.approx(probs[w.index].max(), abs=1e-5)
        picture = np.asarray(insight.read_wrong_image(run_dir, w.file))
        assert picture.shape == (8, 8, 3) and (picture == test.images[w.index]).all()  # the data's own pixels


def test_class_results_come_once_per_epoch_just_before_its_end_and_resume_drops_them():
    events = [ev.ClassResults(1, ("a", "b"), [[1, 0], [0, 1]]), ev.EpochEnded(1, 1, 1, 1, 1, 1),
              ev.ClassResults(2, ("a", "b"), [[2, 0], [0, 0]]), ev.EpochEnded(2, 1, 1, 1, 1, 1),
              ev.RunResumed("r", 2, 0, 8, 1, 3), ev.ClassResults(2, ("a", "b"), [[0, 2], [0, 0]])]
    one = ev.as_one_run(events)
    assert [(type(e).__name__, e.epoch) for e in one] == [("ClassResults", 1), ("EpochEnded", 1), ("RunResumed", 2),
                                                           ("ClassResults", 2)]
    assert one[-1].matrix == [[0, 2], [0, 0]]  # the epoch's results as redone
    assert [r.matrix for r in insight.all_class_results(events)] == [[[1, 0], [0, 1]], [[0, 2], [0, 0]]]


def test_the_trainer_records_class_results_right_before_each_epoch_end(run_dir):
    names = [type(e).__name__ for e in read_events(run_dir) if not isinstance(e, ev.StepEnded)]
    assert names[names.index("EpochEnded") - 1] == "ClassResults" and names.count("ClassResults") == 1


GOOD = {"event": "ClassResults", "epoch": 1, "classes": ["a", "b"], "matrix": [[3, 1], [0, 2]],
        "wrong": [{"file": "wrong/epoch-001/0.png", "index": 4, "label": 0, "predicted": 1, "confidence": 0.9}]}


@pytest.mark.parametrize("change", [
    {"matrix": [[3, 1], [0, 2], [1, 1]]},           # not square
    {"matrix": [[3, 1, 0], [0, 2, 0], [0, 0, 0]]},  # not one row per class
    {"matrix": [[3, 1], [0]]},                       # ragged
    {"matrix": [[3, -1], [0, 2]]},                   # a negative count
    {"matrix": [[3, 1.5], [0, 2]]},                  # not a count
    {"matrix": [[3, True], [0, 2]]},                 # a bool
    {"matrix": "3 1 0 2"},
    {"matrix": {"cells": [[0, 0, 3], [0, 2, 1]]}},    # written as cells: a class out of range
    {"matrix": {"cells": [[0, 0, 3], [0, 0, 1]]}},    # a cell twice
    {"matrix": {"cells": [[0, 0, -3]]}},              # not a count
    {"matrix": {"cells": [[0, 0, True]]}},            # a bool
    {"matrix": {"cells": [[0, 0]]}},                  # not a triple
    {"matrix": {"cells": [[0, 0, 1]], "rows": 2}},    # anything else
    {"matrix": {"cells": "0 0 1"}},
    {"classes": []},
    {"classes": [str(i) for i in range(1001)], "matrix": {"cells": []}, "wrong": []},  # C x C in memory: refused
    {"wrong": [{"file": "x.png", "index": 4, "label": 0, "predicted": 0, "confidence": 0.9}]},  # right, not wrong
    {"wrong": [{"file": "x.png", "index": 4, "label": 0, "predicted": 2, "confidence": 0.9}]},  # no class 2
    {"wrong": [{"file": "x.png", "index": 4, "label": 0, "predicted": 1, "confidence": 1.5}]},
    {"wrong": [{"file": "x.png", "index": -1, "label": 0, "predicted": 1, "confidence": 0.5}]},
    {"wrong": [{"file": 7, "index": 4, "label": 0, "predicted": 1, "confidence": 0.5}]},
    {"wrong": [{"index": 4, "label": 0, "predicted": 1, "confidence": 0.5}]},
    {"wrong": ["wrong/epoch-001/0.png"]},
])
def test_a_malformed_class_results_record_is_rejected(change):
    assert isinstance(ev.from_record(json.loads(json.dumps(GOOD))), ev.ClassResults)
    with pytest.raises(ValueError):
        ev.from_record({**GOOD, **change})
    line = json.dumps({**GOOD, **change}).encode()
    assert ev.from_line(line) is None  # a reader skips it



def test_a_matrix_of_many_classes_is_written_as_its_cells_and_read_back_whole():
    """600 classes: written whole, the matrix's line (about 1.1 MB) was over a metrics line's
    1 MB cap, and readers skipped it: the run had no per-class results."""
    from core.files import MAX_LINE

    size = 600
    matrix = [[0] * size for _ in range(size)]
    for i in range(size):
        matrix[i][i], matrix[i][(i * 7) % size] = 3, matrix[i][(i * 7) % size] + 1
    results = ev.ClassResults(2, tuple(f"class {i}" for i in range(size)), matrix,
                              (ev.WrongImage("wrong/epoch-002/0.png", 5, 1, 7, 0.75),))
    line = json.dumps(ev.to_record(results)).encode()
    assert len(line) < MAX_LINE // 20
    assert ev.from_line(line) == results
    small = ev.ClassResults(1, ("a", "b"), [[3, 1], [0, 2]])
    assert ev.to_record(small)["matrix"] == [[3, 1], [0, 2]]  # a few classes: written whole, readable


def test_a_run_of_more_classes_than_kept_records_no_class_results(tiny_cfg, monkeypatch):
    monkeypatch.setattr(ev, "MAX_CLASSES", 5)  # digits has 10
    finished = train(tiny_cfg)
    assert finished.status == ev.COMPLETED and finished.final_test_acc is not None
    (run,) = list_runs(tiny_cfg.runs_dir)
    assert not recorded(run.path, ev.ClassResults) and recorded(run.path, ev.EpochEnded)
    assert not (run.path / "wrong").exists() or not any((run.path / "wrong").iterdir())

def write_metrics(run_dir, *records):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def test_wrong_images_are_read_only_from_the_runs_wrong_folder_and_within_bounds(tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    (run / "wrong" / "epoch-001").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(run / "wrong" / "epoch-001" / "0.png")
    assert np.asarray(insight.read_wrong_image(run, "wrong/epoch-001/0.png")).shape == (8, 8, 3)
    secret = tmp_path / "secret.png"
    shutil.copy(run / "wrong" / "epoch-001" / "0.png", secret)
    (run / "config.json").write_text("{}")
    os.symlink(secret, run / "wrong" / "epoch-001" / "link.png")
    Image.new("L", (2000, 1000)).save(run / "wrong" / "epoch-001" / "huge.png")  # a few KB, 2 million pixels
    (run / "wrong" / "epoch-001" / "text.png").write_text("not an image")
    for name in ("../../etc/passwd", "/etc/passwd", "../secret.png", "wrong/../../secret.png",
                 "wrong/epoch-001/link.png", "config.json", "wrong/epoch-001/huge.png", "wrong/epoch-001/text.png",
                 "wrong/epoch-009/0.png", "wrong/epoch-001", "wrong/\0.png"):
        with pytest.raises(ValueError):
            insight.read_wrong_image(run, name)
    linked = tmp_path / "linked"  # a run whose wrong/ is a link to a folder elsewhere
    linked.mkdir()
    os.symlink(run / "wrong", linked / "wrong")
    with pytest.raises(ValueError):
        insight.read_wrong_image(linked, "wrong/epoch-001/0.png")


def test_report_prints_the_per_class_table_and_the_matrix(run_dir, capsys):
    (results,) = recorded(run_dir, ev.ClassResults)
    assert main(["report", run_dir.name[:15], "--runs-dir", str(run_dir.parent)]) == 0
    out = capsys.readouterr().out
    assert "precision" in out and "recall" in out and "one-vs-rest" in out
    rows = [line.strip("│ ").split("│") for line in out.splitlines() if line.count("│") == 12]
    assert [[int(cell) for cell in row[1:]] for row in rows] == results.matrix  # rows as recorded
    assert [row[0].strip() for row in rows] == list(results.classes)
    for stats in insight.class_stats(results):  # recall: the diagonal over the row's sum
        assert stats.recall == (stats.correct / stats.support if stats.support else None)
    assert str(run_dir / results.wrong[0].file) in out
    assert main(["report", run_dir.name, "--runs-dir", str(run_dir.parent), "--epoch", "7"]) == 2
    assert "no per-class results for epoch 7; recorded: 1" in capsys.readouterr().err


def test_report_on_a_run_older_than_class_results_says_so_in_one_line(tmp_path, capsys):
    old = sorted((ROOT / "tests" / "data" / "runs").iterdir())[0]
    shutil.copytree(old, tmp_path / old.name)
    assert main(["report", old.name, "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no per-class results" in err


def test_old_wrong_images_are_pruned_to_the_latest_epochs(tiny_cfg):
    from core.store import KEEP_WRONG_EPOCHS, RunWriter

    writer = RunWriter(tiny_cfg)
    image = np.zeros((8, 8, 3), np.uint8)
    for epoch in range(1, KEEP_WRONG_EPOCHS + 3):
        assert writer.save_wrong_images(epoch, [image, image]) == [f"wrong/epoch-{epoch:03d}/0.png",
                                                                    f"wrong/epoch-{epoch:03d}/1.png"]
    writer.close()
    kept = sorted(p.name for p in (writer.path / "wrong").iterdir())
    assert kept == [f"epoch-{e:03d}" for e in range(3, KEEP_WRONG_EPOCHS + 3)]


# -- the app ---------------------------------------------------------------------------------------


async def wait_for(pilot, condition, timeout=20.0):
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out"
        await pilot.pause(0.05)


def heat_rows(screen):
    """The heat map's rows of counts, as numbers."""
    text = str(screen.query_one("#heat-map").render())
    return [[int(n) for n in line.split()[1:]] for line in text.splitlines()[1:]]


async def test_insight_opens_from_the_dashboard_and_the_runs_screen_and_shows_the_matrix(run_dir, tmp_path):
    from textual.widgets import DataTable

    from tui.app import TransferLabApp
    from tui.dashboard import DashboardScreen
    from tui.insight import InsightScreen, WrongCard

    (results,) = recorded(run_dir, ev.ClassResults)
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / run_dir.name)
    old = sorted((ROOT / "tests" / "data" / "runs").iterdir())[0]
    shutil.copytree(old, runs / old.name)  # older than class results: the newest is first in the list
    app = TransferLabApp(RunConfig(runs_dir=str(runs), device="cpu", dataset="digits"))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.press("f3")
        await pilot.pause()
        await pilot.press("i")
        screen = app.screen
        assert isinstance(screen, InsightScreen)
        await wait_for(pilot, lambda: screen.results is not None)
        assert heat_rows(screen) == results.matrix
        assert screen.query_one(DataTable).row_count == 10
        await wait_for(pilot, lambda: len(screen.query(WrongCard)) == len(results.wrong))
        await pilot.press("escape")
        await pilot.press("down", "i")  # the older run: one line, no crash
        screen = app.screen
        await wait_for(pilot, lambda: "No per-class results" in str(screen.query_one("#insight-title").render()))
        await pilot.press("escape", "up", "enter")
        dashboard = app.screen
        assert isinstance(dashboard, DashboardScreen)
        await wait_for(pilot, lambda: dashboard.results)
        await pilot.press("i")
        screen = app.screen
        assert isinstance(screen, InsightScreen) and screen.results == results
        assert heat_rows(screen) == results.matrix
        await wait_for(pilot, lambda: len(screen.query(WrongCard)) == len(results.wrong))
        await pilot.press("escape")
        assert app.screen is dashboard
        crafted = runs / "crafted"  # a metrics file naming a picture outside its run: a line on the card
        write_metrics(crafted, {**GOOD, "wrong": [{**GOOD["wrong"][0], "file": "../../../../etc/passwd"}]})
        screen = InsightScreen(crafted)
        await app.push_screen(screen)
        await wait_for(pilot, lambda: len(screen.query(WrongCard)) == 1)
        card = screen.query_one(WrongCard)
        assert isinstance(card.picture, str) and "not in the run's wrong/ folder" in card.picture


async def test_insight_of_a_live_run_follows_its_evaluations(tmp_path):
    from tui.app import TransferLabApp
    from tui.insight import InsightScreen

    cfg = RunConfig(dataset="digits", pretrained="none", image_size=16, batch_size=16, epochs=2, limit_train=32,
                    limit_test=32, device="cpu", runs_dir=str(tmp_path / "runs"))
    app = TransferLabApp(cfg)
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause()
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.dashboard.started is not None, timeout=60)
        await pilot.press("i")
        screen = app.screen
        assert isinstance(screen, InsightScreen)
        if app.dashboard.class_results is None:  # (on a fast machine the first epoch may be over)
            await wait_for(pilot, lambda: "yet" in str(screen.query_one("#insight-title").render()))
        await wait_for(pilot, lambda: screen.results is not None and screen.results.epoch == 2, timeout=60)
        assert sum(map(sum, heat_rows(screen))) == 32 and heat_rows(screen) == screen.results.matrix
        await app.workers.wait_for_complete()
