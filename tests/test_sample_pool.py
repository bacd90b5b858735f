"""The sampling fan-out on a local Ray instance: exactly N samples, on S3, through actor deaths and reruns."""

from __future__ import annotations

import json

import pytest
import torch
from actor_faults import SamplingWorkerWithoutGpu, lost_gpu_at_start, swapped_actor
from sampling_util import random_checkpoint, tiny_config

from dydit_dist import config, storage
from dydit_dist.sample import SamplesError, SamplesManifest, iter_samples, pool, run_sampling
from dydit_dist.sample.plan import class_label

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "static.safetensors"))


def _samples(url):
    return {s.index: s for s in iter_samples(url)}


def test_two_actors_on_s3_make_exactly_n_and_a_rerun_does_nothing(ray_local, s3_bucket, s3_endpoint, checkpoint):
    cfg = tiny_config(s3_bucket, f"storage.endpoint_url={s3_endpoint}", f"model.checkpoint={checkpoint}",
                      "sample.num_actors=2")
    url = f"{s3_bucket}/runs/t/samples"
    manifest = run_sampling(cfg)
    assert manifest.complete and manifest.num_samples == 16 and manifest.stats["actors"] == 2
    assert len({r["actor"] for r in manifest.shards.values()}) == 2  # both actors worked
    samples = _samples(url)
    assert sorted(samples) == list(range(16))  # no gaps; iter_samples refuses duplicates and disorder
    assert [s.meta["class"] for s in samples.values()] == [class_label(k, 10, "random", 0) for k in range(16)]
    shard_names = sorted(u.rsplit("/", 1)[-1] for u in storage.listdir(url) if u.endswith(".tar"))
    assert shard_names == [f"shard-{i:06d}.tar" for i in range(4)]
    # A rerun starts no actor and writes no shard.
    before = {u: storage.filesystem(u)[0].info(storage.filesystem(u)[1])["ETag"] for u in storage.listdir(url)
              if u.endswith(".tar")}
    calls = []
    again = run_sampling(cfg, on_shard=lambda pool, record: calls.append(record))
    assert calls == [] and again.num_samples == 16 and "wall_s" in again.stats
    after = {u: storage.filesystem(u)[0].info(storage.filesystem(u)[1])["ETag"] for u in before}
    assert after == before
    # Each shard records its GFLOPs; the stats hold their mean over all samples. A driver that died after
    # the last done-marker, before its last manifest write (the manifest as written at the start): the
    # rerun merges the markers and loses none of the GFLOPs, still starting no actor.
    assert all(r["gflops"] > 0 for r in manifest.records()) and manifest.stats["gflops"] == manifest.gflops()
    stale = SamplesManifest.read(url)
    stale.shards, stale.stats = {}, {"model_load_s": stale.stats["model_load_s"]}
    stale.write(url)
    healed = run_sampling(cfg, on_shard=lambda pool, record: calls.append(record))
    assert calls == [] and healed.complete and healed.stats["gflops"] == manifest.stats["gflops"]
    assert "width_by_timestep" not in healed.stats  # a static DiT has none (DyDiT: test_sample_generate)
    assert SamplesManifest.read(url).stats["gflops"] == manifest.stats["gflops"]


def test_killed_actor_still_gives_exactly_n_identical_to_one_actor(ray_local, tmp_path, checkpoint):
    import ray

    torch.set_num_threads(1)
    # 8 shards, 4 in flight: when the first is done, the killed actor still has work queued.
    small = ["sample.shard_size=2", "sample.batch_size=2", f"model.checkpoint={checkpoint}"]
    two = tiny_config(str(tmp_path / "two"), *small, "sample.num_actors=2")
    killed = []

    def kill_first_actor(pool, record):
        if not killed:
            killed.append(pool.actors[0])
            ray.kill(pool.actors[0])  # it holds queued shards: they must be made by another actor

    manifest = run_sampling(two, on_shard=kill_first_actor)
    assert killed and manifest.stats["actor_failures"] == 1
    assert manifest.complete and manifest.num_samples == 16
    made_by_two = _samples(str(tmp_path / "two" / "runs/t/samples"))
    assert sorted(made_by_two) == list(range(16))

    one = tiny_config(str(tmp_path / "one"), *small, "sample.num_actors=1")
    run_sampling(one)
    made_by_one = _samples(str(tmp_path / "one" / "runs/t/samples"))
    for k in range(16):
        assert (made_by_one[k].image == made_by_two[k].image).all(), f"sample {k} differs"
        assert made_by_one[k].meta == made_by_two[k].meta
    assert SamplesManifest.read(str(tmp_path / "one" / "runs/t/samples")).stats["actors"] == 1


