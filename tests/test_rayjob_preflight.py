"""Every RayJob's entrypoint, as written in cluster/kuberay/, resolves: its placeholders (the bucket
`s3://CHANGE-ME-bucket`) become a local folder holding fixtures shaped like the real inputs (checkpoints
with the preset network's keys on the meta device, a data set that fits the model, a mirrored VAE, a
reference batch, Inception weights), and the job's own `--dry-run` must print the plan and exit 0. With
the inputs absent, it must exit 2 naming every one. No Ray is started, nothing leaves 127.0.0.1."""

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
from cluster_util import LAUNCHES, job_of
from sampling_util import random_checkpoint, write_samples

from dydit_dist import config, pretrained, storage
from dydit_dist.data.synthetic import random_dataset
from dydit_dist.models.registry import arch
from dydit_dist.network import build_network
from dydit_dist.paths import RunPaths, ema_pointer

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = "s3://CHANGE-ME-bucket"
# The inputs each entrypoint must name (the launch files are complete when these are all there).
INPUTS = {
    "prepare": ("data.source", "data.vae"),  # and data.uri, where its output goes
    "finetune": ("train.init_from", "data.uri"),
    "sample": ("model.checkpoint", "data.vae"),
    "evaluate": ("eval.reference", "eval.inception_weights"),
    "reproduce": ("model.checkpoint", "data.uri", "data.vae", "eval.reference", "eval.inception_weights"),
    # AT-EDM on SD-XL: a pipeline folder, COCO image paths with captions (the reference is made from them)
    "reproduce-sdxl": ("model.checkpoint", "data.source", "eval.inception_weights", "eval.clip_model"),
}


def entrypoint(launch: str, bucket: str) -> list[str]:
    """The RayJob's arguments after `python -m jobs.<job>`, with the bucket placeholder replaced."""
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / f"rayjob-{launch}.yaml").read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", f"jobs.{job_of(launch)}"]
    return [a.replace(PLACEHOLDER, bucket) for a in argv[3:]]


def overrides(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("--"))


def _static_keys(cfg: config.Config, routers: bool) -> dict[str, torch.Tensor]:
    """The preset network's state dict on the meta device (no memory), plus every router tensor's name (the
    preflight checks the added tensors by name only)."""
    import dataclasses

    from dydit_dist.resolve import added_keys

    with torch.device("meta"):
        network = build_network(dataclasses.replace(cfg.model, method="static"))
        sd = dict(network.state_dict())
    if routers:
        sd.update({key: torch.empty(1, device="meta") for key in added_keys(cfg, len(network.blocks))})
    return sd


def _tar(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("000000.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"0"))


def _mirrored(value: str, cfg: config.Config, files: dict[str, dict]) -> None:
    """The Hugging Face id `value` as the job's driver leaves it mirrored under storage.root: `files`
    (name -> JSON) and the completion marker."""
    mirror = pretrained.mirror_url(value, cfg.storage.root)
    for name, content in {**files, pretrained.COMPLETE: {}}.items():
        storage.write_json(storage.join(mirror, name), content)


def _caption_list(url: str) -> None:
    """A .csv of image paths with captions, and its one image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    storage.write_bytes(storage.join(url.rsplit("/", 1)[0], "img/0.png"), buf.getvalue())
    storage.write_bytes(url, b"path,caption\nimg/0.png,a black square\n")


def make_fixtures(launch: str, argv: list[str], tmp_path: Path, tiny_vae: str) -> None:
    """Write, at the paths the entrypoint names, inputs shaped like the real ones."""
    job = job_of(launch)
    values = overrides(argv)
    cfg = config.load(argv[argv.index("--config") + 1], list(values_argv(argv)))
    for key, value in values.items():
        if key not in INPUTS[launch]:
            continue
        path = value.removeprefix("file://")
        if key == "model.checkpoint" and pretrained.is_hub_id(value):  # an SD-XL pipeline: its UNet's config
            _mirrored(value, cfg, {"model_index.json": {}, "unet/config.json": arch(cfg.model.name)})
        elif key == "eval.clip_model":
            _mirrored(value, cfg, {"config.json": {}})
        elif key == "data.source" and cfg.data.source_format == "captions":
            _caption_list(value)
        elif key in ("model.checkpoint", "train.init_from"):
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
            size = cfg.model.image_size  # images of the samples' resolution (the preflight checks it)
            np.savez(path, arr_0=np.zeros((4, size, size, 3), np.uint8))
        elif key == "eval.inception_weights":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save({}, path)
    if job == "evaluate":  # the samples of the sample job this evaluates (made by a tiny model here)
        checkpoint = random_checkpoint(str(tmp_path / "debug.safetensors"))
        # as many samples as the Inception Score's splits (eval.isc_splits, 10): the preflight refuses fewer
        small = config.load("debug", [f"model.checkpoint={checkpoint}", "sample.num_samples=10", "sample.shard_size=5",
                                      "sample.batch_size=5", "sample.steps=2"])
        write_samples(small, RunPaths(cfg).samples)


def values_argv(argv: list[str]) -> list[str]:
    return [a for a in argv if "=" in a and not a.startswith("--")]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty Hugging Face cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


@pytest.mark.parametrize("launch", LAUNCHES)
def test_each_rayjob_names_every_input_of_its_job(launch):
    named = overrides(entrypoint(launch, PLACEHOLDER))
    missing = set(INPUTS[launch]) - set(named)
    assert not missing, f"rayjob-{launch}.yaml does not name {missing}"
    for key in INPUTS[launch]:
        assert named[key].startswith(PLACEHOLDER) or pretrained.is_hub_id(named[key]), (key, named[key])


@pytest.mark.parametrize("launch", LAUNCHES)
def test_rayjob_entrypoint_resolves_against_local_fixtures(launch, tmp_path, tiny_vae, offline, capsys):
    argv = entrypoint(launch, f"file://{tmp_path}/bucket")
    make_fixtures(launch, argv, tmp_path, tiny_vae)
    job = job_of(launch)
    main = importlib.import_module(f"jobs.{job}").main
    code = main(["--dry-run", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err + captured.out
    assert f"preflight {job}" in captured.out and "UNRESOLVED" not in captured.out
    for key in INPUTS[launch]:
        assert f"ok         {key}=" in captured.out, (key, captured.out)


@pytest.mark.parametrize("launch", LAUNCHES)
def test_rayjob_entrypoint_without_its_inputs_fails_naming_each(launch, tmp_path, offline, capsys):
    argv = entrypoint(launch, f"file://{tmp_path}/bucket")
    main = importlib.import_module(f"jobs.{job_of(launch)}").main
    start = time.monotonic()
    code = main(["--dry-run", *argv])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    print(f"{launch}: the missing inputs reported in {elapsed:.1f} s")
    assert code == 2, (code, err)
    unresolved = [line.strip().split("=", 1)[0] for line in err.splitlines()[1:] if "=" in line]
    assert set(INPUTS[launch]) <= set(unresolved), err
    assert not (tmp_path / "bucket").exists()  # a dry run writes nothing
