"""Loading never runs code from a file nor writes outside where it belongs (issue 7, part 1).

Every crafted file here would run code (it writes a marker file) under an unrestricted unpickler,
or write outside the data root under an unfiltered extraction; each is fed through the real entry
points (core.models.build_model, core.trainer.prepare, core.data.load_dataset, the CLI)."""
from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import re
import struct
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_env, transferlab_cmd
from core import data as D
from core import models as M
from core import weights as W
from core.backend import flow
from core.trainer import prepare
from oneflow import nn
from test_data import write_cifar


class RunsShell:
    """Unpickled, calls os.system: `touch marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class ExecsPython:
    """Unpickled, calls builtins.exec on Python code that creates the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def shell_prefix(marker: Path) -> bytes:
    """Pickle opcodes that run `touch marker`, drop the result and let the rest of the stream load."""
    return b"cposix\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR0"


def crafted_state_folder(folder: Path, payload) -> Path:
    """A flow.save-style folder whose pickled_data runs the payload."""
    folder.mkdir(parents=True)
    (folder / "pickled_data").write_bytes(pickle.dumps({"protocol_version": 1, "data": payload}))
    return folder


def test_the_crafted_payloads_do_run_code_under_plain_pickle(tmp_path):
    """The files below are real attacks: plain pickle.loads runs each payload."""
    for i, payload in enumerate([RunsShell, ExecsPython]):
        marker = tmp_path / f"m{i}"
        pickle.loads(pickle.dumps(payload(marker)))
        assert marker.exists()
    marker = tmp_path / "prefix"
    assert pickle.loads(shell_prefix(marker) + pickle.dumps({"a": 1})) == {"a": 1} and marker.exists()


# ---------------------------------------------------------------------------------------------
# weights


@pytest.mark.parametrize("payload,refused", [(RunsShell, "posix.system"), (ExecsPython, "builtins.exec")])
def test_crafted_state_dict_folder_is_refused(tmp_path, payload, refused):
    marker = tmp_path / "marker"
    folder = crafted_state_folder(tmp_path / "weights", payload(marker))
    with pytest.raises(M.WeightsError) as info:
        M.build_model("resnet18", 10, str(folder))
    assert not marker.exists()
    message = str(info.value)
    assert f"refused to load {folder / 'pickled_data'}" in message and refused in message
    assert "\n" not in message


def test_crafted_old_layout_checkpoint_is_refused_by_prepare(tmp_path, tiny_cfg):
    marker = tmp_path / "marker"
    checkpoint = tmp_path / "ckpt"
    crafted_state_folder(checkpoint / "model", RunsShell(marker))
    (checkpoint / "meta.json").write_text('{"backbone": "resnet18"}')
    with pytest.raises(M.WeightsError, match="refused to load .*model/pickled_data: it asks for posix.system"):
        prepare(tiny_cfg.replace(pretrained=str(checkpoint)))
    assert not marker.exists()


def real_checkpoint_with_prefix(tmp_path: Path, marker: Path) -> Path:
    """A real flow.save of a ResNet-18 state dict whose pickled_data first runs a shell command."""
    flow.manual_seed(0)
    model, _ = M.build_model("resnet18", 10, "none")
    folder = tmp_path / "real"
    flow.save(model.state_dict(), str(folder))
    pickled = folder / "pickled_data"
    pickled.write_bytes(shell_prefix(marker) + pickled.read_bytes())
    return folder


def test_real_checkpoint_with_a_code_prefix_is_refused(tmp_path, tiny_cfg):
    marker = tmp_path / "marker"
    folder = real_checkpoint_with_prefix(tmp_path, marker)
    with pytest.raises(M.WeightsError, match="refused to load .*pickled_data: it asks for posix.system"):
        prepare(tiny_cfg.replace(pretrained=str(folder)))
    assert not marker.exists()


def test_cli_refuses_a_crafted_folder_in_one_line(tmp_path):
    import subprocess

    marker = tmp_path / "marker"
    folder = real_checkpoint_with_prefix(tmp_path, marker)
    proc = subprocess.run([*transferlab_cmd(), "train", "--pretrained", str(folder), "--dataset", "digits",
                           "--epochs", "1", "--image-size", "16", "--limit-train", "32", "--limit-test", "16",
                           "--device", "cpu", "--runs-dir", str(tmp_path / "runs")],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    native = re.compile(r"libibverbs not available|[IWEF]\d{8} ")  # OneFlow's own start-up lines
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not native.match(line)]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1 and lines[0].startswith("error: refused to load") and "posix.system" in lines[0]
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_flowvision_cache_folder_is_read_safely(tmp_path):
    marker = tmp_path / "marker"
    crafted_state_folder(M.imagenet_cache_path("resnet18"), RunsShell(marker))
    with pytest.raises(M.WeightsError, match="refused to load .*resnet18/pickled_data"):
        M.build_model("resnet18", 10, "imagenet")
    assert not marker.exists()


