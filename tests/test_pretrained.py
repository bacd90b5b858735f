"""Pretrained components where every node can read them (`dydit_dist.pretrained`): a storage folder is
copied once per node; a Hugging Face id is mirrored once per job into object storage, and workers read
the mirror. The Hub itself is out of reach here: `snapshot_download` is replaced by a copy of a tiny VAE
folder that counts its calls."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from dydit_dist import config, pretrained, storage
from dydit_dist.preflight import plan


def _upload_folder(folder: str, url: str) -> None:
    for name in os.listdir(folder):
        storage.upload(os.path.join(folder, name), storage.join(url, name))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DYDIT_PRETRAINED_CACHE", str(tmp_path / "node-cache"))
    return tmp_path / "node-cache"


def test_storage_folder_is_copied_once_per_node_and_loads(tiny_vae, s3_bucket, cache, monkeypatch):
    from diffusers import AutoencoderKL

    url = f"{s3_bucket}/models/tiny-vae"
    _upload_folder(tiny_vae, url)
    downloads = []
    download = storage.download
    monkeypatch.setattr(storage, "download", lambda u, p: (downloads.append(u), download(u, p)))
    first = pretrained.local(url)
    assert first.startswith(str(cache)) and os.path.isfile(os.path.join(first, "config.json"))
    assert pretrained.local(url) == first and len(downloads) == len(os.listdir(tiny_vae))  # the second call copies nothing
    copied = AutoencoderKL.from_pretrained(first)
    original = AutoencoderKL.from_pretrained(tiny_vae)
    assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(), original.state_dict().values(), strict=True))


def test_storage_folder_without_a_model_is_named(s3_bucket, cache):
    with pytest.raises(FileNotFoundError, match=r"s3://.*/models/nothing: no config.json; expected a folder"):
        pretrained.local(f"{s3_bucket}/models/nothing")
    assert not any(p.name.startswith(".copy-") for p in cache.glob("*"))  # nothing half-written


def test_a_hub_id_is_mirrored_once_per_job_and_workers_read_the_mirror(tiny_vae, tmp_path, cache, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot(repo, allow_patterns, local_dir):
        calls.append((repo, tuple(allow_patterns)))
        shutil.copytree(tiny_vae, local_dir, dirs_exist_ok=True)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    cfg = config.load("debug", [f"storage.root={tmp_path}/out", "data.vae=org/tiny-vae"])
    root = cfg.storage.root
    assert pretrained.local("org/tiny-vae", root) == "org/tiny-vae"  # no mirror yet: from_pretrained's own download
    (url,) = pretrained.mirror(cfg, captions=False)
    assert url == f"file://{root}/pretrained/org--tiny-vae" and storage.exists(f"{url}/.complete")
    assert pretrained.mirror(cfg, captions=False) == [url] and len(calls) == 1  # a rerun finds the mirror
    assert "*.safetensors" in calls[0][1]
    local = pretrained.local("org/tiny-vae", root)
    assert local.startswith(str(cache)) and os.path.isfile(os.path.join(local, "diffusion_pytorch_model.safetensors"))
    (vae,) = [i for i in plan(cfg, "prepare").inputs if i.key == "data.vae"]
    assert vae.problem is None and vae.note == f"mirrored at {url}"


def test_preflight_resolves_storage_folders_and_names_missing_ones(tiny_vae, s3_bucket, tmp_path):
    url = f"{s3_bucket}/models/tiny-vae"
    _upload_folder(tiny_vae, url)
    good = config.load("debug", [f"storage.root={tmp_path}/out", f"data.vae={url}"])
    (vae,) = [i for i in plan(good, "prepare").inputs if i.key == "data.vae"]
    assert vae.problem is None and "storage folder" in vae.note
    bad = config.load("debug", [f"storage.root={tmp_path}/out", f"data.vae={s3_bucket}/models/none-here"])
    (vae,) = [i for i in plan(bad, "prepare").inputs if i.key == "data.vae"]
    assert vae.problem.startswith(f"{s3_bucket}/models/none-here/config.json: not found") and "save_pretrained" in vae.problem
