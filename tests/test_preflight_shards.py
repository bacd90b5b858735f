"""The finetune preflight checks every data shard's size against the manifest (one listing of the folder,
no download) and names each missing or truncated shard before any worker starts."""

from __future__ import annotations

import os

import pytest

from dydit_dist import config, storage
from dydit_dist.data import ManifestError, verify_manifest
from dydit_dist.data.synthetic import random_dataset
from dydit_dist.preflight import plan

NUM_SHARDS = 200


@pytest.fixture(scope="module")
def cfg():
    return config.load("debug", ["model.image_size=16"])


def test_200_shard_sizes_come_from_one_listing(tmp_path, cfg, monkeypatch):
    """No request per shard (a HEAD each on S3): the sizes of all 200 come from one listing of the folder."""
    uri = str(tmp_path / "data")
    random_dataset(uri, cfg, num_samples=NUM_SHARDS, shard_size=1)

    def no_head(url: str) -> int:
        raise AssertionError(f"a request per shard: {url}")

    listed = []

    def counted_entries(url: str) -> list[dict]:
        listed.append(url)
        return entries(url)

    entries = storage.entries
    monkeypatch.setattr(storage, "size", no_head)
    monkeypatch.setattr(storage, "entries", counted_entries)
    manifest = verify_manifest(uri, cfg.model, cfg.data)
    assert manifest.num_shards == NUM_SHARDS
    assert listed == [uri], listed


def test_missing_and_truncated_shards_are_named(tmp_path, cfg):
    uri = str(tmp_path / "data")
    manifest = random_dataset(uri, cfg, num_samples=12, shard_size=2)
    names = [r["name"] for r in manifest.records()]
    os.remove(os.path.join(uri, names[1]))
    with open(os.path.join(uri, names[4]), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ManifestError) as err:
        verify_manifest(uri, cfg.model, cfg.data)
    message = str(err.value)
    assert f"2 of {len(names)} shards" in message
    assert f"{names[1]} missing" in message and f"{names[4]} has 100 bytes" in message
    for name in names[:1] + names[2:4] + names[5:]:
        assert name not in message


def test_finetune_plan_reports_a_truncated_shard(tmp_path):
    cfg = config.load("debug", ["model.image_size=16", f"storage.root={tmp_path}", f"data.uri={tmp_path}/data"])
    manifest = random_dataset(f"{tmp_path}/data", cfg, num_samples=16, shard_size=4)
    name = manifest.records()[2]["name"]
    with open(tmp_path / "data" / name, "r+b") as f:
        f.truncate(10)
    text = plan(cfg, "finetune").text()
    assert f"{name} has 10 bytes" in text, text
