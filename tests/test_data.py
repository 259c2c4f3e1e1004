import pickle
import tarfile
from urllib.error import URLError

import numpy as np
import pytest

from core import data as D
from core.backend import flow


def write_cifar(root, per_batch=6, test=5):
    """Small CIFAR-10 python-format batches (pickled dicts, rows of 3072 uint8 in CHW order)."""
    folder = root / D.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    expected = {}
    for name in names:
        n = test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels,
                         "filenames": [f"img{i}.png" for i in range(n)]}, f, protocol=2)
        expected[name] = (data, labels)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": classes, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return expected, classes


def test_cifar10_reads_python_batches(tmp_path):
    expected, classes = write_cifar(tmp_path)
    train, test = D.load_cifar10(tmp_path, download=False)
    assert train.images.shape == (30, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (5, 32, 32, 3) and train.classes == classes
    data, labels = expected["data_batch_2"]
    first = train.images[6]  # first image of batch 2
    assert np.array_equal(first[:, :, 0], data[0, :1024].reshape(32, 32))  # red plane
    assert np.array_equal(first[:, :, 2], data[0, 2048:].reshape(32, 32))  # blue plane
    assert train.labels[6] == labels[0]
    assert list(test.labels) == expected["test_batch"][1]


def test_cifar10_extracts_a_local_archive(tmp_path):
    src = tmp_path / "src"
    write_cifar(src)
    dest = tmp_path / "data"
    dest.mkdir()
    with tarfile.open(dest / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / D.CIFAR10_FOLDER, arcname=D.CIFAR10_FOLDER)
    assert D.cifar10_present(dest)
    train, test = D.load_cifar10(dest, download=False)
    assert len(train) == 30 and len(test) == 5


def test_cifar10_missing_and_offline_says_where_to_put_it(tmp_path, monkeypatch):
    def offline(root):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(D, "download_cifar10", offline)
    with pytest.raises(D.DataError) as info:
        D.load_cifar10(tmp_path / "nowhere")
    message = str(info.value)
    assert "could not be downloaded" in message and "Name or service not known" in message
    assert D.CIFAR10_URL in message and str(tmp_path / "nowhere") in message and "digits" in message
    assert not D.cifar10_present(tmp_path / "nowhere")


def test_cifar10_damaged_files_are_reported(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / D.CIFAR10_FOLDER / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(D.DataError, match="incomplete or damaged"):
        D.load_cifar10(tmp_path, download=False)


def test_imagefolder_reads_pngs(tmp_path):
    from PIL import Image

    colours = {"cats": (200, 30, 30), "dogs": (30, 200, 30), "owls": (30, 30, 200)}
    for split, count in (("train", 3), ("val", 2)):
        for name, colour in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (20 + i, 12), colour).save(tmp_path / split / name / f"{i}.png")
    (tmp_path / "train" / "cats" / "notes.txt").write_text("not an image")
    train, test = D.load_dataset(f"imagefolder:{tmp_path}", "unused", image_size=10)
    assert train.classes == ["cats", "dogs", "owls"] and test.classes == train.classes
    assert train.images.shape == (9, 10, 10, 3) and test.images.shape == (6, 10, 10, 3)
    assert list(train.labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert tuple(train.images[4, 5, 5]) == colours["dogs"]


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(D.DataError, match="needs a train/ folder"):
        D.load_imagefolder(tmp_path, 8)


def test_digits_split_is_stratified_and_fixed():
    train, test = D.load_digits()
    again_train, again_test = D.load_digits()
    assert np.array_equal(test.labels, again_test.labels) and np.array_equal(test.images, again_test.images)
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.images.shape[1:] == (8, 8, 3) and train.images.dtype == np.uint8 and train.images.max() == 255
    share_train = np.bincount(train.labels) / len(train)
    share_test = np.bincount(test.labels) / len(test)
    assert np.abs(share_train - share_test).max() < 0.01


def test_subset_is_stratified():
    train, _ = D.load_digits()
    small = train.subset(100, seed=3)
    assert len(small) == 100 and set(np.bincount(small.labels)) <= {9, 10, 11}


def test_bilinear_matrix_matches_interpolate():
    x = np.random.default_rng(0).random((2, 3, 8, 6)).astype(np.float32)
    t = D.BatchTransform(flow, "cpu", (8, 6), 13, "none", False, False)
    images = (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    ours = t(images, False, np.random.default_rng(0)).numpy()
    ref = flow.nn.functional.interpolate(flow.tensor(images.transpose(0, 3, 1, 2).astype(np.float32) / 255),
                                         size=(13, 13), mode="bilinear", align_corners=False).numpy()
    assert ours.shape == (2, 3, 13, 13)
    assert np.abs(ours - ref).max() < 1e-5


def test_normalisation_statistics():
    t = D.BatchTransform(flow, "cpu", (4, 4), 4, "imagenet", False, False)
    images = np.zeros((1, 4, 4, 3), np.uint8)
    images[..., 0], images[..., 1], images[..., 2] = 255, 0, 128
    out = t(images, False, np.random.default_rng(0)).numpy()
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert np.allclose(out[0].mean(axis=(1, 2)), expected, atol=1e-5)
    assert np.allclose(out[0].std(axis=(1, 2)), 0, atol=1e-6)


def test_flips_flip_about_half_of_the_images():
    t = D.BatchTransform(flow, "cpu", (4, 4), 4, "none", True, False)
    images = np.zeros((400, 4, 4, 3), np.uint8)
    images[:, :, 0, :] = 255  # left column bright
    out = t(images, True, np.random.default_rng(1)).numpy()
    left, right = out[:, 0, :, 0].mean(axis=1), out[:, 0, :, 3].mean(axis=1)
    flipped = (right == 1) & (left == 0)
    kept = (left == 1) & (right == 0)
    assert np.all(flipped | kept)
    assert 150 < flipped.sum() < 250
    untouched = t(images, False, np.random.default_rng(1)).numpy()
    assert np.all(untouched[:, 0, :, 0] == 1)


def test_digits_class_subset_keeps_those_classes_relabelled_in_order():
    full_train, full_test = D.load_digits()
    train, test = D.load_dataset("digits", "unused", 8, classes="7,2,5")
    assert train.classes == ["7", "2", "5"] and test.classes == train.classes
    for split, full in ((train, full_train), (test, full_test)):
        assert sorted(set(split.labels)) == [0, 1, 2]
        for new, old in enumerate((7, 2, 5)):
            assert np.array_equal(split.images[split.labels == new], full.images[full.labels == old])
    assert len(train) == sum(int((full_train.labels == c).sum()) for c in (7, 2, 5))
    low, _ = D.load_dataset("digits", "unused", 8, classes="0-4")
    assert low.classes == ["0", "1", "2", "3", "4"] and low.labels.max() == 4
    assert len(low.subset(50, seed=0)) == 50 and set(low.subset(50, seed=0).labels) == set(range(5))


def test_cifar10_class_subset_by_name_or_index(tmp_path):
    write_cifar(tmp_path, per_batch=20, test=20)
    full_train, full_test = D.load_cifar10(tmp_path, download=False)
    train, test = D.load_dataset("cifar10", str(tmp_path), 32, download=False, classes="dog,cat")
    assert train.classes == ["dog", "cat"] and test.classes == ["dog", "cat"]
    for split, full in ((train, full_train), (test, full_test)):
        assert len(split) == int(np.isin(full.labels, [5, 3]).sum())
        assert np.array_equal(split.images[split.labels == 0], full.images[full.labels == 5])
        assert np.array_equal(split.images[split.labels == 1], full.images[full.labels == 3])
    by_index, _ = D.load_dataset("cifar10", str(tmp_path), 32, download=False, classes="5,3")
    assert by_index.classes == ["dog", "cat"] and np.array_equal(by_index.labels, train.labels)


def test_imagefolder_class_subset_reads_only_those_folders(tmp_path):
    from PIL import Image

    colours = {"cats": (200, 30, 30), "dogs": (30, 200, 30), "owls": (30, 30, 200)}
    for split in ("train", "test"):
        for name, colour in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), colour).save(tmp_path / split / name / f"{i}.png")
    (tmp_path / "train" / "cats" / "0.png").write_bytes(b"not a png: never read when cats are left out")
    train, test = D.load_dataset(f"imagefolder:{tmp_path}", "unused", 8, classes="owls,dogs")
    assert train.classes == ["owls", "dogs"] and list(train.labels) == [0, 0, 1, 1]
    assert tuple(train.images[0, 4, 4]) == colours["owls"] and tuple(test.images[3, 4, 4]) == colours["dogs"]
    by_index, _ = D.load_dataset(f"imagefolder:{tmp_path}", "unused", 8, classes="2,1")
    assert by_index.classes == ["owls", "dogs"]
    with pytest.raises(D.DataError) as info:
        D.load_dataset(f"imagefolder:{tmp_path}", "unused", 8, classes="owls,bats")
    assert str(info.value) == f"classes: imagefolder {tmp_path} has no class 'bats'; it has cats, dogs, owls (indices 0-2)"


@pytest.mark.parametrize("dataset, classes, message", [
    ("digits", "8-12", "classes: digits has no class 10, 11, 12; it has 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 (indices 0-9)"),
    ("synthetic", "class1,class9", "classes: synthetic has no class 'class9'; it has class0, class1, class2, class3 "
                                   "(indices 0-3)"),
    ("digits", "0,0", "classes lists 0 more than once"),
])
def test_unknown_classes_are_one_line_listing_what_exists(dataset, classes, message):
    with pytest.raises(D.DataError) as info:
        D.load_dataset(dataset, "unused", 8, classes=classes)
    assert str(info.value) == message


def test_batches_never_leave_a_single_image_alone_and_cover_every_image_once():
    from core.data import batch_count, batches

    for n, size in [(17, 16), (33, 16), (32, 16), (1, 16), (0, 4), (5, 1), (2, 1), (65, 64), (3, 2)]:
        got = list(batches(n, size, True, np.random.default_rng(0)))
        assert len(got) == batch_count(n, size)
        assert sorted(np.concatenate(got).tolist() if got else []) == list(range(n))
        assert all(len(b) > 1 for b in got) or size == 1 or n == 1, (n, size, [len(b) for b in got])
        assert all(len(b) <= size + 1 for b in got)
    in_order = list(batches(17, 16, False, np.random.default_rng(0)))  # evaluation: as they come
    assert [len(b) for b in in_order] == [16, 1]
