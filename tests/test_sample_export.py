"""The ADM export: its path checked before a sample is read, its temporary file synced before its rename
and removed by the next export of the same path when a killed export left it behind, a local failure an
input error naming it."""

from __future__ import annotations

import os

import numpy as np
import pytest

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
        manifest.add({**write_shard(url, i, pack(samples), 3, replace=True), "start": 3 * i})
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


def test_an_export_path_that_is_no_local_npz_file_is_refused_before_reading(tmp_path, capsys):
    """A URL landed in a local folder named `s3:` (and the job said it was at s3://...); a folder failed with
    IsADirectoryError after writing the whole .npz. Both are refused before a sample is read, and by the
    sample job's dry run."""
    from dydit_dist.sample import SamplesError
    from jobs import sample

    url = str(tmp_path / "samples")
    _folder(url)
    (tmp_path / "exports").mkdir()
    (tmp_path / "afile").write_text("x")
    cases = {"s3://bucket/x.npz": "a local path", str(tmp_path / "exports"): "not a folder",
             str(tmp_path / "x.tar"): "expected the path of a .npz file",
             str(tmp_path / "afile" / "deeper" / "x.npz"): "afile is a file, not a folder"}
    for path, message in cases.items():
        with pytest.raises(SamplesError, match=rf"sample.export_npz={path}: .*{message}"):
            export_adm_npz(url, path)
        argv = ["--dry-run", "--config", "debug", f"storage.root={tmp_path}", f"sample.export_npz={path}"]
        assert sample.main(argv) == 2
        assert f"sample.export_npz={path}: " in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["afile", "exports", "samples"]  # nothing written (no `s3:` folder)
    assert export_adm_npz(url, f"file://{tmp_path}/ok.npz") == 6 and (tmp_path / "ok.npz").exists()
    assert sample.main(["--dry-run", "--config", "debug", f"storage.root={tmp_path}/r",
                        f"sample.export_npz={tmp_path}/y.npz"]) == 0


def test_an_export_that_fails_on_the_local_disk_is_an_input_error_naming_it(tmp_path, monkeypatch):
    """A full disk (or permissions changed since the preflight) after every sample was made: SamplesError
    naming sample.export_npz (one line, exit 2), no temporary file left."""
    from dydit_dist.sample import SamplesError

    url = str(tmp_path / "samples")
    _folder(url)

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module.os, "fsync", full)
    with pytest.raises(SamplesError, match=r"sample.export_npz=.*x.npz: the export failed \(OSError: .*No space"):
        export_adm_npz(url, str(tmp_path / "out" / "x.npz"))
    assert os.listdir(tmp_path / "out") == []


def test_a_shard_whose_samples_make_no_sense_is_named_corrupt_when_its_bytes_are_not_its_records(tmp_path):
    """A shard replaced by other bytes that still form a tar (a member lost) reads as a corrupt shard with
    what to do, not as a parse error of its content; content that is wrong in a shard that matches its
    record stays the parse error."""
    from dydit_dist import shardset
    from dydit_dist.sample import iter_samples
    from dydit_dist.shardset import ShardError

    url = str(tmp_path / "samples")
    _folder(url)
    shard = next(p for p in sorted((tmp_path / "samples").iterdir()) if p.name.endswith(".tar"))
    members = [{k: v for k, v in files.items() if k != "json"} for files in shardset.unpack(shard.read_bytes(), "x")]
    shard.write_bytes(shardset.pack(members))  # a tar still, every .json member gone
    with pytest.raises(ShardError, match=rf"corrupt shard .*{shard.name}: .* sha256 .*remove that object and rerun"):
        list(iter_samples(url))
    manifest = SamplesManifest.read(url)  # a manifest that records those bytes: the content is what is wrong
    record = next(r for r in manifest.shards.values() if r["name"] == shard.name)
    data = shard.read_bytes()
    record.update(bytes=len(data), sha256=__import__("hashlib").sha256(data).hexdigest())
    manifest.write(url)
    with pytest.raises(ShardError, match="lacks its .png or .json member"):
        list(iter_samples(url))
