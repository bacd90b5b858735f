"""The resolved config a job writes into its run folder, and the settings a resumed run keeps.

    run_config.save(cfg, "finetune")            # after the job's checks pass
    changes = run_config.changed(run_config.previous(cfg, "finetune"), cfg)

Policy (one file per distinct config, plus the latest): `config.{job}.yaml` is the config of the
job's latest run in this folder, and `config-history/{job}-{n:03d}.yaml` keeps every distinct config
the job ran with (001 the first). A rerun with the same config writes nothing; a config that differs
becomes the next history entry, then the latest, so no file that described earlier outputs is lost
(a folder from before the history gets its old `config.{job}.yaml` saved as entry 001 first).
The written config is the typed one: `${...}` interpolations never reach it (`config.load` refuses them).

`SETTINGS` are the keys a fine-tune may not change when it resumes from a checkpoint without
`train.allow_changed_settings=true` (see `train.launcher.check_settings`).
"""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from dydit_dist import storage
from dydit_dist.config import Config
from dydit_dist.paths import RunPaths

SETTINGS = ("model.name", "model.method", "model.image_size", "train.lr", "train.global_batch_size",
            "train.micro_batch_size", "train.precision")


def previous(cfg: Config, job: str) -> dict | None:
    """The config `job` last ran with in the run folder of `cfg`, as a plain dict; None if it never ran."""
    url = RunPaths(cfg).config(job)
    if not storage.exists(url):
        return None
    return OmegaConf.to_container(OmegaConf.create(storage.read_bytes(url).decode()), resolve=False)


def _value(values: dict, key: str):
    for part in key.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def changed(old: dict | None, cfg: Config, keys: tuple[str, ...] = SETTINGS) -> list[str]:
    """`key: old -> new` for each of `keys` whose value in `cfg` differs from `old` (empty when `old` is None)."""
    if old is None:
        return []
    new = cfg.to_dict()
    return [f"{key}: {_value(old, key)!r} -> {_value(new, key)!r}" for key in keys
            if _value(old, key) != _value(new, key)]


def _leaves(values: dict, prefix: str = "") -> dict:
    """{dotted key: value} of every leaf of a nested dict."""
    out = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        out.update(_leaves(value, f"{key}.") if isinstance(value, dict) else {key: value})
    return out


def changed_within(old: dict | None, cfg: Config, sections: tuple[str, ...], ignore: tuple[str, ...] = ()) -> list[str]:
    """`changed` over every leaf key under `sections` (a section or a key) but `ignore`, that `old` has too
    (a key added to the config since `old` was written is not a change); empty when `old` is None."""
    if old is None:
        return []
    before, now = _leaves(old), _leaves(json.loads(json.dumps(cfg.to_dict())))  # tuples as the YAML's lists

    def within(key: str, names: tuple[str, ...]) -> bool:
        return any(key == name or key.startswith(f"{name}.") for name in names)

    return [f"{key}: {before[key]!r} -> {value!r}" for key, value in now.items()
            if key in before and within(key, sections) and not within(key, ignore) and before[key] != value]


def save(cfg: Config, job: str) -> str:
    """Write `cfg` as the latest config of `job` in its run folder (see the module docstring); returns its URL."""
    paths = RunPaths(cfg)
    url, text = paths.config(job), cfg.to_yaml().encode()
    old = storage.read_bytes(url) if storage.exists(url) else None
    if old == text:
        return url
    n = 1
    while storage.exists(paths.config_version(job, n)):
        n += 1
    if old is not None and n == 1:  # written before the history existed
        storage.write_bytes(paths.config_version(job, 1), old)
        n = 2
    storage.write_bytes(paths.config_version(job, n), text)
    storage.write_bytes(url, text)
    return url