def save_legacy(state, folder: Path) -> None:
    """The older flow.save layout (no pickle): `<key>/out` + `<key>/meta` and `snapshot_done`."""
    folder.mkdir(parents=True)
    for key, tensor in state.items():
        (folder / key).mkdir()
        array = tensor.numpy()
        (folder / key / "out").write_bytes(array.tobytes())
        kind = {np.dtype(np.float32): "kFloat", np.dtype(np.int64): "kInt64"}[array.dtype]
        dims = "".join(f"  dim: {d}\n" for d in array.shape)
        (folder / key / "meta").write_text(f"shape {{\n{dims}}}\ndata_type: {kind}\n")
    (folder / "snapshot_done").write_text("")


def test_legacy_flowvision_cache_folder_loads(tmp_path):
    flow.manual_seed(4)
    weights = M.build_model("resnet18", 1000, "none")[0]
    save_legacy(weights.state_dict(), M.imagenet_cache_path("resnet18"))
    model, _ = M.build_model("resnet18", 10, "imagenet")
    assert np.array_equal(model.layer3[0].downsample[0].weight.numpy(), weights.layer3[0].downsample[0].weight.numpy())
    assert int(model.bn1.num_batches_tracked.numpy()) == int(weights.bn1.num_batches_tracked.numpy())


def zip_of(folder: Path, archive: Path, extra: dict = None) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, str(path.relative_to(folder.parent)))
        for name, text in (extra or {}).items():
            zf.writestr(name, text)
    return archive


def test_imagenet_download_is_unzipped_and_loaded_safely(tmp_path, monkeypatch):
    flow.manual_seed(6)
    weights = M.build_model("resnet18", 1000, "none")[0]
    flow.save(weights.state_dict(), str(tmp_path / "src" / "resnet18"))
    good = zip_of(tmp_path / "src" / "resnet18", tmp_path / "good.zip")
    monkeypatch.setattr(W, "_download", lambda url, dst: Path(dst).write_bytes(good.read_bytes()))
    model, _ = M.build_model("resnet18", 10, "imagenet")
    assert np.array_equal(model.conv1.weight.numpy(), weights.conv1.weight.numpy())
    assert (M.imagenet_cache_path("resnet18") / "pickled_data").is_file()


def symlink_member(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o120777 << 16)  # a Unix symlink, as zip -y stores it
    return info


@pytest.mark.parametrize("member", ["../escaped.txt", "/abs.txt", "resnet18/link"])
def test_imagenet_zip_with_an_escaping_member_is_refused(tmp_path, monkeypatch, member):
    flow.manual_seed(6)
    flow.save(M.build_model("resnet18", 1000, "none")[0].state_dict(), str(tmp_path / "src" / "resnet18"))
    cache = M.imagenet_cache_path("resnet18").parent
    bad = zip_of(tmp_path / "src" / "resnet18", tmp_path / "bad.zip")
    with zipfile.ZipFile(bad, "a") as zf:
        zf.writestr(symlink_member(member, "/etc/passwd") if member.endswith("link") else member, "x")
    monkeypatch.setattr(W, "_download", lambda url, dst: Path(dst).write_bytes(bad.read_bytes()))
    with pytest.raises(M.WeightsError, match=f"refused to unpack .*{member}"):
        M.build_model("resnet18", 10, "imagenet")
    assert not (cache / "escaped.txt").exists() and not (cache.parent / "escaped.txt").exists()
    assert not M.imagenet_cached("resnet18") and list(cache.iterdir()) == []


