"""The model out of the app: `transferlab export` (CSV, safetensors, ONNX checked against OneFlow),
`transferlab predict`, and the runs screen's export key, on one tiny trained run."""
import asyncio
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from core import events as ev
from core.cli import build_parser, main
from core.config import RunConfig
from core.data import IMAGENET_MEAN, IMAGENET_STD, load_dataset
from core.store import list_runs, read_run
from core.trainer import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny digits run (tests/conftest.py tiny_cfg's settings, 16 px), 2 epochs of 4 steps."""
    runs = tmp_path_factory.mktemp("export") / "runs"
    cfg = RunConfig(dataset="digits", pretrained="none", image_size=16, batch_size=16, epochs=2,
                    limit_train=64, limit_test=32, device="cpu", runs_dir=str(runs))
    assert train(cfg).status == ev.COMPLETED
    (run,) = list_runs(runs)
    return run.path


def export(run_dir, *flags):
    return main(["export", run_dir.name, "--runs-dir", str(run_dir.parent), "--checkpoint", "last", *flags])


def error_lines(text):
    assert "Traceback" not in text
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_csv_rows_equal_the_metrics(run_dir, tmp_path, capsys):
    out = tmp_path / "metrics.csv"
    assert export(run_dir, "--csv", str(out)) == 0
    assert str(out) in capsys.readouterr().out
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "StepEnded"]
    epochs = [r for r in records if r["event"] == "EpochEnded"]
    assert [r["kind"] for r in rows] == ["step"] * 4 + ["epoch"] + ["step"] * 4 + ["epoch"]
    got_steps = [r for r in rows if r["kind"] == "step"]
    assert [(int(r["epoch"]), int(r["step"]), int(r["global_step"]), float(r["loss"]), float(r["lr_all"]),
             float(r["images_per_sec"])) for r in got_steps] == \
        [(s["epoch"], s["step"], s["global_step"], s["loss"], s["lrs"]["all"], s["images_per_sec"]) for s in steps]
    got_epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [(int(r["epoch"]), int(r["global_step"]), float(r["train_loss"]), float(r["train_acc"]),
             float(r["test_loss"]), float(r["test_acc"]), float(r["seconds"])) for r in got_epochs] == \
        [(e["epoch"], 4 * e["epoch"], e["train_loss"], e["train_acc"], e["test_loss"], e["test_acc"], e["seconds"])
         for e in epochs]

    # an untrusted metrics file: torn, non-JSON, wrong-typed and formula-like lines are skipped
    crafted = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, crafted)
    with open(crafted / "metrics.jsonl", "ab") as f:
        f.write(b'{"event": "StepEnded", "epoch": "=cmd|calc", "step": 1}\n\xff\xfe not json\n{"event": "Step')
    out2 = tmp_path / "crafted.csv"
    assert main(["export", str(crafted), "--csv", str(out2)]) == 0
    assert out2.read_text() == out.read_text()


def test_safetensors_round_trip_and_loads_as_pretrained(run_dir, tmp_path, capsys):
    from safetensors import safe_open

    from core.models import build_model

    out = tmp_path / "model.safetensors"
    assert export(run_dir, "--safetensors", str(out)) == 0
    assert str(out) in capsys.readouterr().out
    with safe_open(str(out), framework="np") as f:
        weights, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    with safe_open(str(run_dir / "checkpoints" / "last" / "model.safetensors"), framework="np") as f:
        trained = {k: f.get_tensor(k) for k in f.keys()}
    assert weights.keys() == trained.keys()
    assert all(np.array_equal(weights[k], trained[k]) for k in trained)
    assert json.loads(meta["classes"]) == [str(i) for i in range(10)]
    assert meta["backbone"] == "resnet18" and meta["image_size"] == "16" and meta["normalize"] == "imagenet"
    assert json.loads(meta["mean"]) == list(IMAGENET_MEAN) and json.loads(meta["std"]) == list(IMAGENET_STD)
    assert meta["transferlab.run_id"] == run_dir.name and meta["transferlab.checkpoint"] == "last"

    # --pretrained FILE: the backbone comes from it, the head is new
    model, head = build_model("resnet18", 3, str(out))
    state = model.state_dict()
    assert np.array_equal(state["layer4.1.conv2.weight"].numpy(), trained["layer4.1.conv2.weight"])
    assert tuple(state[f"{head}.weight"].shape) == (3, 512)


