"""Where a model fails: per-class figures from a run's recorded confusion matrices
(core.events.ClassResults), and its most confidently wrong test images read back from its folder.

Run folders are untrusted: the records come through core.events.from_record (type-checked, the
matrix square with a row per class name), and an image is read only through `read_wrong_image`,
which refuses names leading out of the run's wrong/ folder, files that are not regular, and
files or pictures over a size bound.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

from core import events as ev
from core.files import is_regular_file
from core.store import WRONG_DIR, read_events

MAX_IMAGE_BYTES = 4 << 20
"""A wrong image's file is not read when larger than this (the trainer's PNGs: under 1 KB at
8-32 px, ~150 KB at 224 px)."""
MAX_IMAGE_PIXELS = 1024 * 1024
"""Nor when its picture has more pixels than this (the largest image size a run takes is 1024 px;
a small PNG can claim to be huge: PIL's own bomb limit is ~89 million pixels)."""


@dataclass(frozen=True)
class ClassStats:
    """One class's figures, from a confusion matrix (rows true, columns predicted)."""

    name: str
    support: int
    """Test images of this class (its row's sum)."""
    predicted: int
    """Test images predicted as this class (its column's sum)."""
    correct: int
    precision: Optional[float]
    """correct / predicted: of the images called this class, the share that are (None: none were)."""
    recall: Optional[float]
    """correct / support: of this class's images, the share predicted right; the usual
    "per-class accuracy" (None: the class has no test image)."""
    accuracy: Optional[float]
    """One-vs-rest accuracy: the share of all test images for which "is it this class?" is
    answered right, (true positives + true negatives) / test images."""


def class_stats(results: ev.ClassResults) -> List[ClassStats]:
    """The figures of each class of `results`, in the classes' order."""
    matrix = results.matrix
    total = sum(map(sum, matrix))
    out = []
    for c, name in enumerate(results.classes):
        support, predicted, correct = sum(matrix[c]), sum(row[c] for row in matrix), matrix[c][c]
        negatives_right = total - support - predicted + correct
        out.append(ClassStats(name, support, predicted, correct,
                              correct / predicted if predicted else None, correct / support if support else None,
                              (correct + negatives_right) / total if total else None))
    return out


def all_class_results(events: Sequence[ev.Event]) -> List[ev.ClassResults]:
    """The ClassResults of a run's events (as one run: what a resume redid is dropped), one per
    epoch, the later kept when an epoch appears twice. A record whose class count differs from
    the run's (its RunStarted's num_classes) is left out as not this run's."""
    out, num_classes = {}, None
    for event in ev.as_one_run(events):
        if isinstance(event, ev.RunStarted):
            num_classes = event.num_classes
        elif isinstance(event, ev.ClassResults) and (num_classes is None or len(event.classes) == num_classes):
            out[event.epoch] = event
    return [out[epoch] for epoch in sorted(out)]


def read_class_results(run_dir: Union[str, Path]) -> List[ev.ClassResults]:
    """all_class_results of a run folder's metrics.jsonl (reads the whole file: not on a UI thread)."""
    return all_class_results(read_events(run_dir))


def pick_epoch(results: List[ev.ClassResults], epoch: Optional[int] = None) -> Optional[ev.ClassResults]:
    """The results of `epoch`, or of the latest epoch when None; None when not recorded."""
    if epoch is None:
        return results[-1] if results else None
    return next((r for r in results if r.epoch == epoch), None)


def wrong_image_path(run_dir: Union[str, Path], name: str) -> Path:
    """The file a ClassResults names, checked to lie inside the run's wrong/ folder (after
    resolving links and '..', the folder's own name included: a wrong/ that is a link leads
    outside it); ValueError otherwise."""
    try:
        root = Path(run_dir).resolve() / WRONG_DIR
        path = (Path(run_dir) / name).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a link loop, a NUL in the name
        raise ValueError(f"image {ev.short(name)}: {exc}") from None
    if os.path.isabs(name) or root not in path.parents:
        raise ValueError(f"image {ev.short(name)} is not in the run's {WRONG_DIR}/ folder: not read")
    return path


def image_kept(run_dir: Union[str, Path], name: str) -> bool:
    """Whether the picture `name` is a file inside the run's wrong/ folder (older epochs' are
    removed, see core.store.KEEP_WRONG_EPOCHS)."""
    try:
        return wrong_image_path(run_dir, name).is_file()
    except (ValueError, OSError):
        return False


def read_wrong_image(run_dir: Union[str, Path], name: str) -> Any:
    """The picture `name` (a ClassResults' WrongImage.file) of a run as a PIL RGB image, read
    within bounds: inside the run's wrong/ folder, a regular file of at most MAX_IMAGE_BYTES, at
    most MAX_IMAGE_PIXELS pixels. ValueError with one line otherwise (missing: an older epoch
    whose images were not kept)."""
    from PIL import Image

    path = wrong_image_path(run_dir, name)
    if not path.exists():
        raise ValueError(f"image {name} is not there (only the latest epochs' images are kept)")
    if not is_regular_file(path):
        raise ValueError(f"image {name} is not a regular file: not read")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ValueError(f"image {name} is larger than {MAX_IMAGE_BYTES >> 20} MB: not read")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise ValueError(f"image {name} has {img.width} x {img.height} pixels (at most "
                                     f"{MAX_IMAGE_PIXELS:,}): not read")
                return img.convert("RGB")
    except ValueError:
        raise
    except Exception as exc:  # PIL's UnidentifiedImageError, a truncated file, a bomb warning...
        raise ValueError(f"image {name} cannot be read: {type(exc).__name__}") from None
