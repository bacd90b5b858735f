"""Reruns verify before they trust: a shard recorded as done is made again when its object is missing or
truncated; readers check each shard's sha256 as they stream; a failed start leaves no manifest; a
manifest that records nothing never holds the folder; a finished rerun rewrites nothing."""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pytest
from sampling_util import random_checkpoint, tiny_config

from dydit_dist import storage
from dydit_dist.models import CheckpointError
from dydit_dist.sample import GeneratedSample, SamplesManifest, iter_samples, pack, run_sampling
from dydit_dist.shardset import ShardError, remove_shards, settings_digest, write_marker, write_shard

SETTINGS = {"seed": 0, "num_samples": 12}


def _samples(indices) -> list[GeneratedSample]:
    rng = np.random.default_rng(0)
    return [GeneratedSample(k, rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), {"index": k, "class": k % 3})
            for k in indices]


def test_a_late_copy_of_a_shard_keeps_the_first_and_records_it(tmp_path, caplog):
    """An actor taken for lost that still writes its copy after its replacement's (on a GPU the copies'
    bytes may differ): the first copy stays, and the late writer's record, which becomes its done-marker
    and the manifest's record, describes the bytes storage holds. A driver removes the objects it makes
    again first (`remove_shards`), only those."""
    url = str(tmp_path / "samples")
    first = write_shard(url, 0, pack(_samples(range(4))), 4)
    write_shard(url, 1, pack(_samples(range(4, 8))), 4)
    other = [GeneratedSample(s.index, 255 - s.image, s.meta) for s in _samples(range(4))]
    with caplog.at_level(logging.WARNING, logger="dydit_dist.shardset"):
        late = write_shard(url, 0, pack(other), 4)
    assert late == first and storage.read_bytes(f"{url}/shard-000000.tar") == pack(_samples(range(4)))
    assert "another copy of this shard was written first; it is kept" in caplog.text
    assert write_shard(url, 0, pack(_samples(range(4))), 4) == first  # the same bytes: the same record
    assert remove_shards(url, [0, 5]) == [f"file://{url}/shard-000000.tar"]
    assert sorted(os.listdir(url)) == ["shard-000001.tar"]
    assert write_shard(url, 0, pack(other), 4)["sha256"] != first["sha256"]  # made again: this copy


def _finished_folder(url: str) -> SamplesManifest:
    """Three shards of four samples, written and marked as the pool does, and their manifest."""
    manifest = SamplesManifest(SETTINGS, 3)
    for i in range(3):
        record = write_shard(url, i, pack(_samples(range(4 * i, 4 * i + 4))), 4)
        record.update(start=4 * i, settings_sha256=settings_digest(SETTINGS))
        write_marker(url, record)
        manifest.add(record)
    manifest.write(url)
    return manifest


def test_resume_forgets_shards_that_are_missing_or_truncated(tmp_path, caplog):
    url = str(tmp_path / "samples")
    _finished_folder(url)
    os.remove(tmp_path / "samples" / "shard-000000.tar")
    shard = tmp_path / "samples" / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    with caplog.at_level(logging.WARNING):
        manifest = SamplesManifest.resume(url, SETTINGS, 3, drop_missing=True)
    assert sorted(manifest.shards) == [1] and not manifest.complete
    assert "shard-000000.tar, shard-000002.tar" in caplog.text


def test_resume_reads_the_stored_sizes_from_one_listing(tmp_path, monkeypatch):
    """A rerun verifies every recorded shard: one request per shard (a HEAD each, 1,282 for ImageNet's data
    set, on every rerun) became one listing of the folder."""
    url = str(tmp_path / "samples")
    _finished_folder(url)
    os.remove(tmp_path / "samples" / "shard-000001.tar")

    def no_head(url: str) -> int:
        raise AssertionError(f"a request per shard: {url}")

    monkeypatch.setattr(storage, "size", no_head)
    assert sorted(SamplesManifest.resume(url, SETTINGS, 3, drop_missing=True).shards) == [0, 2]


def test_a_manifest_that_records_nothing_does_not_hold_the_folder(tmp_path):
    url = str(tmp_path / "samples")
    SamplesManifest({"seed": 0, "checkpoint": "bad.safetensors"}, 3).write(url)  # a start that failed
    manifest = SamplesManifest.resume(url, SETTINGS, 3)
    assert manifest.settings == SETTINGS and manifest.shards == {}
    # A marker says a shard was made with those settings: then the folder is theirs.
    write_marker(url, {"index": 0, "name": "shard-000000.tar", "count": 4,
                       "settings_sha256": settings_digest({"seed": 1})})
    SamplesManifest({"seed": 1}, 3).write(url)
    with pytest.raises(ValueError, match="seed: 1 there vs 0 now"):
        SamplesManifest.resume(url, SETTINGS, 3)


