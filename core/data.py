"""Datasets as uint8 arrays, and the batched augment/resize/normalise pipeline on the device.

Every loader returns an `ArrayData` (images N x H x W x 3 uint8, labels N int64, class names).
Flips, resizing and normalisation run on whole batches as tensor ops on the training device,
not per image in PIL: see `BatchTransform`.
"""
from __future__ import annotations

import _codecs
import io
import pickle
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from core.errors import SetupError
from core.files import is_regular_file, too_large

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(SetupError):
    """A dataset cannot be loaded; the message says what to do."""


@dataclass
class ArrayData:
    images: np.ndarray
    """N x H x W x 3, uint8."""
    labels: np.ndarray
    """N, int64 class indices."""
    classes: List[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, limit: int, seed: int) -> "ArrayData":
        """A stratified subset of `limit` items (self when limit is 0 or covers everything)."""
        if limit <= 0 or limit >= len(self):
            return self
        idx = stratified_indices(self.labels, limit, seed)
        return ArrayData(self.images[idx], self.labels[idx], self.classes)

    def select(self, picked: Sequence[int]) -> "ArrayData":
        """Only the classes `picked` (indices into self.classes), relabelled 0..k-1 in that order."""
        relabel = np.full(len(self.classes), -1, np.int64)
        relabel[list(picked)] = np.arange(len(picked))
        new = relabel[self.labels]
        keep = np.flatnonzero(new >= 0)
        return ArrayData(self.images[keep], new[keep], [self.classes[i] for i in picked])


