"""The ADM export's temporary file: synced before its rename, and removed by the next export of the same
path when a killed export left it behind."""

from __future__ import annotations

import os

import numpy as np

from dydit_dist.sample import SamplesManifest, export_adm_npz, pack
from dydit_dist.sample import export as export_module
from dydit_dist.sample.shards import GeneratedSample
from dydit_dist.shardset import write_shard

HEX = "0123456789abcdef" * 2  # a uuid4().hex


def _folder(url: str) -> None:
    """Two shards of three 4x4 RGB samples and their manifest."""
    rng = np.random.default_rng(0)
    manifest = SamplesManifest({"seed": 0}, 2)
    for i in range(2):
        samples = [GeneratedSample(k, rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), {"index": k})
                   for k in range(3 * i, 3 * i + 3)]
        manifest.add({**write_shard(url, i, pack(samples), 3), "start": 3 * i})
    manifest.write(url)


def test_export_removes_the_temporary_files_of_a_killed_export_of_that_path_only(tmp_path):
    url = str(tmp_path / "samples")
    _folder(url)
    out = tmp_path / "out"
    out.mkdir()
    stale = [f"samples.npz.{HEX}.tmp", f"samples.npz.{HEX[::-1]}.tmp"]
    kept = ["samples.npz.tmp", f"samples.npz.{HEX}.tmp.keep", f"samples.npz.{HEX.upper()}.tmp",
            f"other.npz.{HEX}.tmp", f"xsamples.npz.{HEX}.tmp", f"samples.npz.{HEX[:31]}.tmp", f"samples.npzX{HEX}.tmp"]
    for name in stale + kept:
        (out / name).write_bytes(b"partial")
    assert export_adm_npz(url, str(out / "samples.npz")) == 6
    assert sorted(os.listdir(out)) == sorted(kept + ["samples.npz"])
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_0"].shape == (6, 4, 4, 3)


def test_export_syncs_its_file_before_the_rename(tmp_path, monkeypatch):
    url = str(tmp_path / "samples")
    _folder(url)
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(export_module.os, "fsync", lambda fd: (calls.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(export_module.os, "replace", lambda a, b: (calls.append("replace"), replace(a, b))[1])
    export_adm_npz(url, str(tmp_path / "samples.npz"))
    assert calls == ["fsync", "replace"]