def test_onnx_output_equals_oneflow_within_the_tolerance(run_dir, tmp_path, capsys):
    import onnxruntime as ort

    from core import export as X

    out = tmp_path / "model.onnx"
    assert export(run_dir, "--onnx", str(out)) == 0
    said = capsys.readouterr().out
    assert str(out) in said and "max abs difference" in said and "1e-05 x the largest |logit|" in said
    # independently, on other test images, one at a time (the file takes one image)
    run = X.load_run_model(run_dir, "last")
    _, test = load_dataset("digits", "", 16)
    images = test.images[100:105]
    expected = run.logits(images)
    x = run.transform(images.shape[1:3])(images, False, None).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 16, 16]
    described = session.get_modelmeta().custom_metadata_map
    assert json.loads(described["classes"]) == run.classes and described["image_size"] == "16"
    got = np.concatenate([session.run(None, {session.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(5)])
    assert got.shape == (5, 10)
    assert np.max(np.abs(got - expected)) <= X.onnx_tolerance(expected)
    assert np.array_equal(got.argmax(1), expected.argmax(1))

    # a check that does not pass writes nothing and says by how much
    strict = tmp_path / "strict.onnx"
    with pytest.raises(X.ExportError, match=r"ONNX check failed: .* differ from OneFlow's by up to .*tolerance 1e-12"):
        X.export_onnx(run, strict, atol=1e-12, rtol=0)
    assert not strict.exists() and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def write_test_images(run_dir, folder):
    """The run's test images (as its evaluation picked them) as PNG files; their labels."""
    from PIL import Image

    cfg = read_run(run_dir).config
    _, test = load_dataset(cfg.dataset, cfg.data_root, cfg.image_size, cfg.seed, classes=cfg.classes)
    test = test.subset(cfg.limit_test, cfg.seed + 1)
    paths = []
    for i, image in enumerate(test.images):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths, [test.classes[label] for label in test.labels]


def test_predict_agrees_with_the_recorded_test_accuracy(run_dir, tmp_path, capsys):
    paths, labels = write_test_images(run_dir, tmp_path)
    code = main(["predict", run_dir.name, "--runs-dir", str(run_dir.parent), "--checkpoint", "last",
                 "--top-k", "3", *map(str, paths)])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and len(out) == len(paths)
    correct = 0
    for line, path, label in zip(out, paths, labels):
        shown, top = line.split(": ", 1)
        assert shown == str(path)
        names, probs = zip(*(item.split(" ") for item in top.split(", ")))
        probs = [float(p) for p in probs]
        assert len(names) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.001
        correct += names[0] == label
    assert correct / len(paths) == pytest.approx(read_run(run_dir).summary["final_test_acc"])
    # and image by image, the class of the model's logits on the whole test batch as the run saw it
    from core.export import load_run_model

    run = load_run_model(run_dir, "last")
    _, test = load_dataset("digits", "", 16)
    batch = run.logits(test.subset(32, run.cfg.seed + 1).images).argmax(1)
    assert [line.split(": ")[1].split(" ")[0] for line in out] == [run.classes[i] for i in batch]


def test_a_bad_image_is_one_line_and_the_others_are_predicted(run_dir, tmp_path, capsys):
    paths, _ = write_test_images(run_dir, tmp_path)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    args = [str(paths[0]), str(tmp_path / "bad.png"), str(tmp_path / "missing.png"), str(tmp_path), str(paths[1])]
    code = main(["predict", str(run_dir), "--top-k", "2", *args])
    said = capsys.readouterr()
    assert code == 1
    assert [line.split(": ")[0] for line in said.out.splitlines()] == [str(paths[0]), str(paths[1])]
    errors = error_lines(said.err)
    assert len(errors) == 3 and len(said.err.strip().splitlines()) == 3
    assert "bad.png" in errors[0] and "missing.png" in errors[1] and "not a regular file" in errors[2]


def crafted(run_dir, tmp_path, name):
    path = tmp_path / name
    shutil.copytree(run_dir, path)
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda p: shutil.rmtree(p / "checkpoints"), "has no checkpoint"),
    (lambda p: (p / "checkpoints/last/model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{junk"),
     "cannot read .* as a safetensors file"),
    (lambda p: (p / "checkpoints/last/meta.json").write_text('{"classes": 5}'), "does not list the class names"),
    (lambda p: (p / "checkpoints/last/meta.json").write_text('{"classes": ["a", "b", "c"]}'),
     "does not fit a resnet18 with 3 classes"),
    (lambda p: (p / "config.json").write_text('{"backbone": "os.system"}'), "is unreadable: config.json"),
])
def test_a_crafted_run_folder_is_one_line(run_dir, tmp_path, capsys, damage, message):
    import re

    path = crafted(run_dir, tmp_path, "run")
    damage(path)
    out = tmp_path / "model.safetensors"
    assert main(["export", str(path), "--checkpoint", "last", "--safetensors", str(out)]) == 1
    assert main(["predict", str(path), "--checkpoint", "last", str(tmp_path / "x.png")]) == 1
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 2 and all(re.search(message, e) for e in errors), errors
    assert not out.exists()