@pytest.mark.parametrize("make,expected", [
    (lambda p: (p / "w.pth").write_bytes(b"PK\x03\x04 not really"), "is not a weights file TransferLab reads"),
    (lambda p: (p / "w.bin").write_bytes(b"\x00" * 64), "accepted: a .safetensors file, a TransferLab"),
    (lambda p: (p / "w").mkdir(), "is an empty folder; accepted: a .safetensors file"),
    (lambda p: flow.save({"conv1.weight": 3}, str(p / "w")), "conv1.weight is a int, not a tensor"),
    (lambda p: flow.save({1: flow.zeros(2)}, str(p / "w")), "has a key 1 that is not a name"),
    (lambda p: flow.save([flow.zeros(2)], str(p / "w")), "holds a list, not a state dict"),
    (lambda p: (p / "w.safetensors").write_bytes(b"\x10" * 32), "cannot read .* as a safetensors file"),
])
def test_bad_weights_give_one_clear_line(tmp_path, make, expected):
    make(tmp_path)
    (path,) = [p for p in tmp_path.iterdir()]
    with pytest.raises(M.WeightsError) as info:
        M.build_model("resnet18", 10, str(path))
    assert re.search(expected, str(info.value)) and "\n" not in str(info.value)


def tiny_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def sgd(model):
    head = list(model[4].parameters())
    body = [p for m in list(model)[:4] for p in m.parameters()]
    return flow.optim.SGD([{"params": body, "lr": 0.01, "name": "backbone"},
                           {"params": head, "lr": 0.1, "name": "head"}], lr=0.1, momentum=0.9, weight_decay=5e-4)


def step(model, optimizer, seed):
    rng = np.random.default_rng(seed)
    x = flow.tensor(rng.normal(size=(5, 3, 8, 8)).astype(np.float32))
    y = flow.tensor(rng.integers(0, 3, 5))
    optimizer.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    optimizer.step()


def test_safetensors_checkpoint_round_trip_resumes_exactly(tmp_path):
    flow.manual_seed(0)
    model, optimizer = tiny_net(), None
    optimizer = sgd(model)
    for s in range(3):
        step(model, optimizer, s)
    W.save_checkpoint(tmp_path / "ckpt", model, optimizer, {"epoch": 2, "classes": ["a", "b", "c"]})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == \
        ["meta.json", "model.safetensors", "optimizer.safetensors"]

    state, opt_state, meta = W.load_checkpoint(tmp_path / "ckpt")
    assert meta == {"epoch": 2, "classes": ["a", "b", "c"]}
    for key, value in model.state_dict().items():
        assert state[key].dtype == value.dtype and np.array_equal(state[key].numpy(), value.numpy()), key
    flow.manual_seed(1)
    again = tiny_net()
    again.load_state_dict(state)
    optimizer2 = sgd(again)
    optimizer2.load_state_dict(opt_state)
    assert [g["name"] for g in optimizer2.param_groups] == ["backbone", "head"]
    original = optimizer.state_dict()["state"]
    restored = optimizer2.state_dict()["state"]
    assert original.keys() == restored.keys()
    for key in original:
        if isinstance(original[key], dict):
            assert np.array_equal(original[key]["momentum_buf"].numpy(), restored[key]["momentum_buf"].numpy())
    step(model, optimizer, 9)
    step(again, optimizer2, 9)
    for (key, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), key


def torchvision_resnet18_keys():
    """torchvision's resnet18 state-dict names, as its ResNet/BasicBlock define them, without the
    BatchNorm step counters that files saved by older PyTorch lack (e.g. resnet18-f37072fd)."""
    def bn(prefix):
        return [f"{prefix}.{n}" for n in ("weight", "bias", "running_mean", "running_var")]
    keys = ["conv1.weight", *bn("bn1")]
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            keys += [f"{p}.conv1.weight", *bn(f"{p}.bn1"), f"{p}.conv2.weight", *bn(f"{p}.bn2")]
            if layer > 1 and block == 0:
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
    return keys + ["fc.weight", "fc.bias"]


def test_torchvision_named_safetensors_file_loads_into_the_backbone(tmp_path):
    from safetensors.numpy import save_file

    flow.manual_seed(7)
    source = M.build_model("resnet18", 1000, "none")[0].state_dict()
    names = torchvision_resnet18_keys()
    assert set(names) == {k for k in source if not k.endswith("num_batches_tracked")}
    save_file({k: source[k].numpy() for k in names}, str(tmp_path / "resnet18.tv_in1k.safetensors"))
    model, _ = M.build_model("resnet18", 10, str(tmp_path / "resnet18.tv_in1k.safetensors"))
    for key in names[:-2]:
        assert np.array_equal(model.state_dict()[key].numpy(), source[key].numpy()), key


