"""Typed values from plain data: a dict checked against a dataclass's annotations (Literal choices,
unions, lists, nested sections), each number against the interval its field declares (`bounded`).

`dydit_dist.config` builds its `Config` with `build`; the option sections below it (`DyDiTOptions`,
the sampling methods' options) declare their ranges as `field(metadata={"range": "[0, 1)"})`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import field
from typing import Any, Literal

from dydit_dist.config_files import ConfigError

_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])$")


def interval(allowed: str) -> tuple[float, bool, float, bool]:
    """"[1, inf)" -> (1.0, False, inf, True): (low, low excluded, high, high excluded)."""
    match = _INTERVAL.match(allowed)
    if not match:
        raise ValueError(f"range {allowed!r} is not an interval like '[1, inf)' or '(0, 1]'")
    return float(match[2]), match[1] == "(", float(match[3]), match[4] == ")"


def bounded(default: Any, allowed: str) -> Any:
    """A field whose value must lie in the interval `allowed` ("[1, inf)", "(0, 1]"; for a list, each
    item), checked when the config is built; None passes for an optional field."""
    interval(allowed)  # a malformed range fails at import
    return field(default=default, metadata={"range": allowed})


def check_range(value: Any, allowed: str | None, key: str) -> None:
    if allowed is None or value is None:
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_range(item, allowed, f"{key}[{i}]")
        return
    low, low_open, high, high_open = interval(allowed)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):  # a NaN is neither
        raise ConfigError(f"{key}={value!r} is outside its allowed range {allowed}")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; ints become floats where a float is expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of the valid choices {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r} fits none of {tp}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            hint = f", e.g. {key}=[{value}]" if isinstance(value, str | int | float) else ""
            raise ConfigError(f"{key}={value!r} must be a list{hint}")
        item_tp = typing.get_args(tp)[0]  # list[T] or tuple[T, ...]
        return origin(coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {[f.name for f in dataclasses.fields(tp)]}")
        return build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        # only a YAML file gets here with a number for a string: an override keeps the text it was given
        leaf = key.rsplit(".", 1)[-1]
        hint = f" (quote it in the YAML file: {leaf}: '...')" if tp is str and isinstance(value, int | float) else ""
        raise ConfigError(f"{key}={value!r} must be of type {tp.__name__}, got {type(value).__name__}{hint}")
    return value


def build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            where = f"section {prefix!r}" if prefix else "the top level"
            close = difflib.get_close_matches(str(key), names, n=1)
            guess = f"did you mean {(f'{prefix}.' if prefix else '') + close[0]!r}? " if close else ""
            raise ConfigError(f"unknown config key {full!r}; {guess}valid keys in {where}: {', '.join(names)}")
        kwargs[key] = coerce(value, hints[key], full)
        check_range(kwargs[key], fields[key].metadata.get("range"), full)
    try:
        return cls(**kwargs)
    except ValueError as err:  # a section's own checks (`__post_init__`), e.g. model.dynamic, sample.eb_cache
        raise ConfigError(f"{prefix or 'config'}: {err}") from None


def field_type(root: type, key: str) -> Any:
    """The annotation of the field a dotted key names under the dataclass `root` (`sample.eb_cache.schedule`
    -> str), None if none."""
    tp: Any = root
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def accepts(tp: Any, kind: type) -> bool:
    """Whether annotation `tp` is `kind` or a union with it (`str | None` accepts str and NoneType)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return kind in typing.get_args(tp)
    return tp is kind