def test_export_needs_an_output_and_a_run(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir)]) == 2
    assert "at least one of --csv" in capsys.readouterr().err
    assert main(["export", "no-such-run", "--runs-dir", str(run_dir.parent), "--csv", str(tmp_path / "m.csv")]) == 2
    assert len(error_lines(capsys.readouterr().err)) == 1 and not (tmp_path / "m.csv").exists()
    # a folder, or a file in no folder, is refused before the (long) work
    assert main(["export", str(run_dir), "--onnx", str(tmp_path)]) == 2
    assert main(["export", str(run_dir), "--safetensors", str(tmp_path / "no" / "m.safetensors")]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert "is a folder" in errors[0] and "no folder" in errors[1] and len(errors) == 2
    assert main(["export", str(run_dir), "--csv", str(tmp_path / ("x" * 300))]) == 2
    assert "File name too long" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "--resume", "R"], ["stop", "R"], ["attach", "R"], ["compare", "R"],
                                  ["export", "R", "--csv", "m.csv"], ["predict", "R", "x.png"], ["runs"]])
def test_every_command_that_takes_a_run_takes_runs_dir(argv):
    assert build_parser().parse_args([*argv, "--runs-dir", "elsewhere"]).runs_dir == "elsewhere"


async def test_the_runs_screen_exports_a_run_and_shows_the_path(run_dir, tmp_path):
    from textual.widgets import Input

    from tui.app import TransferLabApp
    from tui.dialogs import ChoiceScreen, PathScreen
    from tui.runs import RunsScreen

    app = TransferLabApp(RunConfig(dataset="digits", pretrained="none", device="cpu", runs_dir=str(run_dir.parent)))
    out = tmp_path / "from the app.csv"
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.pause()
        await pilot.press("f3")
        await pilot.pause()
        assert isinstance(app.screen, RunsScreen)
        await pilot.press("E")
        await pilot.pause()
        assert isinstance(app.screen, ChoiceScreen)
        await pilot.press("c")
        await pilot.pause()
        assert isinstance(app.screen, PathScreen)
        app.screen.query_one(Input).value = str(out)
        await pilot.press("enter")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while not any("Exported" == n.title for n in app._notifications):
            assert loop.time() < deadline, [str(n.message) for n in app._notifications]
            await pilot.pause(0.1)
        (toast,) = [n for n in app._notifications if n.title == "Exported"]
        assert str(out) in str(toast.message)
    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) == 10