def stratified_indices(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` indices drawn so that each class keeps its share (largest remainders), sorted."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * count / len(labels)
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take), kind="stable")[: count - take.sum()]:
        take[i] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


# ---------------------------------------------------------------------------------------------
# Loaders


def load_digits() -> Tuple[ArrayData, ArrayData]:
    """scikit-learn's bundled 8x8 digits (1,797 images) as RGB, with a fixed stratified split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    gray = np.clip(bunch.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    images = np.repeat(gray[..., None], 3, axis=3)
    labels = bunch.target.astype(np.int64)
    classes = [str(c) for c in range(10)]
    test_idx = stratified_indices(labels, len(labels) // 5, seed=20240229)
    train_mask = np.ones(len(labels), bool)
    train_mask[test_idx] = False
    return (
        ArrayData(images[train_mask], labels[train_mask], classes),
        ArrayData(images[test_idx], labels[test_idx], classes),
    )


def load_synthetic(n_train: int = 512, n_test: int = 128, size: int = 16, classes: int = 4,
                   seed: int = 0) -> Tuple[ArrayData, ArrayData]:
    """Generated images whose class is a colour and stripe pattern plus noise: learnable, tiny."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]

    def make(n: int) -> ArrayData:
        labels = rng.integers(0, classes, n)
        base = np.zeros((n, size, size, 3), np.float32)
        for c in range(classes):
            sel = labels == c
            stripes = ((xx if c % 2 else yy) // max(1, size // (2 + c))) % 2
            base[sel, :, :, c % 3] = 180 * stripes + 40
        noisy = base + rng.normal(0, 30, base.shape)
        return ArrayData(np.clip(noisy, 0, 255).astype(np.uint8), labels.astype(np.int64),
                         [f"class{c}" for c in range(classes)])

    return make(n_train), make(n_test)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3 pickles (protocol 2) write for bytes: `_codecs.encode(text, "latin1")`."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not a bytes literal")
    return _codecs.encode(text, "latin1")


def _numpy_reconstruct() -> Any:
    from numpy.core.multiarray import _reconstruct  # numpy 1.x (oneflow 0.9.0 needs numpy < 2)

    return _reconstruct


# What python-format CIFAR batches reference (pickletools.genops on files written like the real ones,
# protocol 2 from Python 2 style dicts; flowvision's CIFAR10 reads them with pickle.load):
# numpy arrays are rebuilt by _reconstruct(ndarray, shape, dtype) then their state, and Python 3's
# protocol 2 writes bytes as _codecs.encode(str, "latin1"). Nothing else is allowed.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_bytes,
}


class _CifarUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, bytes, numbers and numpy arrays only."""

    def __init__(self, data: bytes, source: Path):
        super().__init__(io.BytesIO(data), encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise DataError(f"refused to load {self.source}: it asks for {module}.{name}, which a CIFAR-10 "
                            f"batch never needs (the file may be crafted to run code); nothing from it was run")
        return _CIFAR_GLOBALS[(module, name)]()


def _read_cifar_pickle(path: Path, keys: Sequence[str]) -> Dict[str, Any]:
    """The dict in a CIFAR python-format file, with str keys, holding at least `keys`."""
    if not is_regular_file(path):  # a FIFO would block the read, /dev/zero never end it
        raise DataError(f"CIFAR-10 file {path} is not a regular file")
    if too_large(path, MAX_CIFAR_FILE):
        raise DataError(f"CIFAR-10 file {path} is larger than any CIFAR-10 batch ({MAX_CIFAR_FILE >> 20} MB)")
    try:
        entry = _CifarUnpickler(path.read_bytes(), path).load()
    except (DataError, OSError):
        raise
    except Exception as exc:  # a damaged or foreign pickle can raise nearly anything while read
        raise DataError(f"CIFAR-10 file {path} is incomplete or damaged ({type(exc).__name__}: {exc}); "
                        f"delete {path.parent} and download it again") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path} is not a CIFAR-10 file: it holds a {type(entry).__name__}, not a dict")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DataError(f"{path} is not a CIFAR-10 file: it has no {', '.join(missing)}")
    return entry


def _read_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    entry = _read_cifar_pickle(path, ["data"])
    data = entry["data"]
    labels = entry.get("labels", entry.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = data.shape if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path} is not a CIFAR-10 batch: data is {shape}, expected N x 3072 uint8")
    # a flat list of ints, checked before numpy sees it (a pickle can nest one list in itself)
    if isinstance(labels, list) and len(labels) == len(data) and all(type(v) is int for v in labels):
        labels = np.asarray(labels, dtype=np.int64) if all(0 <= v <= 9 for v in labels) else None
    elif not (isinstance(labels, np.ndarray) and labels.dtype.kind in "iu" and labels.ndim == 1):
        labels = None
    if labels is None or labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"{path} is not a CIFAR-10 batch: it needs {len(data)} labels from 0 to 9")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _read_cifar_classes(path: Path) -> List[str]:
    names = _read_cifar_pickle(path, ["label_names"])["label_names"]
    if not (isinstance(names, list) and len(names) == 10 and all(isinstance(n, (str, bytes)) for n in names)):
        raise DataError(f"{path} is not CIFAR-10's batches.meta: label_names must be 10 names")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


MAX_CIFAR_FILE = 64 << 20
"""A CIFAR-10 batch is 30 MB."""
MAX_TAR_MEMBERS = 1000
MAX_TAR_BYTES = 1 << 30
"""CIFAR-10's archive has 8 members that unpack to 178 MB; anything far beyond is refused unread."""


def safe_extract_tar(archive: Path, root: Path) -> None:
    """Extract `archive` into `root`, refusing (DataError, before anything is written) members with
    an absolute path or `..`, links and device files. Python's own `filter="data"` (PEP 706) is
    used as well where it exists; the explicit check holds on Pythons without it."""
    root = root.resolve()
    if not is_regular_file(archive):
        raise DataError(f"{archive} is not a regular file")
    with tarfile.open(archive) as tar:
        members = []
        for m in tar:  # counted as they are read: a small archive can list millions of members
            members.append(m)
            if len(members) > MAX_TAR_MEMBERS or sum(x.size for x in members[-1:]) > MAX_TAR_BYTES:
                raise DataError(f"refused to extract {archive}: more than {MAX_TAR_MEMBERS} members or a "
                                f"member over {MAX_TAR_BYTES >> 20} MB: it is not CIFAR-10's archive")
        if sum(m.size for m in members) > MAX_TAR_BYTES:
            raise DataError(f"refused to extract {archive}: it unpacks to more than {MAX_TAR_BYTES >> 20} MB, "
                            f"CIFAR-10's to 178 MB")
        for m in members:
            inside = (root / m.name).resolve()
            if m.name.startswith("/") or ".." in Path(m.name).parts or not inside.is_relative_to(root):
                raise DataError(f"refused to extract {archive}: member {m.name!r} would be written outside {root}")
            if not (m.isfile() or m.isdir()):
                raise DataError(f"refused to extract {archive}: member {m.name!r} is a link or a device file")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, members, filter="data")
        else:
            tar.extractall(root, members)


def download_cifar10(root: Path) -> None:
    """Download CIFAR-10's archive into `root` with FlowVision's downloader (checking its MD5)
    and extract it safely (FlowVision's own extraction trusts every member)."""
    from flowvision.datasets import CIFAR10
    from flowvision.datasets.utils import download_url

    download_url(CIFAR10_URL, str(root), CIFAR10.filename, CIFAR10.tgz_md5)
    safe_extract_tar(root / CIFAR10.filename, root)


def load_cifar10(root: str | Path, download: bool = True) -> Tuple[ArrayData, ArrayData]:
    """CIFAR-10 from `root`/cifar-10-batches-py (the python-format batches).

    When the folder is missing and `download` is true, FlowVision downloads it; offline this
    fails with a message that says where to put the files.
    """
    root = Path(root).expanduser()
    folder = root / CIFAR10_FOLDER
    if not (folder / "test_batch").exists():
        archive = root / "cifar-10-python.tar.gz"
        if archive.exists():
            try:
                safe_extract_tar(archive, root)
            except (OSError, tarfile.TarError, EOFError) as exc:
                raise DataError(f"cannot extract {archive} ({exc}); delete it and download it again") from None
        elif download:
            try:
                download_cifar10(root)
            except DataError:
                raise
            except Exception as exc:  # URLError, socket errors, HTTP errors, bad archives
                raise DataError(
                    f"CIFAR-10 is not in {folder} and could not be downloaded ({exc}). "
                    f"Download {CIFAR10_URL} on a machine with internet and put the archive in "
                    f"{root} (or extract it there), or pick the built-in digits dataset."
                ) from None
        if not (folder / "test_batch").exists():
            raise DataError(
                f"CIFAR-10 is not in {folder}: put cifar-10-python.tar.gz from {CIFAR10_URL} "
                f"in {root}, or pick the built-in digits dataset."
            )
    try:
        parts = [_read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
        test_x, test_y = _read_cifar_batch(folder / "test_batch")
        classes = _read_cifar_classes(folder / "batches.meta")
    except OSError as exc:
        raise DataError(f"CIFAR-10 files in {folder} are incomplete or damaged ({exc}); "
                        f"delete the folder and download it again") from None
    train = ArrayData(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), classes)
    return train, ArrayData(test_x, test_y, classes)


def cifar10_present(root: str | Path) -> bool:
    root = Path(root).expanduser()
    return (root / CIFAR10_FOLDER / "test_batch").exists() or (root / "cifar-10-python.tar.gz").exists()


def read_image(path: Path, size: Optional[int]) -> np.ndarray:
    """One image as `size` x `size` RGB uint8 (at its own size when `size` is None). Images over
    PIL's decompression-bomb limit (its warning as well as its error) and anything PIL cannot
    decode give one DataError line."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = img.convert("RGB")
                if size is not None:
                    img = img.resize((size, size), Image.BILINEAR)
                return np.asarray(img, dtype=np.uint8)
    except Image.DecompressionBombWarning:
        raise DataError(f"refused image {path}: it is larger than {Image.MAX_IMAGE_PIXELS} pixels "
                        f"(PIL's limit against decompression bombs)") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"refused image {path}: {exc}") from None
    except Exception as exc:  # PIL's decoders raise OSError, ValueError, SyntaxError, struct.error...
        raise DataError(f"cannot read image {path} ({type(exc).__name__}: {exc})") from None


def _read_folder(folder: Path, classes: Sequence[str], size: int) -> ArrayData:
    images, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
            if (folder / name).is_dir() else []
        for path in files:
            if not is_regular_file(path):  # a FIFO would block the read, a device never end it
                raise DataError(f"cannot read image {path}: not a regular file")
            images.append(read_image(path, size))
            labels.append(index)
    if not images:
        raise DataError(f"no images found in {folder} (expected one subfolder of images per class)")
    return ArrayData(np.stack(images), np.asarray(labels, np.int64), list(classes))


def load_imagefolder(path: str | Path, size: int, classes: str = "") -> Tuple[ArrayData, ArrayData]:
    """PATH/train/<class>/*.png and PATH/test/<class>/ (or PATH/val/<class>/), read at `size` px;
    with `classes`, only those class folders (see pick_classes), in the order given."""
    root = Path(path).expanduser()
    train_dir = root / "train"
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"imagefolder {root} needs a train/ folder and a test/ (or val/) folder, "
                        f"each with one subfolder per class")
    names = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(names) < 2:
        raise DataError(f"{train_dir} must have at least two class subfolders, found {len(names)}")
    names = [names[i] for i in pick_classes(names, classes, f"imagefolder {root}")]
    return _read_folder(train_dir, names, size), _read_folder(test_dir, names, size)


def pick_classes(available: Sequence[str], classes: str, dataset: str) -> List[int]:
    """The indices into `available` that the `classes` setting names (core.config.parse_classes
    syntax), in its order; every class when it is empty. A class the dataset does not have is a
    DataError whose one line lists the classes it does have."""
    from core.config import parse_classes

    try:
        wanted = parse_classes(classes)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if not wanted:
        return list(range(len(available)))
    index = {name: i for i, name in enumerate(available)}
    unknown = [c for c in wanted if (c not in index if isinstance(c, str) else c >= len(available))]
    if unknown:
        listed = ", ".join(available[:MAX_LISTED]) + (f" and {len(available) - MAX_LISTED} more"
                                                      if len(available) > MAX_LISTED else "")
        what = ", ".join(repr(c) if isinstance(c, str) else str(c) for c in unknown[:5])
        raise DataError(f"classes: {dataset} has no class {what}; it has {listed} (indices 0-{len(available) - 1})")
    return [index[c] if isinstance(c, str) else c for c in wanted]


MAX_LISTED = 20
"""An unknown-class message lists at most this many of the dataset's classes."""


def load_dataset(name: str, data_root: str, image_size: int, seed: int = 0,
                 download: bool = True, classes: str = "") -> Tuple[ArrayData, ArrayData]:
    """The (train, test) pair for a config's dataset name, with only the `classes` it picks
    (relabelled 0..k-1 in the order given; all of them when empty)."""
    if name.startswith("imagefolder:"):  # reads the picked classes' folders only
        return load_imagefolder(name[len("imagefolder:"):], image_size, classes)
    if name == "digits":
        train, test = load_digits()
    elif name == "synthetic":
        train, test = load_synthetic(seed=seed)
    elif name == "cifar10":
        train, test = load_cifar10(data_root, download=download)
    else:
        raise DataError(f"unknown dataset {name!r}")
    if not classes.strip():
        return train, test
    picked = pick_classes(train.classes, classes, name)
    return train.select(picked), test.select(picked)


def batch_count(n: int, batch_size: int) -> int:
    """How many training batches `batches` makes of `n` images (the steps of an epoch)."""
    count = -(-n // batch_size)
    return count - 1 if count > 1 and n % batch_size == 1 else count


def batches(n: int, batch_size: int, shuffle: bool, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Index arrays covering range(n) in batches (the last one may be smaller). Training batches
    (shuffled) never end with a single image: it joins the batch before (which then holds
    batch_size + 1), since BatchNorm in training mode has one value per channel where its maps are
    1x1 (a ResNet's last stage at 32 px or less) and OneFlow's running variance of one value is
    NaN, which fails the run. Evaluation batches (in order; BatchNorm in eval mode) need not."""
    order = rng.permutation(n) if shuffle else np.arange(n)
    count = batch_count(n, batch_size) if shuffle else -(-n // batch_size)
    for i in range(count):
        yield order[i * batch_size:n if i == count - 1 else (i + 1) * batch_size]


# ---------------------------------------------------------------------------------------------
# On-device batch transform


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """Matrix M (out x in) such that M @ v resizes v bilinearly (half-pixel centres, like
    `interpolate(mode="bilinear", align_corners=False)`). Two of them resize an image with two
    matrix multiplies, which OneFlow runs far faster on CPU than its interpolate kernel."""
    scale = in_size / out_size
    src = (np.arange(out_size) + 0.5) * scale - 0.5
    src = np.clip(src, 0, in_size - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    m = np.zeros((out_size, in_size), np.float32)
    m[np.arange(out_size), lo] += 1 - frac
    m[np.arange(out_size), hi] += frac
    return m


class BatchTransform:
    """uint8 NHWC numpy batch -> normalised float NCHW tensor of `size` px on `device`.

    Training batches get random horizontal/vertical flips (each image with probability 1/2).
    """

    def __init__(self, flow, device: str, in_hw: Tuple[int, int], size: int, normalize: str,
                 hflip: bool, vflip: bool):
        self.flow, self.device, self.hflip, self.vflip = flow, device, hflip, vflip
        h, w = in_hw
        self.resize = (h, w) != (size, size)
        if self.resize:
            self.ah_t = flow.tensor(bilinear_matrix(size, h).T.copy(), device=device)
            self.aw_t = flow.tensor(bilinear_matrix(size, w).T.copy(), device=device)
        self.size = size
        mean = np.array(IMAGENET_MEAN if normalize == "imagenet" else (0, 0, 0), np.float32)
        std = np.array(IMAGENET_STD if normalize == "imagenet" else (1, 1, 1), np.float32)
        self.scale = flow.tensor((1.0 / (255.0 * std)).reshape(1, 3, 1, 1), device=device)
        self.shift = flow.tensor((-mean / std).reshape(1, 3, 1, 1), device=device)

    def __call__(self, images: np.ndarray, train: bool, rng: np.random.Generator):
        return self.apply(images, *(self.flips(len(images), rng) if train else (None, None)))

    def flips(self, n: int, rng: np.random.Generator) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """The random flips of a training batch of `n` images: a boolean mask per direction
        (horizontal, vertical; None when that flip is off), drawn from `rng` in that order. The
        one place the flips are drawn: the frozen fast path (core.features) draws them here too,
        so that it takes exactly the random numbers the images would have taken."""
        h = rng.random(n) < 0.5 if self.hflip else None
        v = rng.random(n) < 0.5 if self.vflip else None
        return h, v

    def apply(self, images: Any, hflip: Optional[np.ndarray] = None, vflip: Optional[np.ndarray] = None):
        """The batch (uint8 NHWC: a numpy array, or a tensor on the device) with the images marked in
        `hflip` / `vflip` flipped, resized, normalised."""
        flow = self.flow
        x = images if isinstance(images, flow.Tensor) else flow.tensor(images, device=self.device)
        x = x.permute(0, 3, 1, 2).to(flow.float32)
        n, c, h, w = x.shape
        for flipped, dim in ((hflip, 3), (vflip, 2)):
            if flipped is not None:
                mask = flow.tensor(flipped, device=self.device).reshape(n, 1, 1, 1)
                x = flow.where(mask, flow.flip(x, [dim]), x)
        # Normalising commutes with the resize (each output pixel is a weighted mean: the
        # weights sum to 1), so it and every transpose happen at the input's size; the output
        # is written once, contiguous, by the last matrix multiply.
        x = x * self.scale + self.shift
        if self.resize:
            s = self.size
            x = flow.matmul(x.transpose(2, 3).reshape(n * c * w, h), self.ah_t)  # height: (n, c, w, s)
            x = x.reshape(n * c, w, s).transpose(1, 2).reshape(n * c * s, w)
            x = flow.matmul(x, self.aw_t).reshape(n, c, s, s)  # width
        return x
