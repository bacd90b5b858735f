"""The prepare job on a local Ray instance, into a local folder and an S3 bucket, and reading it back."""

import contextlib
import io
import json
import os
import re
import time

import numpy as np
import pytest
import torch

from dydit_dist import config, storage
from dydit_dist.data import LatentStream, Manifest, ManifestError, prepare, verify_manifest
from dydit_dist.shardset import marker_url, pack, shard_url
from dydit_dist.storage import StorageError

pytestmark = pytest.mark.integration


def _cfg(preset, source, uri, *overrides, endpoint=None):
    extra = [f"storage.endpoint_url={endpoint}"] if endpoint else []
    return config.load(preset, [f"data.source={source}", f"data.uri={uri}", "data.shard_size=8",
                                "data.encode_batch_size=8", "data.max_bad_fraction=0.05",  # 2 of 50 unreadable
                                *extra, *overrides])


def _dit(image_source, uri, tiny_vae, *overrides, endpoint=None):
    return _cfg("debug", image_source["folder"], uri, "model.num_classes=3", "model.image_size=32",
                "model.vae_downsample=8", f"data.vae={tiny_vae}", *overrides, endpoint=endpoint)


def _read_epoch(uri, world_size=2, num_workers=2, batch_size=4):
    """Each rank's first epoch of batches (48 samples over 2 ranks x 2 workers: 3 batches per worker)."""
    out = []
    for rank in range(world_size):
        stream = LatentStream(uri, batch_size=batch_size, rank=rank, world_size=world_size, seed=0,
                              num_workers=num_workers, shuffle_buffer=16)
        steps = stream.samples_per_epoch // batch_size
        out.append([batch for _, batch in zip(range(steps), stream, strict=False)])
    return out


def _mtimes(uri):
    """Each shard's modification time (S3: LastModified, to the second; an ETag is the content's MD5,
    which a rewrite of the same bytes keeps)."""
    fs, path = storage.filesystem(uri)
    fs.invalidate_cache()
    return {info["name"]: info.get("LastModified") or info.get("mtime") for info in fs.ls(path, detail=True)
            if info["name"].endswith(".tar")}


