"""The offline transfer demo (scripts/demo.py, presets/): its presets are valid settings files and
the script chains the pretraining into the four transfers (training itself is faked here: the
real demo takes minutes; its measured table is in the README)."""
import importlib.util
import json

from core import config as C

from conftest import ROOT


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_presets_are_valid_and_transfer_to_classes_never_seen():
    presets = sorted((ROOT / "presets").glob("*.toml"))
    assert presets
    for path in presets:
        assert C.validate(C.load(path)) == [], path
    pretrain, transfer = C.load(ROOT / "presets" / "demo-pretrain.toml"), C.load(ROOT / "presets" / "transfer-demo.toml")
    assert pretrain.dataset == transfer.dataset == "digits" and pretrain.strategy == "scratch"
    assert not set(C.parse_classes(pretrain.classes)) & set(C.parse_classes(transfer.classes))
    assert transfer.limit_train and (pretrain.backbone, pretrain.image_size) == (transfer.backbone, transfer.image_size)


def test_demo_pretrains_then_runs_each_strategy_from_that_checkpoint(tmp_path, monkeypatch):
    demo = load_demo()
    calls, compared = [], []

    def fake_main(argv):
        calls.append(argv)
        run = tmp_path / "runs" / f"run{len(calls)}"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({}))
        return demo.cli.EXIT_OK

    monkeypatch.setattr(demo.cli, "main", fake_main)
    monkeypatch.setattr(demo.cli, "cmd_compare", lambda runs_dir, refs: compared.append((runs_dir, refs)))
    assert demo.main(["--runs-dir", str(tmp_path / "runs")]) == 0
    assert calls[0][:3] == ["train", "--config", str(demo.PRETRAIN)]
    best = str(tmp_path / "runs" / "run1" / "checkpoints" / "best")
    assert [c[c.index("--strategy") + 1] for c in calls[1:]] == list(C.STRATEGIES)
    assert all(c[c.index("--pretrained") + 1] == best and str(demo.TRANSFER) in c for c in calls[1:])
    assert compared == [(str(tmp_path / "runs"), ["run2", "run3", "run4", "run5"])]