def test_mobilenet_safetensors_file_with_torchvision_names_loads(tmp_path):
    """FlowVision's MobileNetV3-small has torchvision's names (features.N.block.M..., classifier.0/3):
    a 1000-class file without BatchNorm step counters loads, its classifier.3 head replaced."""
    from safetensors.numpy import save_file

    flow.manual_seed(9)
    source = M.build_model("mobilenet_v3_small", 1000, "none")[0].state_dict()
    assert "features.1.block.1.fc1.weight" in source and "classifier.3.weight" in source
    save_file({k: v.numpy() for k, v in source.items() if not k.endswith("num_batches_tracked")},
              str(tmp_path / "mobilenet_v3_small.safetensors"))
    model, head = M.build_model("mobilenet_v3_small", 10, str(tmp_path / "mobilenet_v3_small.safetensors"))
    assert head == "classifier.3" and model.classifier[3].out_features == 10
    for key in ("features.1.block.1.fc1.weight", "features.12.1.running_var", "classifier.0.weight"):
        assert np.array_equal(model.state_dict()[key].numpy(), source[key].numpy()), key


def test_old_flow_save_checkpoint_folder_still_loads(tmp_path):
    flow.manual_seed(8)
    source = M.build_model("resnet18", 10, "none")[0]
    optimizer = flow.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    flow.save(source.state_dict(), str(tmp_path / "old" / "model"))
    flow.save(optimizer.state_dict(), str(tmp_path / "old" / "optimizer"))
    (tmp_path / "old" / "meta.json").write_text(json.dumps({"backbone": "resnet18", "num_classes": 10}))
    model, _ = M.build_model("resnet18", 10, str(tmp_path / "old"))
    assert np.array_equal(model.layer4[1].bn2.running_var.numpy(), source.layer4[1].bn2.running_var.numpy())
    state, opt_state, meta = W.load_checkpoint(tmp_path / "old")
    assert meta["num_classes"] == 10 and opt_state["param_groups"][0]["_options"]["momentum"] == 0.9


# ---------------------------------------------------------------------------------------------
# data


@pytest.mark.parametrize("name", ["data_batch_2", "test_batch", "batches.meta"])
def test_crafted_cifar_file_is_refused(tmp_path, name):
    marker = tmp_path / "marker"
    write_cifar(tmp_path / "data")
    path = tmp_path / "data" / D.CIFAR10_FOLDER / name
    path.write_bytes(pickle.dumps({"data": RunsShell(marker)}, protocol=2))
    with pytest.raises(D.DataError) as info:
        D.load_dataset("cifar10", str(tmp_path / "data"), 16)
    assert not marker.exists()
    assert f"refused to load {path}: it asks for posix.system" in str(info.value)


class Py2Pickler(pickle._Pickler):
    """Writes byte strings with Python 2's str opcodes (SHORT_BINSTRING/BINSTRING), as the cPickle
    that wrote the real CIFAR-10 files did (Python 3's protocol 2 writes _codecs.encode calls)."""

    def save_bytes(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def python2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


@pytest.mark.parametrize("dumps", [python2_pickle, lambda obj: pickle.dumps(obj, protocol=2)])
def test_cifar_batches_with_python2_style_bytes_keys_load(tmp_path, dumps):
    """Real CIFAR files are Python 2 pickles (protocol 2) of dicts whose keys are byte strings."""
    folder = tmp_path / D.CIFAR10_FOLDER
    folder.mkdir()
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        entry = {b"batch_label": name.encode(), b"data": batches[name],
                 b"labels": [0, 1, 2, 9], b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"]}
        (folder / name).write_bytes(dumps(entry))
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                  "ship", "truck")]
    (folder / "batches.meta").write_bytes(dumps({b"label_names": names, b"num_vis": 3072}))
    train, test = D.load_dataset("cifar10", str(tmp_path), 16)
    assert train.images.shape == (20, 32, 32, 3) and test.classes[9] == "truck"
    assert test.labels.tolist() == [0, 1, 2, 9]
    assert np.array_equal(test.images[3], batches["test_batch"][3].reshape(3, 32, 32).transpose(1, 2, 0))