def test_prepare_local_then_read_back_and_rerun(ray_local, image_source, tiny_vae, tmp_path):
    uri = str(tmp_path / "latents")
    cfg = _dit(image_source, uri, tiny_vae, "data.flip=true")
    result = prepare(cfg)
    manifest = result.manifest
    assert result.encoded == 7 and manifest.complete and manifest.num_samples == 48
    assert manifest.settings["stored_shape"] == [2, 4, 4, 4] and manifest.settings["scale_factor"] == 0.18215
    bad = sorted(b["source"].rsplit("/", 2)[-2] + "/" + b["source"].rsplit("/", 1)[-1]
                 for s in manifest.shards.values() for b in s["bad"])
    assert bad == sorted(image_source["bad"]) and manifest.bad_inputs == 2
    verify_manifest(uri, cfg.model, cfg.data)

    ranks = _read_epoch(uri)
    assert len(ranks[0]) == len(ranks[1]) == 6
    seen = [i for batches in ranks for b in batches for i in b["index"].tolist()]
    assert sorted(seen) == list(range(48))
    assert ranks[0][0]["x"].shape == (4, 4, 4, 4) and ranks[0][0]["y"].dtype == torch.int64

    before = _mtimes(uri)
    again = prepare(cfg)
    assert again.encoded == 0 and again.skipped == 7 and _mtimes(uri) == before  # nothing redone

    # An interrupted run: one shard lost. The rerun encodes only that one, to the same bytes.
    lost = shard_url(uri, 4)
    old = storage.read_bytes(lost)
    storage.remove(lost)
    resumed = prepare(cfg)
    assert resumed.encoded == 1 and storage.read_bytes(lost) == old
    assert {k: v for k, v in _mtimes(uri).items() if not k.endswith("shard-000004.tar")} == \
        {k: v for k, v in before.items() if not k.endswith("shard-000004.tar")}

    # A task that wrote other bytes and died before its done-marker, never recorded: the rerun removes the
    # object and encodes it again (a task's write only creates; it would have kept those bytes).
    unrecorded, manifest = shard_url(uri, 5), Manifest.read(uri)
    good = storage.read_bytes(unrecorded)
    del manifest.shards[5]
    manifest.complete = False
    manifest.write(uri)
    storage.remove(marker_url(uri, 5))
    storage.write_bytes(unrecorded, good[: len(good) // 2])
    remade = prepare(cfg)
    assert remade.encoded == 1 and storage.read_bytes(unrecorded) == good
    assert remade.manifest.shards[5]["sha256"] == Manifest.read(uri).shards[5]["sha256"]

    with pytest.raises(ManifestError, match="num_classes=10"):
        verify_manifest(uri, config.load("debug", ["model.image_size=32", "model.vae_downsample=8"]).model, cfg.data)
    with pytest.raises(ValueError, match="already holds shards prepared with other settings.*latent_storage"):
        prepare(_dit(image_source, uri, tiny_vae, "data.flip=true", "data.latent_storage=sample"))


def test_prepare_to_s3_and_stream_from_it(ray_local, image_source, tiny_vae, s3_bucket, s3_endpoint):
    uri = f"{s3_bucket}/data/tiny"
    cfg = _dit(image_source, uri, tiny_vae, "data.latent_storage=sample", endpoint=s3_endpoint)
    assert prepare(cfg).manifest.num_samples == 48
    assert storage.exists(f"{uri}/manifest.json") and storage.exists(f"{uri}/prepare.config.yaml")
    ranks = _read_epoch(uri)
    seen = [i for batches in ranks for b in batches for i in b["index"].tolist()]
    assert sorted(seen) == list(range(48))
    resumed = LatentStream(uri, batch_size=4, rank=1, world_size=2, seed=0, num_workers=2, shuffle_buffer=16,
                           start_step=3)
    for expected, (_, batch) in zip(ranks[1][3:], zip(range(3), resumed, strict=False), strict=True):
        assert torch.equal(batch["x"], expected["x"]) and torch.equal(batch["y"], expected["y"])

    stamps = _mtimes(uri)
    assert len(stamps) == 7 and all(stamps.values())
    time.sleep(1.1)  # a shard written again would have a later LastModified
    assert prepare(cfg).encoded == 0 and _mtimes(uri) == stamps

    missing = _dit(image_source, "s3://no-such-bucket/data", tiny_vae, endpoint=s3_endpoint)
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/data/manifest.json: bucket s3://no-such-bucket"):
        prepare(missing)


def test_prepare_captions_with_t5(ray_local, image_source, tiny_vae, tiny_t5, tmp_path):
    uri = str(tmp_path / "captions")
    cfg = _cfg("pixart_xl2_256", image_source["captions"], uri, "model.name=PixArt-debug", "model.image_size=32",
               f"data.vae={tiny_vae}", f"data.text_encoder={tiny_t5}", "model.caption_channels=32",
               "model.model_max_length=8", "ray.use_gpu=false", "ray.num_workers=1", "train.global_batch_size=32")
    manifest = prepare(cfg).manifest
    assert manifest.num_samples == 48 and manifest.bad_inputs == 1
    assert manifest.settings["text_dim"] == 32 and manifest.settings["text_len"] == 8
    assert manifest.settings["crop"] == "resize-center"  # PixArt-alpha's transforms, not DiT's ADM crop
    assert manifest.settings["caption_preprocessing"] == "pixart-clean-caption-x2"
    verify_manifest(uri, cfg.model, cfg.data)
    batch = next(iter(LatentStream(uri, batch_size=6, num_workers=0)))
    assert batch["t5"].shape == (6, 1, 8, 32) and batch["t5_mask"].shape == (6, 8)
    assert (batch["t5_mask"].sum(1) >= 3).all()  # at least 2 words and </s>
    wrong = config.load("pixart_xl2_256", ["model.name=PixArt-debug", "model.image_size=32",
                                           f"data.vae={tiny_vae}", f"data.text_encoder={tiny_t5}"])
    with pytest.raises(ManifestError, match=r"T5 width 32 != model.caption_channels=4096.*caption length 8"):
        verify_manifest(uri, wrong.model, wrong.data)


def test_prepare_webdataset_source_and_job_entry_point(ray_local, image_source, tmp_path, capsys):
    from jobs.prepare import main

    folder = image_source["folder"]
    for t in range(2):  # 2 input tars of 5 pixel images with their class
        samples = []
        for i in range(5):
            path = os.path.join(folder, f"class_{(t + i) % 3}", f"img_{i:02d}.png")
            samples.append({"__key__": f"img{t}{i}".encode(), "png": open(path, "rb").read(),
                            "cls": str((t + i) % 3).encode()})
        (tmp_path / f"train-{t:03d}.tar").write_bytes(pack(samples))
    uri = str(tmp_path / "pixels")
    args = ["--config", "debug", f"data.source={tmp_path}/train-{{000..001}}.tar", "data.source_format=webdataset",
            f"data.uri={uri}", "model.num_classes=3"]
    assert main(args) == 0
    assert "10 samples in 2 shards (2 encoded now" in capsys.readouterr().out
    batch = next(iter(LatentStream(uri, batch_size=5, num_workers=0)))
    assert batch["x"].shape == (5, 4, 16, 16) and batch["x"].min() >= -1 and batch["x"].max() <= 1
    assert main([*args[:-1], "model.num_classes=5", f"data.source={tmp_path}/nothing-*.tar"]) == 2
    assert "matches no .tar files" in capsys.readouterr().err


def _class_tars(image_source, tmp_path, labels_per_tar):
    """One input tar per list of labels, each sample a pixel image of the source."""
    folder = image_source["folder"]
    for t, labels in enumerate(labels_per_tar):
        samples = [{"__key__": f"img{t}{i}".encode(), "cls": str(label).encode(),
                    "png": open(os.path.join(folder, f"class_{i % 3}", f"img_{i:02d}.png"), "rb").read()}
                   for i, label in enumerate(labels)]
        (tmp_path / f"in-{t:03d}.tar").write_bytes(pack(samples))


def test_unusable_inputs_leave_the_data_set_incomplete_and_a_bad_input_tar_is_named(ray_local, image_source,
                                                                                  tmp_path, capsys, monkeypatch):
    """Over data.max_bad_fraction unusable inputs (a systematic cause) is exit 2 with examples and an
    incomplete data set; a rerun accepting them completes it without encoding again. An input tar that is
    no tar is one line naming it (not the encoder task's traceback)."""
    from dydit_dist.data import Manifest, pipeline
    from jobs.prepare import main

    _class_tars(image_source, tmp_path, [[0, 1, 2, 0, 1], [2, 0, 1, 7, 2]])  # class 7 of 3: one bad input of 10
    uri = str(tmp_path / "pixels")
    args = ["--config", "debug", f"data.source={tmp_path}/in-{{000..001}}.tar", "data.source_format=webdataset",
            f"data.uri={uri}", "model.num_classes=3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "1 of 10 inputs are unusable (over data.max_bad_fraction=0.01)" in err
    assert "in-001.tar#img13: class 7 outside [0, model.num_classes=3)" in err
    assert not Manifest.read(uri).complete and Manifest.read(uri).num_shards == 2
    assert main([*args, "data.max_bad_fraction=0.2"]) == 0
    assert "9 samples in 2 shards (0 encoded now, 2 already done, 1 unreadable inputs)" in capsys.readouterr().out
    assert Manifest.read(uri).complete

    # A systematic cause (here every label out of range) stops a run early, once it read EARLY_INPUTS
    (tmp_path / "all-bad").mkdir()
    _class_tars(image_source, tmp_path / "all-bad", [[9] * 5] * 3)
    monkeypatch.setattr(pipeline, "EARLY_INPUTS", 5)
    bad_args = [*args, f"data.source={tmp_path}/all-bad/in-{{000..002}}.tar", f"data.uri={tmp_path}/all-bad-out",
                "data.prepare_workers=1"]
    assert main(bad_args) == 2
    assert "5 of the 5 inputs read so far this run are unusable" in capsys.readouterr().err
    assert len(Manifest.read(f"{tmp_path}/all-bad-out").done()) == 1  # stopped after the first shard
    assert main([*bad_args, "data.max_bad_fraction=1"]) == 0  # accepted: not stopped early either

    (tmp_path / "in-002.tar").write_bytes(b"not a tar at all" * 100)
    assert main([*args, f"data.source={tmp_path}/in-{{000..002}}.tar", f"data.uri={tmp_path}/more"]) == 2
    err = capsys.readouterr().err
    assert f"prepare: data.source: the input tar {tmp_path}/in-002.tar is not a readable tar" in err
    assert "Traceback" not in err and "ray::" not in err


def test_a_driver_killed_between_manifest_writes_loses_no_finished_shard(image_source, tiny_vae, tmp_path):
    """Each encoder task leaves a done-marker beside its shard; the next run merges it (no re-encoding)."""
    from dydit_dist.data import Manifest, pipeline

    uri = f"{tmp_path}/latents"
    cfg = _dit(image_source, uri, tiny_vae)
    settings, plan = pipeline.plan(cfg)
    record = pipeline.ShardEncoder(cfg.to_dict(), settings).encode(plan.chunks[1], uri)
    assert not storage.exists(f"{uri}/manifest.json")  # the driver never recorded it
    resumed = Manifest.resume(uri, settings, len(plan.chunks), drop_missing=True)
    assert resumed.done() == {1} and resumed.shards[1]["sha256"] == record["sha256"]
    assert resumed.shards[1]["inputs"] == record["inputs"] and "classes" in resumed.shards[1]


def test_a_chunk_is_encoded_batch_by_batch_to_the_same_shard(image_source, tiny_vae, tmp_path):
    """Images are decoded one encode batch ahead of the encoder (not a whole chunk at once): batches of 3
    give a chunk of 8 the same samples, labels and bad inputs as one batch of 8."""
    from dydit_dist.data import pipeline
    from dydit_dist.shardset import unpack

    records, shards = {}, {}
    for size in (8, 3):
        uri = f"{tmp_path}/latents-{size}"
        cfg = _dit(image_source, uri, tiny_vae, f"data.encode_batch_size={size}", "data.flip=true")
        settings, plan = pipeline.plan(cfg)
        chunk = plan.chunks[0]
        records[size] = pipeline.ShardEncoder(cfg.to_dict(), settings).encode(chunk, uri)
        shards[size] = unpack(storage.read_bytes(shard_url(uri, chunk.index)), uri)
    a, b = records[8], records[3]
    assert (a["count"], a["inputs"], a["bad"], a.get("classes")) == (b["count"], b["inputs"], b["bad"], b.get("classes"))
    assert a["count"] > 3 and [s["__key__"] for s in shards[8]] == [s["__key__"] for s in shards[3]]
    for x, y in zip(shards[8], shards[3], strict=True):
        assert set(x) == set(y) and x.get("cls") == y.get("cls")
        names = [n for n in x if n.endswith(".npy")]
        assert names  # the latents: the same up to the batch's float order
        for name in names:
            np.testing.assert_allclose(np.load(io.BytesIO(x[name])), np.load(io.BytesIO(y[name])), rtol=1e-4, atol=1e-5)


def test_an_input_encoded_to_a_non_finite_latent_is_a_bad_input(image_source, tiny_vae, tmp_path, monkeypatch):
    """A latent that comes out NaN or inf (a float16 overflow) is not written, which the reader would refuse
    with its whole shard: it is listed as an unusable input under its shard and left out of the counts."""
    from dydit_dist.data import encoders, pipeline
    from dydit_dist.shardset import unpack

    encode = encoders.ImageEncoder.__call__

    def overflowing(self, images, indices, flipped=False):
        latents = encode(self, images, indices, flipped)
        latents[1] = np.inf if flipped else latents[1]  # the second image's flipped latent overflows
        return latents

    monkeypatch.setattr(encoders.ImageEncoder, "__call__", overflowing)
    uri = f"{tmp_path}/latents"
    cfg = _dit(image_source, uri, tiny_vae, "data.flip=true")
    settings, plan = pipeline.plan(cfg)
    chunk = plan.chunks[0]
    record = pipeline.ShardEncoder(cfg.to_dict(), settings).encode(chunk, uri)
    nonfinite = [b for b in record["bad"] if "NaN or inf" in b["error"]]
    assert len(nonfinite) == 1 and nonfinite[0]["error"] == ("latent_flip holding NaN or inf after encoding "
                                                             "(data.latent_dtype=float16)")
    samples = unpack(storage.read_bytes(shard_url(uri, chunk.index)), uri)
    assert record["count"] == len(samples) and record["inputs"] == len(samples) + len(record["bad"])
    assert nonfinite[0]["source"] not in [json.loads(s["json"])["source"] for s in samples]
    assert sum(record["classes"].values()) == len(samples)  # the histogram counts what was written
    assert all(np.isfinite(np.load(io.BytesIO(s[name]))).all() for s in samples for name in s if name.endswith(".npy"))



def _stuck_on_a_fifo() -> set[int]:
    """The Ray worker processes waiting to open a FIFO (no writer): the tasks stuck on `_hanging_source`."""
    stuck = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if (open(f"/proc/{pid}/wchan").read() == "wait_for_partner"
                    and b"ray::" in open(f"/proc/{pid}/cmdline", "rb").read()):
                stuck.add(int(pid))
    return stuck


def _gone(pids: set[int], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(os.path.exists(f"/proc/{pid}") for pid in pids)


def _hanging_source(tmp_path):
    """An image folder one of whose images is a FIFO nobody writes: opening it hangs, as a read from a stale
    NFS or FUSE mount does."""
    from conftest import write_images

    root = tmp_path / "src"
    write_images(root)
    fifo = root / "class_1" / "img_99.png"
    os.mkfifo(fifo)
    return root, fifo


def _stall_quickly(monkeypatch):
    from dydit_dist import capacity, faults

    monkeypatch.setattr(faults, "STALL_LOAD_FLOOR_S", 3.0)
    monkeypatch.setattr(capacity, "POLL_S", 0.5)


def _hanging_cfg(root, uri, tiny_vae, max_failures=1):
    return _cfg("debug", str(root), uri, "model.num_classes=3", "model.image_size=32", "model.vae_downsample=8",
                f"data.vae={tiny_vae}", "ray.stall_factor=2", f"ray.max_failures={max_failures}")


def test_a_stuck_encoder_task_is_killed_and_its_shard_encoded_again(ray_local, tiny_vae, tmp_path, monkeypatch):
    """A task stuck on its source (no error, ever) is taken for stalled once it ran far longer than the finished
    ones: its process is killed and the shard is encoded by a new task; nothing is lost or encoded twice."""
    from dydit_dist.data import pipeline

    root, fifo = _hanging_source(tmp_path)
    _stall_quickly(monkeypatch)
    stalled, original = [], pipeline._stalled_task

    def seen(*args):
        stalled.append(_stuck_on_a_fifo())  # the stuck task's process, before it is killed
        if fifo.is_fifo():  # the mount is back: the next try reads an image
            (tmp_path / "img.png").write_bytes((root / "class_1" / "img_00.png").read_bytes())
            os.replace(tmp_path / "img.png", fifo)
        original(*args)

    monkeypatch.setattr(pipeline, "_stalled_task", seen)
    uri = str(tmp_path / "latents")
    # the try after the stuck one may land on a new worker process, which can take longer than the test's 3-s
    # floor to import torch on a loaded machine: taken for stalled too, it is tried again (hence the budget)
    result = prepare(_hanging_cfg(root, uri, tiny_vae, max_failures=4))
    assert 1 <= len(stalled) <= 4 and stalled[0], "the stuck task was not taken for stalled, or not stuck on the FIFO"
    assert _gone(stalled[0]), "the stuck task's process was not killed"
    assert result.manifest.complete and result.manifest.num_samples == 49 and result.manifest.bad_inputs == 0
    assert result.encoded == 7 and len([u for u in storage.find(uri) if u.endswith(".tar")]) == 7


def test_a_task_that_stalls_past_ray_max_failures_ends_the_job_naming_its_shard(ray_local, tiny_vae, tmp_path,
                                                                                monkeypatch):
    from dydit_dist.config_files import JobFailed
    from dydit_dist.data import Manifest

    root, _ = _hanging_source(tmp_path)
    _stall_quickly(monkeypatch)
    uri = str(tmp_path / "latents")
    with pytest.raises(JobFailed, match=r"the encoder task of shard (\d+) \(8 inputs from .*\): a shard stalled: "
                                        r"running for \d+ s.*that is 2 stalled tasks this run \(ray.max_failures=1\)"
                       ) as failed:
        prepare(_hanging_cfg(root, uri, tiny_vae))
    stuck = int(re.search(r"shard (\d+)", str(failed.value)).group(1))
    done = Manifest.read(uri).done()
    assert done and stuck not in done  # what finished is recorded, and the stuck shard was never written
    stored = sorted(u.rsplit("/", 1)[1] for u in storage.find(uri) if u.endswith(".tar"))
    assert stored == sorted(shard_url(uri, i).rsplit("/", 1)[1] for i in done)
    assert _gone(_stuck_on_a_fifo()), "a process is left hanging on the source"
