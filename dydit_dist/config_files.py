"""Config files: the presets in `dydit_dist/configs/`, YAML files given by path, their `_base_` chains.

`dydit_dist.config` builds the typed `Config` from what `read_preset` returns (and re-exports
`ConfigError`, `PRESET_DIR` and `presets`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration key or value that does not fit the schema."""


class JobFailed(RuntimeError):
    """A job's work failed after its retries, for a reason outside its input; the message says which and how
    to go on (`cli.run_job`: one line, exit 1, no traceback)."""


def remote_cause(err: BaseException) -> BaseException:
    """The error a Ray task or actor raised, from what `ray.get` raised: a RayTaskError, which Ray makes an
    instance of the cause's class too but whose message carries the remote traceback; others as they are."""
    ray_exceptions = sys.modules.get("ray.exceptions")  # not loaded: nothing came from Ray
    if ray_exceptions is not None and isinstance(err, ray_exceptions.RayTaskError) and err.cause is not None:
        return err.cause
    return err


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_preset(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    """The values of a preset or YAML file, its `_base_` chain merged under them; `seen` is the chain of
    files that led here (the last one names this file in its `_base_`)."""
    where = f" (the _base_ of {seen[-1]})" if seen else ""
    if not isinstance(name_or_path, str):
        what = f"config {seen[-1]}: _base_" if seen else "config"
        raise ConfigError(f"{what} must be one preset name or YAML path (a string), got {name_or_path!r}")
    path = _locate(name_or_path, where)
    if str(path) in seen:
        raise ConfigError(f"config {path} inherits from itself through _base_: {' -> '.join(seen)}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config {path}{where} is not a UTF-8 text file (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise ConfigError(f"config {path}{where} cannot be read: {err.strerror or err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    base = raw.pop("_base_", None)
    if base is None:
        return raw
    return merge(read_preset(base, seen + (str(path),)), raw)


def _locate(name_or_path: str, where: str) -> Path:
    """A YAML file's path, or the file of a preset name; `where` says which file named it, if one did."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:  # a path: preset names have neither
        if path.is_dir():
            raise ConfigError(f"config {name_or_path}{where} is a folder; expected a YAML file (.yaml or .yml)")
        if not path.exists():
            raise ConfigError(f"config file {name_or_path}{where} not found")
        if path.suffix not in (".yaml", ".yml"):
            raise ConfigError(f"config {name_or_path}{where} is not a YAML file: expected a .yaml or .yml name")
        return path
    path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"config {name_or_path!r}{where} is neither a YAML file nor a preset; presets: "
                          f"{', '.join(presets())}")
    return path


def merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def refuse_interpolations(values: dict, prefix: str = "") -> None:
    """`${...}` (e.g. `${oc.env:VAR}`) would be expanded into the config every job writes, secrets included."""
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            refuse_interpolations(value, full)
        elif isinstance(value, str) and "${" in value:
            raise ConfigError(f"{full}={value!r}: interpolations (${{...}}) are not allowed, since the resolved config "
                              "is written next to the outputs; pass the value itself")