@pytest.mark.parametrize("content,expected", [
    ([1, 2, 3], "holds a list, not a dict"),
    ({"labels": [1]}, "has no data"),
    ({"data": np.zeros((2, 100), np.uint8), "labels": [1, 2]}, r"data is \(2, 100\), expected N x 3072 uint8"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}, "needs 2 labels from 0 to 9"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 12]}, "needs 2 labels from 0 to 9"),
])
def test_malformed_cifar_batch_gives_one_line(tmp_path, content, expected):
    write_cifar(tmp_path)
    (tmp_path / D.CIFAR10_FOLDER / "data_batch_4").write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(D.DataError, match=expected) as info:
        D.load_dataset("cifar10", str(tmp_path), 16)
    assert "data_batch_4" in str(info.value) and "\n" not in str(info.value)


def add_bytes(tar, name, payload=b"x", **attrs):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    for key, value in attrs.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(payload) if info.isfile() else None)


@pytest.mark.parametrize("member", ["../../escaped", "ABSOLUTE", "symlink", "hardlink", "device"])
def test_tar_with_an_escaping_member_is_refused(tmp_path, member):
    src = tmp_path / "src"
    write_cifar(src)
    root = tmp_path / "a" / "b" / "root"
    root.mkdir(parents=True)
    outside = tmp_path / "abs" / "escaped"
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / D.CIFAR10_FOLDER, arcname=D.CIFAR10_FOLDER)
        if member == "ABSOLUTE":
            member = str(outside)
            add_bytes(tar, member)
        elif member == "symlink":
            add_bytes(tar, f"{D.CIFAR10_FOLDER}/link", type=tarfile.SYMTYPE, linkname=str(outside))
        elif member == "hardlink":
            add_bytes(tar, f"{D.CIFAR10_FOLDER}/link", type=tarfile.LNKTYPE, linkname="/etc/hostname")
        elif member == "device":
            add_bytes(tar, f"{D.CIFAR10_FOLDER}/dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        else:
            add_bytes(tar, member)
    with pytest.raises(D.DataError, match="refused to extract .*cifar-10-python.tar.gz: member"):
        D.load_dataset("cifar10", str(root), 16)
    assert not (tmp_path / "a" / "escaped").exists() and not outside.exists()
    assert [p.name for p in root.iterdir()] == ["cifar-10-python.tar.gz"]  # nothing extracted at all


def write_imagefolder(root: Path, size: int, damaged: bool = False) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (size, size), (10, 20, 30)).save(root / split / cls / "x.png")
    if damaged:
        (root / "train" / "b" / "y.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


@pytest.mark.parametrize("limit,expected", [(3000, "larger than 3000 pixels"), (1000, "decompression bomb")])
def test_decompression_bomb_image_gives_one_line(tmp_path, monkeypatch, limit, expected):
    from PIL import Image

    root = write_imagefolder(tmp_path / "imgs", 64)  # 4,096 pixels: a warning over 3,000, an error over 2,000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(D.DataError, match=expected) as info:
        D.load_dataset(f"imagefolder:{root}", "", 16)
    assert "x.png" in str(info.value) and "\n" not in str(info.value)


def test_undecodable_image_gives_one_line(tmp_path):
    root = write_imagefolder(tmp_path / "imgs", 8, damaged=True)
    with pytest.raises(D.DataError, match="cannot read image .*y.png"):
        D.load_dataset(f"imagefolder:{root}", "", 16)


# ---------------------------------------------------------------------------------------------
# one lock for every model build


def test_model_builds_and_parameter_counts_never_overlap(monkeypatch):
    """build_model and suggest.param_counts (the form's counts: a build, then the strategy's
    set-up) hold the same lock: OneFlow model work from several threads runs one at a time."""
    from core import strategies, suggest

    active, peak = [0], [0]
    guard = threading.Lock()

    def exclusive(real):
        def slow(*args):
            with guard:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
                overlapping = active[0] > 1
            try:
                if overlapping:  # never run OneFlow concurrently here: it was seen to deadlock
                    raise RuntimeError("two model builds overlap")
                time.sleep(0.3)
                return real(*args)
            finally:
                with guard:
                    active[0] -= 1
        return slow

    monkeypatch.setattr(M, "_construct", exclusive(M._construct))
    monkeypatch.setattr(strategies, "prepare", exclusive(strategies.prepare))
    suggest._param_counts.cache_clear()
    jobs = [(suggest.param_counts, ("resnet18", "frozen", 3)), (M.build_model, ("resnet18", 10, "none")),
            (M.build_model, ("resnet18", 4, "none"))]
    threads = [threading.Thread(target=f, args=a, daemon=True) for f, a in jobs]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=120)
    suggest._param_counts.cache_clear()
    assert peak[0] == 1


