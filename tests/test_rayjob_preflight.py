"""Every RayJob's entrypoint, as written in cluster/kuberay/, resolves: its placeholders (the bucket
`s3://CHANGE-ME-bucket`) become a local folder holding fixtures shaped like the real inputs (checkpoints
with the preset network's keys on the meta device, a data set that fits the model, a mirrored VAE, a
reference batch, Inception weights), and the job's own `--dry-run` must print the plan and exit 0. With
the inputs absent, it must exit 2 in seconds naming every one. No Ray is started, nothing leaves 127.0.0.1."""

from __future__ import annotations

import importlib
import io
import os
import shlex
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from braceexpand import braceexpand
from sampling_util import random_checkpoint, write_samples

from dydit_dist import config, pretrained, storage
from dydit_dist.data.synthetic import random_dataset
from dydit_dist.dynamic import ROUTER_KEY_PATTERNS
from dydit_dist.network import build_network
from dydit_dist.paths import RunPaths, ema_pointer

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = "s3://CHANGE-ME-bucket"
JOBS = ("prepare", "finetune", "sample", "evaluate", "reproduce")
# The inputs each entrypoint must name (the launch files are complete when these are all there).
INPUTS = {
    "prepare": ("data.source", "data.vae"),  # and data.uri, where its output goes
    "finetune": ("train.init_from", "data.uri"),
    "sample": ("model.checkpoint", "data.vae"),
    "evaluate": ("eval.reference", "eval.inception_weights"),
    "reproduce": ("model.checkpoint", "data.uri", "data.vae", "eval.reference", "eval.inception_weights"),
}


def entrypoint(job: str, bucket: str) -> list[str]:
    """The RayJob's arguments after `python -m jobs.<job>`, with the bucket placeholder replaced."""
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / f"rayjob-{job}.yaml").read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", f"jobs.{job}"]
    return [a.replace(PLACEHOLDER, bucket) for a in argv[3:]]


def overrides(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("--"))


def _static_keys(cfg: config.Config, routers: bool) -> dict[str, torch.Tensor]:
    """The preset network's state dict on the meta device (no memory), plus router-named tensors."""
    import dataclasses

    with torch.device("meta"):
        sd = dict(build_network(dataclasses.replace(cfg.model, method="static")).state_dict())
    if routers:
        sd.update({p.replace("*", "0", 1).replace(".*", ".weight"): torch.empty(1, device="meta")
                   for p in ROUTER_KEY_PATTERNS})
    return sd


def _tar(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("000000.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"0"))


def make_fixtures(job: str, argv: list[str], tmp_path: Path, tiny_vae: str) -> None:
    """Write, at the paths the entrypoint names, inputs shaped like the real ones."""
    values = overrides(argv)
    cfg = config.load(argv[argv.index("--config") + 1], list(values_argv(argv)))
    for key, value in values.items():
        if key not in INPUTS[job]:
            continue
        path = value.removeprefix("file://")
        if key in ("model.checkpoint", "train.init_from"):
            if value.endswith(".pt"):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.save({"ema": _static_keys(cfg, routers=False)}, path)
            else:  # a fine-tuned run folder: its EMA pointer and export
                export = f"{value}/checkpoints/ema-step200000.pt"
                os.makedirs(os.path.dirname(export.removeprefix("file://")), exist_ok=True)
                torch.save(_static_keys(cfg, routers=cfg.model.method == "dydit"), export.removeprefix("file://"))
                storage.write_json(ema_pointer(value), {"step": 200000, "url": export})
        elif key == "data.uri":
            consumers = cfg.ray.num_workers * max(1, cfg.data.num_workers)
            random_dataset(value, cfg, num_samples=consumers, shard_size=consumers)
        elif key == "data.source":
            for url in {*list(braceexpand(value))[:1], *list(braceexpand(value))[-1:]}:
                _tar(url.removeprefix("file://"))
        elif key == "data.vae":
            mirror = pretrained.mirror_url(value, cfg.storage.root).removeprefix("file://")
            shutil.copytree(tiny_vae, mirror)
            Path(mirror, pretrained.COMPLETE).write_text("{}")
        elif key == "eval.reference":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.savez(path, arr_0=np.zeros((4, 16, 16, 3), np.uint8))
        elif key == "eval.inception_weights":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save({}, path)
    if job == "evaluate":  # the samples of the sample job this evaluates (made by a tiny model here)
        checkpoint = random_checkpoint(str(tmp_path / "debug.safetensors"))
        small = config.load("debug", [f"model.checkpoint={checkpoint}", "sample.num_samples=4", "sample.shard_size=4",
                                      "sample.batch_size=4", "sample.steps=2"])
        write_samples(small, RunPaths(cfg).samples)


def values_argv(argv: list[str]) -> list[str]:
    return [a for a in argv if "=" in a and not a.startswith("--")]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty Hugging Face cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


@pytest.mark.parametrize("job", JOBS)
def test_each_rayjob_names_every_input_of_its_job(job):
    named = overrides(entrypoint(job, PLACEHOLDER))
    assert set(INPUTS[job]) <= set(named), f"rayjob-{job}.yaml does not name {set(INPUTS[job]) - set(named)}"
    for key in INPUTS[job]:
        assert named[key].startswith(PLACEHOLDER) or pretrained.is_hub_id(named[key]), (key, named[key])


@pytest.mark.parametrize("job", JOBS)
def test_rayjob_entrypoint_resolves_against_local_fixtures(job, tmp_path, tiny_vae, offline, capsys):
    argv = entrypoint(job, f"file://{tmp_path}/bucket")
    make_fixtures(job, argv, tmp_path, tiny_vae)
    main = importlib.import_module(f"jobs.{job}").main
    code = main(["--dry-run", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err + captured.out
    assert f"preflight {job}" in captured.out and "UNRESOLVED" not in captured.out
    for key in INPUTS[job]:
        assert f"ok         {key}=" in captured.out, (key, captured.out)


@pytest.mark.parametrize("job", JOBS)
def test_rayjob_entrypoint_without_its_inputs_fails_in_seconds_naming_each(job, tmp_path, offline, capsys):
    argv = entrypoint(job, f"file://{tmp_path}/bucket")
    main = importlib.import_module(f"jobs.{job}").main
    start = time.monotonic()
    code = main(["--dry-run", *argv])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2 and elapsed < 30, (code, elapsed, err)
    unresolved = [line.strip().split("=", 1)[0] for line in err.splitlines()[1:] if "=" in line]
    assert set(INPUTS[job]) <= set(unresolved), err
    assert not (tmp_path / "bucket").exists()  # a dry run writes nothing