def test_a_checkpoint_that_does_not_load_in_the_actors_is_its_own_error(ray_local, tmp_path, checkpoint):
    """A checkpoint that went bad after the driver's checks (run_sampling skips the preflight): the
    actors' own CheckpointError, naming the file, not 'the actor died'; no manifest, no shard."""
    from dydit_dist.models import CheckpointError, DiT
    from dydit_dist.network import save_weights

    other = str(tmp_path / "two-blocks.safetensors")
    save_weights(DiT(input_size=8, num_classes=10, depth=2, hidden_size=64, patch_size=2, num_heads=4), other)
    cfg = tiny_config(f"file://{tmp_path}", f"model.checkpoint={other}", "sample.num_actors=2")
    with pytest.raises(CheckpointError, match="two-blocks.safetensors does not fit"):
        run_sampling(cfg)
    assert not storage.find(f"file://{tmp_path}/runs/t/samples")



def test_an_actor_that_dies_starting_is_replaced_within_max_failures(ray_local, tmp_path, checkpoint, monkeypatch):
    """An actor dying in its start (its host's GPU unusable, a lost node) is a lost worker, not a failed job:
    another starts in its place and the run makes exactly its samples; with no failure allowed, one line
    naming the cause and nothing written."""
    flag = tmp_path / "failed-once"
    cfg = tiny_config(str(tmp_path / "flaky"), f"model.checkpoint={checkpoint}", "sample.num_actors=2")
    with lost_gpu_at_start(monkeypatch, pool, "SamplingWorker", SamplingWorkerWithoutGpu, str(flag)):
        manifest = run_sampling(cfg)
    assert flag.exists()
    assert manifest.stats["actor_failures"] == 1 and manifest.stats["actors"] == 2
    assert manifest.complete and sorted(_samples(str(tmp_path / "flaky" / "runs/t/samples"))) == list(range(16))

    flag.unlink()
    strict = tiny_config(str(tmp_path / "strict"), f"model.checkpoint={checkpoint}", "sample.num_actors=2",
                         "ray.max_failures=0")
    with (lost_gpu_at_start(monkeypatch, pool, "SamplingWorker", SamplingWorkerWithoutGpu, str(flag)),
          pytest.raises(RuntimeError, match=r"sampling actors could not start \(1 failures > ray.max_failures=0\), "
                                            r"the last with dydit_dist.capacity.GpuUnavailable: sampling actor on "
                                            r"host-a is configured for a GPU but torch sees none$")):
        run_sampling(strict)
    assert not storage.find(str(tmp_path / "strict" / "runs/t/samples"))  # a failed start writes no manifest


def test_a_device_fault_replaces_the_actor_and_out_of_memory_stops_the_job(ray_local, tmp_path, checkpoint,
                                                                            monkeypatch):
    """A CUDA error in one actor's batch (an illegal access, an Xid surfacing as one) leaves its process's
    device unusable: that actor ends and is replaced, and the job makes exactly its samples. Out of GPU memory
    is met again by any actor on the same shard: one line naming sample.batch_size, finished shards kept."""
    import actor_faults

    flag = tmp_path / "faulted-once"
    cfg = tiny_config(str(tmp_path / "fault"), f"model.checkpoint={checkpoint}", "sample.num_actors=2")
    monkeypatch.setattr(actor_faults, "FLAG", str(flag))
    monkeypatch.setattr(actor_faults.SamplingWorkerWithDeviceError, "ERROR", "fault")
    with swapped_actor(monkeypatch, pool, "SamplingWorker", actor_faults.SamplingWorkerWithDeviceError):
        manifest = run_sampling(cfg)
    assert flag.exists() and manifest.stats["actor_failures"] == 1
    assert manifest.complete and sorted(_samples(str(tmp_path / "fault" / "runs/t/samples"))) == list(range(16))

    monkeypatch.setattr(actor_faults.SamplingWorkerWithDeviceError, "ERROR", "oom")
    cfg = tiny_config(str(tmp_path / "oom"), f"model.checkpoint={checkpoint}", "sample.num_actors=1")
    with (swapped_actor(monkeypatch, pool, "SamplingWorker", actor_faults.SamplingWorkerWithDeviceError),
          pytest.raises(SamplesError, match=r"^sampling actor on shard 1 ran out of GPU memory \(CUDA out of memory. "
                                            r"Tried to allocate 20.00 GiB.*\): sample.batch_size=\d+ does not fit; "
                                            r"lower it \(a sampling setting")):
        run_sampling(cfg)
    assert SamplesManifest.read(str(tmp_path / "oom" / "runs/t/samples")).done() == {0}  # kept: a rerun resumes


