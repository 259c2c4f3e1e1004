"""The run configuration: one frozen dataclass, its validation, and its file format.

Every field carries its help text and (where it has one) its list of choices in the field's
metadata. The CLI's flags and the TUI's form are both built from these fields, so they cannot
drift. Defaults are the tutorial's values (ResNet-18, ImageNet weights, CIFAR-10 at 224 px, SGD
lr 1e-3, momentum 0.9, weight decay 5e-4, batch 64, 3 epochs).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from core.errors import SetupError
from core.files import is_regular_file

STRATEGIES = {
    "finetune": "Train every layer from the pretrained weights with one learning rate.",
    "discriminative": "Train every layer: a small LR for the backbone, a larger one for the new head.",
    "frozen": "Freeze the backbone (weights and BatchNorm statistics); train only the new head.",
    "scratch": "No pretrained weights: random initialisation, every layer trains.",
}
BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small")
DATASETS = ("cifar10", "digits", "synthetic")  # plus "imagefolder:PATH"
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # what each means: core/precision.py
SCHEDULES = ("constant", "step", "cosine", "onecycle")  # the formulas: core/schedule.py


def _field(default: Any, help: str, choices: Optional[tuple] = None, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, **meta})


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run."""

    strategy: str = _field("finetune", "How to transfer: " + ", ".join(STRATEGIES), tuple(STRATEGIES))
    """finetune | discriminative | frozen | scratch (see STRATEGIES)."""
    dataset: str = _field("cifar10", "cifar10, digits (built in, offline), synthetic, or imagefolder:PATH")
    """Which data to train on; imagefolder:PATH reads PATH/train and PATH/test (or PATH/val)."""
    data_root: str = _field("./data", "Folder holding (or receiving) downloaded datasets")
    """Where cifar10 looks for cifar-10-batches-py/ and downloads it when online."""
    backbone: str = _field("resnet18", "FlowVision classification model", BACKBONES)
    """The feature extractor; its classifier head is replaced for the dataset's classes."""
    pretrained: str = _field("imagenet", "imagenet, none, or a path to a state-dict file/folder")
    """Initial weights of the backbone (ignored by the scratch strategy, which never loads any)."""
    epochs: int = _field(3, "Passes over the training set")
    """Number of epochs; the test set is evaluated after each."""
    batch_size: int = _field(64, "Images per optimizer step")
    """Mini-batch size for training and evaluation."""
    lr: float = _field(1e-3, "Learning rate (the head's, for discriminative)")
    """SGD learning rate of finetune/frozen/scratch, and of the new head under discriminative."""
    lr_backbone: float = _field(1e-4, "Backbone learning rate (discriminative; frozen once unfrozen)")
    """SGD learning rate of the pretrained backbone under the discriminative strategy, and of the
    backbone of the frozen strategy from unfreeze_epoch on."""
    momentum: float = _field(0.9, "SGD momentum")
    """SGD momentum, between 0 and 1."""
    weight_decay: float = _field(5e-4, "SGD weight decay (L2)")
    """L2 penalty applied by SGD to every trained parameter."""
    schedule: str = _field("constant", "Learning-rate schedule over the run", SCHEDULES)
    """constant (the tutorial's), step (x step_gamma every step_every epochs), cosine (down
    towards 0), onecycle (up from lr/25 to lr, then down to lr/1e4); set per step (core/schedule.py)."""
    warmup_epochs: float = _field(0.0, "Linear learning-rate warmup over this many epochs (0 = none)")
    """The lr rises linearly from about 0 over this many epochs (counted in steps); for onecycle,
    the length of its rising phase (0: 30% of the run)."""
    step_every: int = _field(1, "step schedule: multiply the lr by step_gamma every this many epochs")
    """Epochs between two decays of the step schedule."""
    step_gamma: float = _field(0.1, "step schedule: the factor of each decay (e.g. 0.1)")
    """Each decay of the step schedule multiplies the learning rate by this, above 0 and at most 1."""
    label_smoothing: float = _field(0.0, "Label smoothing of the training loss (0 = none, e.g. 0.1)")
    """The training targets give this much probability mass evenly to all classes (test loss: plain)."""
    no_wd_bn_bias: bool = _field(False, "No weight decay on BatchNorm weights and biases")
    """One-dimensional parameters (BatchNorm weights and biases, every bias) train without weight decay."""
    early_stopping: int = _field(0, "Stop after this many epochs without a better test accuracy (0 = off)")
    """Patience in epochs; the best checkpoint is kept in checkpoints/best."""
    unfreeze_epoch: int = _field(0, "frozen strategy: the backbone trains from this epoch on, at lr_backbone (0 = never)")
    """Progressive unfreezing: from this epoch on the frozen backbone (weights and BatchNorm) trains too."""
    image_size: int = _field(224, "Images are resized to this many pixels square")
    """Side of the square the images are resized to on the device (224 for ImageNet models)."""
    hflip: bool = _field(True, "Random horizontal flips while training")
    """Flip each training image left-right with probability 1/2."""
    vflip: bool = _field(True, "Random vertical flips while training")
    """Flip each training image upside down with probability 1/2 (the tutorial does)."""
    normalize: str = _field("imagenet", "Per-channel normalisation", ("imagenet", "none"))
    """imagenet: subtract ImageNet's mean and divide by its std; none: scale to [0, 1] only."""
    limit_train: int = _field(0, "Use only this many training images (0 = all)")
    """A stratified subset of the training set, for quick runs; 0 uses all of it."""
    limit_test: int = _field(0, "Use only this many test images (0 = all)")
    """A stratified subset of the test set; 0 uses all of it."""
    seed: int = _field(0, "Random seed (weights of the new head, shuffling, flips)")
    """Seeds numpy and oneflow so that runs can be repeated."""
    device: str = _field("auto", "auto (cuda when usable, else cpu), cpu or cuda", DEVICES)
    """Where to train; auto checks that this OneFlow build can run on the GPU before using it."""
    precision: str = _field("auto", "Mixed precision on a GPU: auto (bf16 where the GPU has it, else fp16 on "
                                    "tensor-core GPUs; fp32 on the CPU), fp32, fp16 or bf16", PRECISIONS)
    """The forward passes run under OneFlow's autocast in fp16 or bf16 (weights and optimizer stay
    fp32; fp16 with dynamic loss scaling); fp32 everywhere on the CPU (core/precision.py)."""
    runs_dir: str = _field("./runs", "Folder that receives one subfolder per run")
    """Run folders (config, metrics, summary, checkpoints) are created below it."""
    classes: str = _field("", "Only these classes: indices and ranges (0-4 or 5,7,9) or names (cat,dog); "
                              "empty = all")
    """A class subset, relabelled 0..k-1 in the order given (pretrain on some classes, transfer to
    others). Indices count in the dataset's own class list; names are its class names."""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in fields(RunConfig)}
