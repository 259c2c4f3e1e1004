import json

import pytest

from core import config as C


def test_defaults_are_the_tutorials():
    cfg = C.RunConfig()
    assert (cfg.strategy, cfg.backbone, cfg.pretrained, cfg.dataset) == ("finetune", "resnet18", "imagenet", "cifar10")
    assert (cfg.epochs, cfg.batch_size, cfg.image_size) == (3, 64, 224)
    assert (cfg.lr, cfg.lr_backbone, cfg.momentum, cfg.weight_decay) == (1e-3, 1e-4, 0.9, 5e-4)
    assert cfg.hflip and cfg.vflip and cfg.normalize == "imagenet"
    assert C.validate(cfg) == []


def test_every_field_is_documented():
    for name, f in C.FIELDS.items():
        assert f.metadata["help"], name


def test_validate_reports_every_problem_with_its_value():
    cfg = C.RunConfig(lr=-1, epochs=0, momentum=1.5, strategy="bogus", dataset="mnist", image_size=2)
    problems = C.validate(cfg)
    assert "lr must be a positive number, got -1" in problems
    assert any(p.startswith("epochs must be between 1") and "got 0" in p for p in problems)
    assert any(p.startswith("momentum") and "1.5" in p for p in problems)
    assert any(p.startswith("strategy must be one of finetune") and "'bogus'" in p for p in problems)
    assert any(p.startswith("dataset must be one of") and "'mnist'" in p for p in problems)
    assert any(p.startswith("image_size") for p in problems)
    assert len(problems) == 6


def test_imagefolder_needs_a_path():
    assert C.validate(C.RunConfig(dataset="imagefolder:./x")) == []
    assert any("imagefolder:PATH needs a folder" in p for p in C.validate(C.RunConfig(dataset="imagefolder:")))


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_round_trip_through_files(tmp_path, suffix):
    cfg = C.RunConfig(strategy="discriminative", lr=0.01, lr_backbone=2e-5, epochs=7, hflip=False,
                      dataset="imagefolder:/data/flowers", limit_train=100)
    path = C.save(cfg, tmp_path / f"preset{suffix}")
    assert C.load(path) == cfg


def test_text_values_are_parsed_and_bad_ones_all_named(tmp_path):
    cfg = C.from_mapping({"lr": "0.5", "epochs": "4", "vflip": "no", "batch-size": "8"})
    assert (cfg.lr, cfg.epochs, cfg.vflip, cfg.batch_size) == (0.5, 4, False, 8)
    with pytest.raises(C.ConfigError) as info:
        C.from_mapping({"lr": "fast", "epochs": "2.5", "colour": "red"})
    assert info.value.problems == ["lr must be a number, got 'fast'", "epochs must be a whole number, got '2.5'",
                                   f"unknown setting 'colour'; known: {', '.join(C.FIELDS)}"]


def test_load_reports_broken_and_missing_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(C.ConfigError, match="bad.json is not valid JSON"):
        C.load(bad)
    with pytest.raises(C.ConfigError, match="cannot read config file"):
        C.load(tmp_path / "missing.toml")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"epochs": True}))
    with pytest.raises(C.ConfigError, match="epochs must be a whole number, got True"):
        C.load(wrong)


@pytest.mark.parametrize("text, picked", [
    ("", []), ("0-4", [0, 1, 2, 3, 4]), ("5,7,9", [5, 7, 9]), ("0-2,8", [0, 1, 2, 8]), ("9, 3", [9, 3]),
    ("cat,dog", ["cat", "dog"]), (" t-shirt , bag ", ["t-shirt", "bag"]), ("8 - 9", [8, 9]),
])
def test_classes_are_ranges_lists_or_names_in_the_order_given(text, picked):
    assert C.parse_classes(text) == picked
    assert C.validate(C.RunConfig(classes=text)) == []


@pytest.mark.parametrize("text, problem", [
    ("0,,2", "classes has an empty item in '0,,2': separate classes with single commas"),
    ("1,", "classes has an empty item in '1,': separate classes with single commas"),
    ("4-0", "classes range 4-0 is empty: write 0-4"),
    ("1,2,1", "classes lists 1 more than once"),
    ("0-3,2", "classes lists 2 more than once"),
    ("cat,dog,cat", "classes lists 'cat' more than once"),
    ("cat,3", "classes mixes indices (3) and names ('cat'): use one kind"),
    ("7", "classes must pick at least two classes, got '7'"),
    ("0-99999999", "classes range '0-99999999' is too large (at most 100,000 classes)"),
])
def test_bad_classes_get_one_line_each(text, problem):
    with pytest.raises(ValueError) as info:
        C.parse_classes(text)
    assert str(info.value) == problem
    assert C.validate(C.RunConfig(classes=text)) == [problem]


def test_classes_go_through_files_and_text(tmp_path):
    cfg = C.from_mapping({"classes": "5-9", "dataset": "digits"})
    assert cfg.classes == "5-9" and C.load(C.save(cfg, tmp_path / "p.toml")) == cfg


@pytest.mark.parametrize("value", [1, "maybe", [True]])
def test_a_bad_yes_or_no_is_refused_in_the_same_words_typed_or_written(value):
    """A preset's `no_wd_bn_bias = 1` and a typed-in "maybe" get the same sentence."""
    with pytest.raises(C.ConfigError) as err:
        C.from_mapping({"no_wd_bn_bias": value})
    assert err.value.problems == [f"no_wd_bn_bias must be yes or no (true/false), got {C.shown(value)}"]