def test_a_stuck_actor_is_replaced_and_its_shard_made_again(ray_local, tmp_path, checkpoint, monkeypatch):
    """An actor alive but stuck in a unit (a hung kernel) with no speculative copy to cover it: once its call
    runs ray.stall_factor x the median finished call, it is killed and replaced and its unit made again."""
    import actor_faults

    from dydit_dist import capacity, faults

    monkeypatch.setattr(capacity, "POLL_S", 0.2)
    monkeypatch.setattr(faults, "STALL_FLOOR_S", 1.0)
    monkeypatch.setattr(actor_faults, "FLAG", str(tmp_path / "stuck-once"))
    cfg = tiny_config(str(tmp_path), f"model.checkpoint={checkpoint}", "sample.num_actors=2", "sample.speculate=false",
                      "ray.stall_factor=3")
    with swapped_actor(monkeypatch, pool, "SamplingWorker", actor_faults.SamplingWorkerStuckOnce):
        manifest = run_sampling(cfg)
    assert (tmp_path / "stuck-once").exists() and manifest.stats["actor_failures"] == 1
    assert manifest.complete and sorted(_samples(str(tmp_path / "runs/t/samples"))) == list(range(16))


def test_an_input_rewritten_under_the_job_stops_it_instead_of_mixing_two_settings(ray_local, tmp_path, checkpoint,
                                                                                   monkeypatch):
    """An EB-Cache table rewritten at its URL (a calibration run again) after the driver read it: the actors
    load the new schedule, their records carry another settings digest, and the job stops naming the shard
    instead of completing a folder of two schedules. A rerun is then refused by the markers; the table's
    bytes are part of the settings, so a fresh folder's settings differ from the first table's."""
    from dydit_dist.accel.options import TABLE_FORMAT
    from dydit_dist.sample import SamplesError
    from dydit_dist.shardset import settings_digest

    table = tmp_path / "table.json"
    table.write_text(json.dumps({"format": TABLE_FORMAT, "schedule": "0101"}))
    cfg = tiny_config(str(tmp_path / "mixed"), f"model.checkpoint={checkpoint}", "sample.num_actors=2",
                      "sample.method=eb_cache", f"sample.eb_cache.schedule={table}")
    first = pool.sampling_settings(cfg)
    assert first["method_options"]["schedule_steps"] == "0101"
    table.write_text(json.dumps({"format": TABLE_FORMAT, "schedule": "0101", "errors": [0.01]}))
    assert pool.sampling_settings(cfg) == first  # the same schedule: the same samples
    start = pool.SamplingPool.__init__

    def rewritten_first(self, *args, **kwargs):  # after the driver's settings, before the actors load
        table.write_text(json.dumps({"format": TABLE_FORMAT, "schedule": "0111"}))
        start(self, *args, **kwargs)

    monkeypatch.setattr(pool.SamplingPool, "__init__", rewritten_first)
    with pytest.raises(SamplesError, match=r"shard-0000\d\d.tar was made with other settings than this job's: "
                                           r"sample.prompts or an EB-Cache table was rewritten while it ran"):
        run_sampling(cfg)
    assert settings_digest(pool.sampling_settings(cfg)) != settings_digest(first)


def test_fora_settings_record_the_schedule_they_sample_with(tmp_path):
    """The schedule is derived from the interval; recording it makes a folder sampled under the earlier
    derivation (full steps counted from the first step) other settings than one of today's."""
    cfg = tiny_config(str(tmp_path), "sample.method=fora", "sample.fora.interval=3", "sample.steps=5")
    assert pool.sampling_settings(cfg)["method_options"] == {"interval": 3, "schedule_steps": "00220"}


def test_text_to_image_settings_record_how_captions_reach_t5(tmp_path):
    """Cleaned as PixArt's T5 embedder cleans them, encoded by an fp32 T5 (the official inference): a
    folder sampled before either is other settings."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    cfg = config.load("pixart_xl2_256", [f"storage.root={tmp_path}", "model.name=PixArt-debug",
                                         f"sample.prompts={prompts}"])
    text = pool.sampling_settings(cfg)["text"]
    assert text["caption_preprocessing"] == "pixart-clean-caption-x2" and text["text_encoder_dtype"] == "fp32"