def test_readers_check_each_shards_sha256_as_they_stream(tmp_path):
    url = str(tmp_path / "samples")
    _finished_folder(url)
    assert [s.index for s in iter_samples(url)] == list(range(12))
    # One class label changed in place: same size, every member still decodes; only the sha256 tells.
    shard = tmp_path / "samples" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    at = data.index(b"00000005.cls") + 512  # the payload follows its 512-byte header
    assert data[at : at + 1] == b"2"
    data[at : at + 1] = b"1"
    shard.write_bytes(bytes(data))
    seen = []
    with pytest.raises(ShardError, match="corrupt shard .*shard-000001.tar.*sha256"):
        for s in iter_samples(url):
            seen.append(s.index)
    assert seen == list(range(8))  # the error comes at the end of the corrupt shard, before the next one


# ---------------------------------------------------------------------------- the sample job, on Ray


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "static.safetensors"))


@pytest.mark.integration
def test_rerun_remakes_a_deleted_and_a_truncated_shard(ray_local, tmp_path, checkpoint):
    cfg = tiny_config(str(tmp_path), f"model.checkpoint={checkpoint}", "sample.num_actors=1")
    url = str(tmp_path / "runs/t/samples")
    first = run_sampling(cfg)
    assert first.complete and first.num_samples == 16
    os.remove(f"{url}/shard-000001.tar")
    with open(f"{url}/shard-000002.tar", "r+b") as f:
        f.truncate(1000)
    remade = []
    again = run_sampling(cfg, on_shard=lambda pool, record: remade.append(record["index"]))
    assert sorted(remade) == [1, 2] and again.complete and again.num_samples == 16
    for i in range(4):  # the same bytes as the first run made
        assert again.shards[i]["sha256"] == first.shards[i]["sha256"]
    assert sorted(s.index for s in iter_samples(url)) == list(range(16))


@pytest.mark.integration
def test_failed_start_leaves_no_manifest_and_the_corrected_rerun_runs(ray_local, tmp_path, checkpoint):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    url = str(tmp_path / "runs/t/samples")
    with pytest.raises(CheckpointError, match="bad.safetensors: cannot read as a safetensors file"):
        run_sampling(tiny_config(str(tmp_path), f"model.checkpoint={bad}", "sample.num_actors=1"))
    assert not storage.exists(f"{url}/manifest.json")
    manifest = run_sampling(tiny_config(str(tmp_path), f"model.checkpoint={checkpoint}", "sample.num_actors=1"))
    assert manifest.complete and manifest.settings["checkpoint"] == checkpoint


@pytest.mark.integration
def test_rerun_of_a_finished_job_rewrites_no_manifest(ray_local, tmp_path, checkpoint):
    cfg = tiny_config(str(tmp_path), f"model.checkpoint={checkpoint}", "sample.num_actors=1")
    run_sampling(cfg)
    path = tmp_path / "runs/t/samples/manifest.json"
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    again = run_sampling(cfg)
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    assert again.stats == json.loads(before)["stats"] and "sampling_wall_s" in again.stats
    # A driver that died after the last marker but before its last manifest write: merged and written.
    record = again.shards.pop(3)
    SamplesManifest(again.settings, again.num_shards, again.shards, again.stats).write(str(path.parent))
    assert storage.exists(str(path.parent / "done" / record["name"].replace(".tar", ".json")))
    merged = run_sampling(cfg)
    assert merged.complete and json.loads(path.read_bytes())["complete"]


def test_a_running_job_rewrites_its_manifest_at_most_a_small_share_of_its_time():
    """The driver rewrote its manifest every few seconds whatever it cost: ImageNet's prepare manifest (~15 MB,
    seconds of JSON) took a share of the driver's time and ~8 GB of uploads over a 3 h run. A write that took
    w seconds is followed by none for w / WRITE_SHARE; the first waits `every_s`."""
    from dydit_dist.shardset import WRITE_SHARE, PeriodicWriter

    class SlowManifest:
        writes = 0

        def write(self, uri: str) -> None:
            self.writes += 1
            time.sleep(0.05)

    manifest = SlowManifest()
    writer = PeriodicWriter(manifest, "unused", every_s=0.01)
    writer()
    assert manifest.writes == 0  # not before every_s
    end = time.monotonic() + 0.05 / WRITE_SHARE * 0.8
    while time.monotonic() < end:  # a shard finishes every millisecond
        writer()
        time.sleep(0.001)
    assert manifest.writes == 1


def test_stored_sizes_fall_back_to_one_request_per_shard_where_listing_is_denied(tmp_path, monkeypatch):
    """A data bucket that grants GetObject but not ListBucket: the sizes come from a HEAD per shard."""
    from dydit_dist.shardset import stored_sizes

    url = str(tmp_path / "samples")
    records = _finished_folder(url).records()
    os.remove(tmp_path / "samples" / "shard-000001.tar")

    def denied(url: str):
        raise storage.StorageError(f"listing {url} failed: PermissionError: Access Denied") from PermissionError("denied")

    monkeypatch.setattr(storage, "entries", denied)
    sizes = stored_sizes(url, records)
    assert sizes[1] is None and sizes[0] == records[0]["bytes"] and sizes[2] == records[2]["bytes"]