# ---------------------------------------------------------------------------------------------
# files that would hang the reader or fill the memory


def nested_bomb(depth=6, width=100):
    """A pickle of a few KB that unfolds to width**depth items (each level is one list repeated)."""
    value = [0] * width
    for _ in range(depth - 1):
        value = [value] * width
    return value


def test_a_pickle_that_unfolds_into_a_huge_structure_is_refused_at_once(tmp_path):
    import time

    folder = crafted_state_folder(tmp_path / "bomb", nested_bomb())
    assert (folder / "pickled_data").stat().st_size < 10_000
    start = time.monotonic()
    with pytest.raises(W.WeightsError, match="more than 1,000,000 items"):
        W.read_state_dict(folder)
    assert time.monotonic() - start < 10


def test_cifar_labels_that_unfold_into_a_huge_structure_are_refused_at_once(tmp_path):
    import time

    write_cifar(tmp_path)
    bomb = {"data": np.zeros((2, 3072), np.uint8), "labels": nested_bomb(depth=5, width=1000)}
    (tmp_path / D.CIFAR10_FOLDER / "data_batch_1").write_bytes(pickle.dumps(bomb, protocol=2))
    start = time.monotonic()
    with pytest.raises(D.DataError, match="needs 2 labels from 0 to 9"):
        D.load_dataset("cifar10", str(tmp_path), 16)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("what", ["many members", "huge member"])
def test_a_tar_bomb_is_refused_before_anything_is_extracted(tmp_path, monkeypatch, what):
    monkeypatch.setattr(D, "MAX_TAR_MEMBERS", 20)
    monkeypatch.setattr(D, "MAX_TAR_BYTES", 1 << 20)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        if what == "many members":
            for i in range(30):
                add_bytes(tar, f"{D.CIFAR10_FOLDER}/junk{i}")
        else:
            add_bytes(tar, f"{D.CIFAR10_FOLDER}/junk", b"\0" * (2 << 20))
    with pytest.raises(D.DataError, match="refused to extract .*: (more than 20 members|it unpacks to more)"):
        D.load_dataset("cifar10", str(tmp_path), 16)
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-10-python.tar.gz"]


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_a_device_is_refused_not_read(tmp_path, kind):
    """Opening a FIFO blocks until someone writes to it; /dev/zero never ends: neither is read."""
    import os

    from core import config as C

    def special(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path) if kind == "fifo" else path.symlink_to("/dev/zero")
        return path

    with pytest.raises(C.ConfigError, match="is not a regular file"):
        C.load(special(tmp_path / "preset.toml"))
    with pytest.raises(W.WeightsError, match="neither a regular file nor a folder"):
        W.read_state_dict(special(tmp_path / "w.safetensors"))
    write_cifar(tmp_path / "c")
    (tmp_path / "c" / D.CIFAR10_FOLDER / "data_batch_3").unlink()
    special(tmp_path / "c" / D.CIFAR10_FOLDER / "data_batch_3")
    with pytest.raises(D.DataError, match="data_batch_3 is not a regular file"):
        D.load_dataset("cifar10", str(tmp_path / "c"), 16)
    root = write_imagefolder(tmp_path / "i", 8)
    special(root / "train" / sorted(p.name for p in (root / "train").iterdir())[0] / "z.png")
    with pytest.raises(D.DataError, match="z.png: not a regular file"):
        D.load_dataset(f"imagefolder:{root}", "", 8)


def test_weights_larger_than_any_backbone_are_refused_unread(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    monkeypatch.setattr(W, "MAX_WEIGHTS_BYTES", 1000)
    save_file({"w": np.zeros(1000, np.float32)}, str(tmp_path / "big.safetensors"))
    with pytest.raises(W.WeightsError, match="holds more than"):
        W.read_state_dict(tmp_path / "big.safetensors")


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.int64])
def test_weights_that_are_not_floating_point_are_refused(tmp_path, dtype):
    from safetensors.numpy import save_file

    model, _ = M.build_model("resnet18", 10, "none")
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    arrays["layer1.0.conv1.weight"] = arrays["layer1.0.conv1.weight"].astype(dtype)
    save_file(arrays, str(tmp_path / "w.safetensors"))
    with pytest.raises(W.WeightsError, match="not floating point: layer1.0.conv1.weight"):
        M.build_model("resnet18", 10, str(tmp_path / "w.safetensors"))
