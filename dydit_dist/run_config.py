"""The resolved config a job writes into its run folder, and the settings a resumed run keeps.

    run_config.save(cfg, "finetune")            # after the job's checks pass
    changes = run_config.weights_changes(run_config.previous(cfg, "finetune"), cfg)

Policy (one file per distinct config, plus the latest): `config.{job}.yaml` is the config of the
job's latest run in this folder, and `config-history/{job}-{n:03d}.yaml` keeps every distinct config
the job ran with (001 the first). A rerun with the same config writes nothing; a config that differs
becomes the next history entry, then the latest, so no file that described earlier outputs is lost
(a folder from before the history gets its old `config.{job}.yaml` saved as entry 001 first).
The written config is the typed one: `${...}` interpolations never reach it (`config.load` refuses them).

What decides a training run's weights is one list, `WEIGHTS`: every leaf key under it but `RUN_ONLY`
(where and how the run ran) and the options of a method the model does not use (`weights_changes`).
A key added to the config after a run was written counts at its default (what the code did before).
A run that resumes from a checkpoint keeps them, but train.max_steps (a run may be extended) and
train.init_from (a resume starts from its checkpoint), unless `train.allow_changed_settings=true`
(`train.launcher.check_settings`); a finished run is reused only when none of them changed, but
train.micro_batch_size and data.num_workers (`pipeline.finetune_changes`).
"""

from __future__ import annotations

import dataclasses
import json
import math

from omegaconf import OmegaConf

from dydit_dist import storage
from dydit_dist.config import Config, TrainConfig, scale_lr
from dydit_dist.paths import RunPaths

WEIGHTS = ("model", "diffusion", "train", "data.uri", "data.flip", "data.shuffle_buffer",
           "data.num_workers")  # the loader workers take turns: they decide the sample order too
RUN_ONLY = ("model.checkpoint", "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoint",
            "train.log_every", "train.record_batches", "train.allow_changed_settings")
LR_KEYS = ("train.lr", "train.lr_scaling", "train.lr_base_batch")  # compared as train.scaled_lr (`weights_changes`)
METHOD_OPTIONS = {"dydit": "model.dynamic", "flexdit": "model.flexdit"}  # read only by that model.method


def previous(cfg: Config, job: str) -> dict | None:
    """The config `job` last ran with in the run folder of `cfg`, as a plain dict; None if it never ran."""
    url = RunPaths(cfg).config(job)
    if not storage.exists(url):
        return None
    return OmegaConf.to_container(OmegaConf.create(storage.read_bytes(url).decode()), resolve=False)


def _leaves(values: dict, prefix: str = "") -> dict:
    """{dotted key: value} of every leaf of a nested dict."""
    out = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        out.update(_leaves(value, f"{key}.") if isinstance(value, dict) else {key: value})
    return out


def changed_within(old: dict | None, cfg: Config, sections: tuple[str, ...], ignore: tuple[str, ...] = ()) -> list[str]:
    """`key: old -> new` for every leaf key under `sections` (a section or a key) but `ignore` whose value in
    `cfg` differs from `old`; empty when `old` is None. A key added to the config since `old` was written
    counts at its default, which keeps what the code did before the key existed (`train.stage1_update:
    skip`): a resumed run of then with the key set otherwise is a change, not a silent switch."""
    if old is None:
        return []
    as_yaml = lambda c: _leaves(json.loads(json.dumps(c.to_dict())))  # noqa: E731 - tuples as the YAML's lists
    before, now = {**as_yaml(Config()), **_leaves(old)}, as_yaml(cfg)

    def within(key: str, names: tuple[str, ...]) -> bool:
        return any(key == name or key.startswith(f"{name}.") for name in names)

    return [f"{key}: {before[key]!r} -> {value!r}" for key, value in now.items()
            if key in before and within(key, sections) and not within(key, ignore) and before[key] != value]


def weights_changes(old: dict | None, cfg: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """`key: old -> new` for each key of `WEIGHTS` (but `RUN_ONLY`, `ignore` and the options of the methods
    other than cfg.model.method) whose value in `cfg` differs from `old`; empty when `old` is None. The lr
    keys (`LR_KEYS`) count by the lr the optimizer runs at (`TrainConfig.scaled_lr`): a run of before
    `train.lr_scaling` existed, resumed with a preset that scales by sqrt at its own batch, is no change."""
    unused = tuple(key for method, key in METHOD_OPTIONS.items() if method != cfg.model.method)
    changes = changed_within(old, cfg, WEIGHTS, RUN_ONLY + unused + ignore)
    if old is not None and not any(key in ignore for key in ("train", *LR_KEYS)):
        train = {**dataclasses.asdict(TrainConfig()), **old.get("train", {})}
        before = scale_lr(train["lr"], train["lr_scaling"], train["global_batch_size"], train["lr_base_batch"])
        of_lr = [change for change in changes if change.split(":", 1)[0] in LR_KEYS]
        if math.isclose(before, cfg.train.scaled_lr, rel_tol=1e-9):
            changes = [change for change in changes if change not in of_lr]  # the same lr, written otherwise
        elif not of_lr:  # scaled to another global batch
            changes.append(f"train.scaled_lr (the lr the optimizer runs at): {before:g} -> {cfg.train.scaled_lr:g}")
    return changes


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
