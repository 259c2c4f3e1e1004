"""Fuzz the entry points that read settings: config mappings, preset files, command lines.

Generated values (hypothesis, derandomized so CI sees the same ones each time) go through the
real functions. Allowed outcomes: a config, or ConfigError / a usage error with one line per
problem. Anything else (a traceback) fails the test. The counts are printed at the end.
"""
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import cli
from core import config as C

FUZZ = settings(max_examples=400, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
COUNTS = {}


def counted(name):
    COUNTS[name] = COUNTS.get(name, 0) + 1


# JSON-like values of every shape, with the numbers that break naive code
numbers = st.one_of(st.integers(), st.integers(min_value=2**62, max_value=2**1400), st.floats(),
                    st.sampled_from([0, -1, 2**63, -(2**63), 1e308, float("nan"), float("inf")]))
texts = st.one_of(st.text(max_size=30), st.sampled_from(["", " ", "\x00", "1e999", "-1e-3", "nan", "yes",
                                                        "imagefolder:", "imagefolder:\x00", "9" * 5000]))
leaves = st.one_of(st.none(), st.booleans(), numbers, texts)
values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=8)
keys = st.one_of(st.sampled_from(sorted(C.FIELDS) + ["batch-size", "lr-backbone"]), st.text(max_size=12))


def check_config(cfg):
    assert isinstance(cfg, C.RunConfig)
    for name in C.FIELDS:
        assert isinstance(getattr(cfg, name), C.field_type(name)), name
    assert all(isinstance(p, str) and p.strip() for p in C.validate(cfg))


def config_or_problems(read, *args):
    """read(*args): a well-typed config, or ConfigError with one non-empty line per problem."""
    try:
        cfg = read(*args)
    except C.ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p.strip() for p in exc.problems)
        return None
    check_config(cfg)
    return cfg


field_names = st.sampled_from(sorted(C.FIELDS))


@FUZZ
@given(st.one_of(st.dictionaries(field_names, values, max_size=8), st.dictionaries(keys, values, max_size=6)))
def test_config_mappings(mapping):
    counted("config mappings")
    cfg = config_or_problems(C.from_mapping, mapping)
    if cfg is not None and not C.validate(cfg):  # a valid config round-trips through both file formats
        assert C.from_mapping(json.loads(json.dumps(cfg.to_dict()))) == cfg


VALID = C.RunConfig(dataset="digits", epochs=2, lr=0.01)


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("presets")
    return {suffix: C.save(VALID, folder / f"valid{suffix}").read_bytes() for suffix in (".toml", ".json")}


mutations = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate", "repeat"]),
                               st.integers(min_value=0, max_value=10**6), st.binary(min_size=1, max_size=4)),
                     min_size=1, max_size=4)


def mutate(data: bytes, ops) -> bytes:
    for op, where, chunk in ops:
        at = where % (len(data) + 1)
        if op == "flip" and data:
            at = min(at, len(data) - 1)
            data = data[:at] + bytes([data[at] ^ chunk[0]]) + data[at + 1:]
        elif op == "insert":
            data = data[:at] + chunk + data[at:]
        elif op == "delete":
            data = data[:at] + data[at + len(chunk):]
        elif op == "truncate":
            data = data[:at]
        elif op == "repeat":
            data = data[:at] + data[at:at + 8] * (1 + chunk[0] % 64) + data[at:]
    return data


@FUZZ
@given(st.sampled_from([".toml", ".json"]), mutations)
def test_preset_files_with_byte_mutations(tmp_path, presets, suffix, ops):
    counted("preset files")
    path = tmp_path / f"mutated{suffix}"
    path.write_bytes(mutate(presets[suffix], ops))
    config_or_problems(C.load, path)


value_flags = [cli.flag(n) for n in C.FIELDS if C.field_type(n) is not bool] + ["--config", "--runs-dir", "--wait"]
bool_flags = [cli.flag(n) for n in C.FIELDS if C.field_type(n) is bool]
tokens = st.one_of(st.sampled_from(value_flags + bool_flags + ["--no-hflip", "--", "-", "--lr=", "-x"]),
                   texts, numbers.map(str), st.sampled_from(["-1", "-1e-3", "-.5", "1e999", "nan", "-inf"]))


@FUZZ
@given(st.sampled_from(["train", "tui", "runs", "compare", "stop", "bogus", "--epochs"]), st.lists(tokens, max_size=8))
def test_command_lines(tmp_path, monkeypatch, capsys, command, args):
    """Through core.cli.main; training and the app are replaced by recorders (the flags are the point)."""
    counted("command lines")
    seen = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "cmd_train", lambda cfg: seen.append(cfg) or 0)
    argv = [command, *args]
    code = cli.main(argv, launch_tui=lambda cfg, explicit: seen.append(cfg) or 0)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert code in (cli.EXIT_OK, cli.EXIT_USAGE), (argv, code, out.err)
    if code == cli.EXIT_USAGE:
        assert "error:" in out.err
    for cfg in seen:
        check_config(cfg)
        assert C.validate(cfg) == []
        assert all(math.isfinite(getattr(cfg, n)) for n in C.FIELDS if C.field_type(n) is float)


def test_zz_fuzz_counts():
    """Runs last in this file: the fuzz saw at least 1,000 generated inputs in all."""
    print("fuzz inputs:", COUNTS)
    assert sum(COUNTS.values()) >= 1000, COUNTS