MAX_SEED = 2**32 - 1
"""Seeds go to numpy and OneFlow (whose generator takes a signed 64-bit integer)."""


class ConfigError(SetupError, ValueError):
    """Raised with every problem found, one per line."""

    def __init__(self, problems: List[str]):
        super().__init__(problems=problems)


def field_type(name: str) -> type:
    default = FIELDS[name].default
    return type(default)


def shown(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: messages quote what was given, never all of it."""
    try:
        text = repr(value) if not isinstance(value, str) or len(value) <= limit else repr(value[:limit])
    except ValueError:  # an int of more than 4,300 digits has no repr
        return f"a number of {value.bit_length()} bits"
    return text if len(text) <= limit + 2 else text[:limit] + "..."


KIND_NAMES = {bool: "yes or no (true/false)", int: "a whole number", float: "a number", str: "text"}
"""How a message names each kind of value (the same words for typed and for typed-in values)."""


def value_text(value: Any) -> str:
    """A setting as a person would type it: a float in its short form (1e-07, 0.0005) unless that
    rounds it (:g keeps 6 digits; 0.000123456789), then every digit: the form's fields and the
    commands it shows hold exactly the value that runs."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def parse_value(name: str, text: str) -> Any:
    """Turn the text a person typed for field `name` into its typed value, or raise ValueError."""
    kind = field_type(name)
    text = text.strip()
    if kind is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on", "y"):
            return True
        if low in ("0", "false", "no", "off", "n"):
            return False
        raise ValueError(f"{name} must be {KIND_NAMES[bool]}, got {shown(text)}")
    if kind is int:
        try:
            return int(text)
        except ValueError:  # also a number of more than 4,300 digits
            raise ValueError(f"{name} must be a whole number, got {shown(text)}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {shown(text)}") from None
    return text


def from_mapping(values: Dict[str, Any], base: Optional[RunConfig] = None) -> RunConfig:
    """Build a config from a mapping of field names to values (typed, or text to parse).

    Raises ConfigError naming every unknown key and every value of the wrong type.
    """
    problems: List[str] = []
    typed: Dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_") if isinstance(key, str) else None
        if name not in FIELDS:
            problems.append(f"unknown setting {shown(key)}; known: {', '.join(FIELDS)}")
            continue
        kind = field_type(name)
        if isinstance(value, str) and kind is not str:
            try:
                value = parse_value(name, value)
            except ValueError as exc:
                problems.append(str(exc))
                continue
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:
                problems.append(f"{name} is too large, got {shown(value)}")
                continue
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            problems.append(f"{name} must be {KIND_NAMES[kind]}, got {shown(value)}")
            continue
        typed[name] = value
    if problems:
        raise ConfigError(problems)
    return (base or RunConfig()).replace(**typed)


def validate(cfg: RunConfig) -> List[str]:
    """Every problem with `cfg`, each a sentence a person can act on; empty when it is valid."""
    problems: List[str] = []

    def positive(name: str, value: float) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            problems.append(f"{name} must be a positive number, got {value}")

    for name, meta in FIELDS.items():
        choices = meta.metadata.get("choices")
        if choices and getattr(cfg, name) not in choices:
            problems.append(f"{name} must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}")
    if cfg.dataset.startswith("imagefolder:"):
        if not cfg.dataset[len("imagefolder:"):].strip():
            problems.append("dataset imagefolder:PATH needs a folder, e.g. imagefolder:./flowers")
    elif cfg.dataset not in DATASETS:
        problems.append(f"dataset must be one of {', '.join(DATASETS)} or imagefolder:PATH, got {cfg.dataset!r}")
    if not cfg.pretrained.strip():
        problems.append("pretrained must be imagenet, none, or a path to a state-dict file or folder")
    if cfg.epochs < 1 or cfg.epochs > 10_000:
        problems.append(f"epochs must be between 1 and 10000, got {cfg.epochs}")
    if cfg.batch_size < 1 or cfg.batch_size > 65_536:
        problems.append(f"batch_size must be between 1 and 65536, got {cfg.batch_size}")
    positive("lr", cfg.lr)
    positive("lr_backbone", cfg.lr_backbone)
    if not (math.isfinite(cfg.momentum) and 0 <= cfg.momentum < 1):
        problems.append(f"momentum must be at least 0 and below 1, got {cfg.momentum}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        problems.append(f"weight_decay must be 0 or more, got {cfg.weight_decay}")
    if not (math.isfinite(cfg.warmup_epochs) and 0 <= cfg.warmup_epochs <= cfg.epochs):
        problems.append(f"warmup_epochs must be between 0 and epochs ({cfg.epochs}), got {cfg.warmup_epochs}")
    if not 1 <= cfg.step_every <= 10_000:
        problems.append(f"step_every must be a whole number of epochs between 1 and 10000, got {cfg.step_every}")
    if not (math.isfinite(cfg.step_gamma) and 0 < cfg.step_gamma <= 1):
        problems.append(f"step_gamma must be above 0 and at most 1, got {cfg.step_gamma}")
    if not (math.isfinite(cfg.label_smoothing) and 0 <= cfg.label_smoothing < 1):
        problems.append(f"label_smoothing must be at least 0 and below 1, got {cfg.label_smoothing}")
    if not 0 <= cfg.early_stopping <= 10_000:
        problems.append(f"early_stopping must be 0 (off) or a number of epochs, got {cfg.early_stopping}")
    if not 0 <= cfg.unfreeze_epoch <= max(cfg.epochs, 1):
        problems.append(f"unfreeze_epoch must be 0 (never) or an epoch from 1 to epochs ({cfg.epochs}), "
                        f"got {cfg.unfreeze_epoch}")
    if cfg.image_size < 8 or cfg.image_size > 1024:
        problems.append(f"image_size must be between 8 and 1024 pixels, got {cfg.image_size}")
    for name in ("limit_train", "limit_test"):
        if getattr(cfg, name) < 0:
            problems.append(f"{name} must be 0 (all) or a positive count, got {getattr(cfg, name)}")
    if not 0 <= cfg.seed <= MAX_SEED:
        problems.append(f"seed must be between 0 and {MAX_SEED}, got {shown(cfg.seed)}")
    if not cfg.runs_dir.strip():
        problems.append("runs_dir must name a folder")
    try:
        parse_classes(cfg.classes)
    except ValueError as exc:
        problems.append(str(exc))
    for name in FIELDS:
        value = getattr(cfg, name)
        if isinstance(value, str) and "\x00" in value:
            problems.append(f"{name} must not contain a NUL character, got {shown(value)}")
    return problems


MAX_CLASSES = 100_000
"""A class subset listing more classes than this is a typing slip (ImageNet-21k has ~21,000)."""
CLASS_RANGE = re.compile(r"([0-9]+)\s*-\s*([0-9]+)")
CLASS_INDEX = re.compile(r"[0-9]+")


def parse_classes(text: str) -> List[Any]:
    """The `classes` setting as a list of class indices (ints) or of class names (strs), in the
    order given; [] for all classes. Raises ValueError with one line saying what is wrong.

    Items are separated by commas. An item of digits is an index and `A-B` a range of them
    (both ends included); anything else is a name. Indices and names cannot be mixed: "3" could
    be either. Whether the dataset has them is only known once it is loaded (core.data)."""
    if not text.strip():
        return []
    picked: List[Any] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise ValueError(f"classes has an empty item in {shown(text)}: separate classes with single commas")
        span = CLASS_RANGE.fullmatch(item)
        if span and (len(span[1]) > 6 or len(span[2]) > 6):
            raise ValueError(f"classes range {shown(item)} is too large (at most {MAX_CLASSES:,} classes)")
        if span:
            first, last = int(span[1]), int(span[2])
            if first > last:
                raise ValueError(f"classes range {item} is empty: write {last}-{first}")
            if last - first >= MAX_CLASSES:
                raise ValueError(f"classes range {item} is too large (at most {MAX_CLASSES:,} classes)")
            picked.extend(range(first, last + 1))
        elif CLASS_INDEX.fullmatch(item):
            if len(item) > 6:
                raise ValueError(f"classes index {shown(item)} is too large")
            picked.append(int(item))
        else:
            picked.append(item)
        if len(picked) > MAX_CLASSES:
            raise ValueError(f"classes lists more than {MAX_CLASSES:,} classes")
    kinds = {type(c) for c in picked}
    if len(kinds) > 1:
        index = next(c for c in picked if isinstance(c, int))
        name = next(c for c in picked if isinstance(c, str))
        raise ValueError(f"classes mixes indices ({index}) and names ({shown(name)}): use one kind")
    seen = set()
    for c in picked:
        if c in seen:
            raise ValueError(f"classes lists {shown(c) if isinstance(c, str) else c} more than once")
        seen.add(c)
    if len(picked) < 2:
        raise ValueError(f"classes must pick at least two classes, got {shown(text.strip())}")
    return picked


def check(cfg: RunConfig) -> RunConfig:
    """Return `cfg` when valid, else raise ConfigError with every problem."""
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def load(path: str | Path, base: Optional[RunConfig] = None) -> RunConfig:
    """Read a config from a .toml or .json file (a preset, or a run's config.json).

    Any problem with the file (unreadable, not UTF-8, not TOML/JSON, nested too deep, not a
    table, unknown keys or wrong types) raises ConfigError with one line per problem."""
    path = Path(path)
    kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
    try:
        path.stat()  # a missing file: the OSError below names it
        if not is_regular_file(path):  # a FIFO would block the read, /dev/zero never end it
            raise ConfigError([f"{path} is not a regular file"])
        if path.stat().st_size > MAX_PRESET_BYTES:
            raise ConfigError([f"{path} is {path.stat().st_size:,} bytes: not a settings file "
                               f"(presets are a few hundred bytes)"])
        text = path.read_bytes().decode("utf-8-sig")  # -sig: a byte-order mark some editors write
    except OSError as exc:
        raise ConfigError([f"cannot read config file {path}: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path} is not a text file (not UTF-8 at byte {exc.start})"]) from None
    try:
        if kind == "TOML":
            import tomli

            data = tomli.loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise ConfigError([f"{path} is not valid {kind}: {exc}"]) from None
    except RecursionError:
        raise ConfigError([f"{path} is not a settings file: its {kind} is nested too deeply"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path} must hold a table of settings, not {type(data).__name__}"])
    return from_mapping(data, base)


MAX_PRESET_BYTES = 1 << 20


def save(cfg: RunConfig, path: str | Path) -> Path:
    """Write `cfg` to a .toml or .json file, atomically."""
    from core.store import atomic_write_text

    path = Path(path)
    if path.suffix.lower() == ".toml":
        import tomli_w

        text = tomli_w.dumps(cfg.to_dict())
    else:
        text = json.dumps(cfg.to_dict(), indent=2) + "\n"
    atomic_write_text(path, text)
    return path
