"""Every number in the config has a range declared with its field, checked at load: a bad value is a
ConfigError naming the key, the value and the range, before any arithmetic on it. Storage locations
are checked at load too: a scheme typo and a run name that leaves `runs/` are refused."""

import dataclasses
import math
import types
import typing

import pytest

from dydit_dist import config, config_types
from dydit_dist.config import Config, ConfigError, load

# Inputs from issue 19 that were accepted, or crashed later without naming the key.
OUT_OF_RANGE = [
    ("ray.num_workers=0", "ray.num_workers=0 is outside its allowed range [1, inf)"),
    ("train.micro_batch_size=0", "train.micro_batch_size=0 is outside its allowed range [1, inf)"),
    ("sample.batch_size=0", "sample.batch_size=0 is outside its allowed range [1, inf)"),
    ("sample.steps=0", "sample.steps=0 is outside its allowed range [1, inf)"),
    ("sample.cfg_scale=-3", "sample.cfg_scale=-3.0 is outside its allowed range [0, inf)"),
    ("train.lr=-1", "train.lr=-1.0 is outside its allowed range (0, inf)"),
    ("train.ema_decay=2", "train.ema_decay=2.0 is outside its allowed range [0, 1)"),
    ("train.ema_decay=1", "train.ema_decay=1.0 is outside its allowed range [0, 1)"),  # the EMA would never move
    ("model.image_size=-16", "model.image_size=-16 is outside its allowed range [1, inf)"),
    ("storage.timeout_s=0", "storage.timeout_s=0.0 is outside its allowed range (0, inf)"),
    ("model.dynamic.gumbel_temperature=0", "model.dynamic.gumbel_temperature=0.0 is outside its allowed range (0, inf)"),
    ("sample.fora.interval=0", "sample.fora.interval=0 is outside its allowed range [1, inf)"),
    ("sample.at_edm.iterations=0", "sample.at_edm.iterations=0 is outside its allowed range [1, inf)"),
    ("model.flexdit.grid_sizes=[8,0]", "model.flexdit.grid_sizes[1]=0 is outside its allowed range [1, inf)"),
]


@pytest.mark.parametrize(("override", "message"), OUT_OF_RANGE)
def test_a_number_outside_its_range_is_refused_at_load(override, message):
    with pytest.raises(ConfigError) as err:
        load("debug", [override])
    assert str(err.value) == message


def test_zero_micro_batch_is_not_a_division_by_zero():
    """The batch arithmetic of `Config.validate` runs after the ranges, so it never divides by zero."""
    for override in ("train.micro_batch_size=0", "ray.num_workers=0"):
        with pytest.raises(ConfigError, match="outside its allowed range"):
            load("debug", [override])


def test_nan_is_outside_every_range(tmp_path):
    path = tmp_path / "nan.yaml"
    path.write_text("_base_: debug\ntrain:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=r"train.lr=nan is outside its allowed range \(0, inf\)"):
        load(str(path))


def test_the_bounds_are_inclusive_or_exclusive_as_written():
    assert load("debug", ["train.ema_decay=0", "sample.cfg_scale=0", "model.dynamic.target_lambda=1"]).train.ema_decay == 0
    with pytest.raises(ConfigError, match=r"model.dynamic.target_lambda=0.0 is outside its allowed range \(0, 1\]"):
        load("debug", ["model.dynamic.target_lambda=0"])


def test_an_optional_number_may_be_none():
    cfg = load("debug", ["train.grad_clip=null", "sample.guidance_channels=null"])
    assert cfg.train.grad_clip is None and cfg.sample.guidance_channels is None


def test_a_list_with_a_fixed_vocabulary_names_the_valid_entries():
    with pytest.raises(ConfigError, match=r"eval.metrics\[1\]='foo' is not one of the valid choices \['fid', 'sfid', 'isc', 'prc', 'clip'\]"):
        load("debug", ["eval.metrics=[fid,foo]"])
    with pytest.raises(ConfigError, match=r"eval.metrics is empty; name at least one of \['fid', 'sfid', 'isc', 'prc', 'clip'\]"):
        load("debug", ["eval.metrics=[]"])
    with pytest.raises(ConfigError, match=r"eval.methods\[0\]='dydt' is not one of the valid choices \[.*'dydit'"):
        load("debug", ["eval.methods=[dydt]"])


def _numeric_fields(cls: type, prefix: str = ""):
    """(key, field, value type) of every int / float field (or list of them) under `cls`, recursively."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) in (list, tuple):
            tp = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{key}.")
        elif tp in (int, float):
            yield key, f, tp


def test_every_number_declares_its_range():
    undeclared = [key for key, f, _ in _numeric_fields(Config) if "range" not in f.metadata]
    assert not undeclared, f"numeric config fields without a range: {undeclared}"


def test_every_default_lies_within_its_range():
    defaults = Config()
    for key, f, _ in _numeric_fields(Config):
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        config_types.check_range(value, f.metadata["range"], key)  # raises ConfigError


def test_a_malformed_range_fails_where_it_is_declared():
    with pytest.raises(ValueError, match=r"range '1..10' is not an interval like '\[1, inf\)'"):
        config_types.bounded(1, "1..10")
    assert math.isinf(config_types.interval("(-inf, inf)")[0])


@pytest.mark.parametrize("name", config.presets())
def test_every_preset_is_within_the_ranges(name):
    load(name)  # the ranges are checked on every key a preset sets


def test_a_mistyped_storage_scheme_names_the_key():
    with pytest.raises(ConfigError, match=r"^storage.root: s3:/bucket/x: a URL with a mistyped scheme separator "
                                          r".*write s3://bucket/x$"):
        load("debug", ["storage.root=s3:/bucket/x"])
    with pytest.raises(ConfigError, match=r"^data.uri: s3:bucket/data: a URL with a mistyped scheme separator"):
        load("debug", ["data.uri=s3:bucket/data"])
    with pytest.raises(ConfigError, match=r"^storage.root: gs://b: unsupported storage protocol 'gs'"):
        load("debug", ["storage.root=gs://b"])


@pytest.mark.parametrize("run", ["../../escape", "a/../../b", "/abs", "a//b", "."])
def test_a_run_name_that_leaves_runs_is_refused(run):
    with pytest.raises(ConfigError, match=r"storage.run=.* must be a plain name"):
        load("debug", [f"storage.run={run}"])


def test_run_names_joined_by_a_slash_stay_valid():
    """The reproduce pipeline keeps each stage in `{run}/{stage}`."""
    assert load("debug", ["storage.run=demo/finetune"]).storage.run == "demo/finetune"


def test_a_lease_too_short_for_one_storage_operation_is_refused():
    """The lease's fence stops a holder at 3/4 of `storage.lease_ttl_s` without a stored renewal, and a renewal
    may take one whole storage operation: a ttl under twice `storage.timeout_s` could stop a healthy job."""
    with pytest.raises(ConfigError, match=r"storage.lease_ttl_s=100 must be at least twice storage.timeout_s=60"):
        load("debug", ["storage.lease_ttl_s=100"])
    assert load("debug", ["storage.lease_ttl_s=20", "storage.timeout_s=10"]).storage.lease_ttl_s == 20
