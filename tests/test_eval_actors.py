"""Evaluation on Ray actors (eval.num_actors): the metrics of features computed shard by shard in actors
are exactly those of the in-process pass (eval.num_actors=0); the decode thread hands its errors on."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from actor_faults import FeatureWorkerWithoutGpu, dies_soon, lost_gpu_at_start
from sampling_util import random_checkpoint, tiny_config, write_samples

from dydit_dist.capacity import ActorPool, Need
from dydit_dist.eval import actors as eval_actors
from dydit_dist.eval.actors import prefetched
from dydit_dist.eval.digits import DigitsNet
from dydit_dist.eval.evaluate import evaluate
from dydit_dist.network import save_weights


def test_actor_metrics_equal_the_in_process_metrics(tmp_path, ray_local):
    save_weights(DigitsNet(), str(tmp_path / "digits.safetensors"))
    root = f"file://{tmp_path}"
    # 16 samples in 4 shards of 4, batches of 3: batches end inside and at the end of every shard.
    overrides = [f"model.checkpoint={random_checkpoint(str(tmp_path / 'static.safetensors'))}",
                 "eval.feature_extractor=digits-cnn", f"eval.feature_extractor_weights={tmp_path / 'digits.safetensors'}",
                 f"eval.fidelity_cache={tmp_path / 'fc'}", "eval.metrics=[fid,sfid,isc,prc]", "eval.isc_splits=2",
                 "eval.batch_size=3", "ray.cpus_per_worker=0.5", f"eval.reference={root}/runs/ref/samples"]
    torch.set_num_threads(1)
    write_samples(tiny_config(root, *overrides), f"{root}/runs/t/samples")
    write_samples(tiny_config(root, *overrides, "sample.seed=5"), f"{root}/runs/ref/samples")
    local = evaluate(tiny_config(root, *overrides, "eval.num_actors=0"), out=str(tmp_path / "local.json"))
    actors = evaluate(tiny_config(root, *overrides, "eval.num_actors=2"), out=str(tmp_path / "actors.json"))
    assert set(local["metrics"]) == {"fid", "sfid", "isc_mean", "isc_std", "precision", "recall", "f_score"}
    assert actors["metrics"] == local["metrics"]  # bit for bit
    assert local["metrics"]["fid"] > 0 and local["metrics"]["sfid"] > 0


def test_a_killed_actor_is_replaced_and_its_shards_made_again(tmp_path, ray_local, caplog):
    """An evaluation actor lost after the first shard came back: its queued shards go to a replacement and
    every shard's features equal the in-process pass's."""
    from dydit_dist.eval.actors import _on_actors, make_pass
    from dydit_dist.sample import SamplesManifest

    save_weights(DigitsNet(), str(tmp_path / "digits.safetensors"))
    root = f"file://{tmp_path}"
    overrides = [f"model.checkpoint={random_checkpoint(str(tmp_path / 'static.safetensors'))}",
                 "eval.feature_extractor=digits-cnn", f"eval.feature_extractor_weights={tmp_path / 'digits.safetensors'}",
                 "eval.metrics=[fid,sfid]", "eval.batch_size=3", "ray.cpus_per_worker=0.5", "eval.num_actors=2"]
    torch.set_num_threads(1)
    cfg = tiny_config(root, *overrides)
    url = f"{root}/runs/t/samples"
    write_samples(cfg, url)
    records = SamplesManifest.read(url).records()
    killed = []

    def kill_one(actors):
        if not killed:
            killed.append(actors[0])
            ray_local.kill(actors[0])  # it still has a shard queued: that one must come from the replacement

    with caplog.at_level(logging.INFO, logger="dydit_dist.eval.actors"):
        parts = _on_actors(cfg, url, records, lambda record: None, on_part=kill_one)
    local = make_pass(cfg, "cpu")
    assert killed and len(parts) == len(records) == 4
    assert "evaluation actor lost (" in caplog.text and "(1 replaced)" in caplog.text
    for part, record in zip(parts, records, strict=True):
        expected = local(url, record, None)
        assert part.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(part[name], expected[name], rtol=0, atol=0)


def test_an_actor_that_dies_starting_is_replaced(tmp_path, ray_local, monkeypatch):
    """An actor dying in its start (its host's GPU unusable, a lost node) is replaced like one lost later;
    when every start fails, the error names the cause once the failure budget is spent."""
    from dydit_dist.sample import SamplesManifest

    save_weights(DigitsNet(), str(tmp_path / "digits.safetensors"))
    root = f"file://{tmp_path}"
    cfg = tiny_config(root, f"model.checkpoint={random_checkpoint(str(tmp_path / 'static.safetensors'))}",
                      "eval.feature_extractor=digits-cnn", "eval.metrics=[fid]", "ray.cpus_per_worker=0.5",
                      f"eval.feature_extractor_weights={tmp_path / 'digits.safetensors'}", "eval.num_actors=2",
                      "ray.max_failures=1")
    torch.set_num_threads(1)
    url = f"{root}/runs/t/samples"
    write_samples(cfg, url)
    records = SamplesManifest.read(url).records()
    flag = tmp_path / "failed-once"
    with lost_gpu_at_start(monkeypatch, eval_actors, "FeatureWorker", FeatureWorkerWithoutGpu, str(flag)):
        parts = eval_actors._on_actors(cfg, url, records, lambda record: None)
    assert len(parts) == len(records) == 4 and flag.exists()
    with (lost_gpu_at_start(monkeypatch, eval_actors, "FeatureWorker", FeatureWorkerWithoutGpu),
          pytest.raises(RuntimeError, match=r"every evaluation actor died \(3 failures > ray.max_failures=1\), the "
                                            r"last with dydit_dist.capacity.GpuUnavailable: evaluation actor on "
                                            r"host-a is configured for a GPU but torch sees none$")):
        eval_actors._on_actors(cfg, url, records, lambda record: None)


def _digits_config(tmp_path, *overrides: str):
    save_weights(DigitsNet(), str(tmp_path / "digits.safetensors"))
    return tiny_config(f"file://{tmp_path}", f"model.checkpoint={random_checkpoint(str(tmp_path / 'static.safetensors'))}",
                       "eval.feature_extractor=digits-cnn", "eval.metrics=[fid]", "ray.cpus_per_worker=0.5",
                       f"eval.feature_extractor_weights={tmp_path / 'digits.safetensors'}", *overrides)


def test_a_replaced_actor_is_killed_even_if_it_is_alive(tmp_path, ray_local):
    """Ray also reports an actor that is only unavailable for the moment as lost (`ActorUnavailableError` is a
    `RayActorError`): once replaced it must not go on holding its GPU; killing a dead one is harmless."""
    from ray.exceptions import RayActorError

    cfg = _digits_config(tmp_path, "ray.max_failures=1")
    need = Need("evaluation actors", 1, cfg.ray.cpus_per_worker)
    pool = ActorPool(eval_actors.FeatureWorker, (cfg.to_dict(), False), need, False, 60.0, 1, "evaluation actor")
    try:
        old = pool.actors[0]
        assert ray_local.get(old.__ray_ready__.remote())
        pool.replace(old, RayActorError())
        assert dies_soon(old)
        new = pool.actors[0]
        assert new != old and pool.failures == 1
        ray_local.kill(new)
        with pytest.raises(RuntimeError, match=r"every evaluation actor died \(2 failures > ray.max_failures=1\)"):
            pool.replace(new, RayActorError())
        assert pool.actors == []
    finally:
        pool.shutdown()


def test_a_live_actor_reported_lost_has_its_shards_made_again_once(tmp_path, ray_local, monkeypatch, caplog):
    """An actor whose call fails with ActorUnavailableError while it lives: both shards it held (the failed
    one and the one queued behind it) go back to the queue once, and every shard equals the in-process pass's."""
    from ray.exceptions import ActorUnavailableError

    from dydit_dist.sample import SamplesManifest

    cfg = _digits_config(tmp_path, "eval.num_actors=2", "eval.batch_size=3")
    torch.set_num_threads(1)
    url = f"file://{tmp_path}/runs/t/samples"
    write_samples(cfg, url)
    records = SamplesManifest.read(url).records()
    flag = str(tmp_path / "unavailable-once")

    class UnavailableOnce(eval_actors.FeatureWorker):  # local: Ray ships it by value
        def features(self, *args):
            try:
                os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return super().features(*args)
            raise ActorUnavailableError("the actor is unreachable for a while", None)

    monkeypatch.setattr(eval_actors, "FeatureWorker", UnavailableOnce)
    with caplog.at_level(logging.INFO, logger="dydit_dist.eval.actors"):
        parts = eval_actors._on_actors(cfg, url, records, lambda record: None)
    assert caplog.text.count("evaluation actor lost (") == 1 and "2 shards go back to the queue" in caplog.text
    assert "(1 replaced)" in caplog.text
    local = eval_actors.make_pass(cfg, "cpu")
    assert len(parts) == len(records) == 4
    for part, record in zip(parts, records, strict=True):
        torch.testing.assert_close(part["64"], local(url, record, None)["64"], rtol=0, atol=0)


def test_a_stuck_evaluation_actor_is_replaced(tmp_path, ray_local, monkeypatch, caplog):
    """An evaluation actor alive but stuck on a shard: once its call runs ray.stall_factor x the median
    finished call, it is replaced and its shards made again; the features equal the in-process pass's."""
    import actor_faults
    from actor_faults import FeatureWorkerStuckOnce, swapped_actor

    from dydit_dist import capacity, faults
    from dydit_dist.sample import SamplesManifest

    cfg = _digits_config(tmp_path, "eval.num_actors=2", "eval.batch_size=3", "ray.stall_factor=3")
    torch.set_num_threads(1)
    url = f"file://{tmp_path}/runs/t/samples"
    write_samples(cfg, url)
    records = SamplesManifest.read(url).records()
    monkeypatch.setattr(capacity, "POLL_S", 0.2)
    monkeypatch.setattr(faults, "STALL_FLOOR_S", 1.0)
    monkeypatch.setattr(actor_faults, "FLAG", str(tmp_path / "stuck-once"))
    monkeypatch.setattr(actor_faults, "STUCK_ON", records[-1]["start"])
    with (swapped_actor(monkeypatch, eval_actors, "FeatureWorker", FeatureWorkerStuckOnce),
          caplog.at_level(logging.INFO, logger="dydit_dist.eval.actors")):
        parts = eval_actors._on_actors(cfg, url, records, lambda record: None)
    assert "a call stalled: running for" in caplog.text and "(1 replaced)" in caplog.text
    local = eval_actors.make_pass(cfg, "cpu")
    for part, record in zip(parts, records, strict=True):
        torch.testing.assert_close(part["64"], local(url, record, None)["64"], rtol=0, atol=0)


def test_eval_actors_need_a_gpu_when_configured_for_one(tmp_path, ray_local):
    """ray.use_gpu=true on a cluster without GPUs: the capacity wait fails naming the resource."""
    from dydit_dist.capacity import CapacityError
    from dydit_dist.eval.actors import sample_features

    cfg = tiny_config(f"file://{tmp_path}", "ray.use_gpu=true", "ray.capacity_timeout_s=1", "eval.num_actors=2")
    with pytest.raises(CapacityError, match="evaluation actors"):
        sample_features(cfg, "unused", [{"start": 0, "count": 4, "name": "x"}], None, None)


def test_prefetch_keeps_order_and_raises_the_producers_error():
    assert list(prefetched(iter(range(10)), depth=2)) == list(range(10))

    def broken():
        yield 1
        raise ValueError("corrupt shard")

    got = []
    with pytest.raises(ValueError, match="corrupt shard"):
        for item in prefetched(broken()):
            got.append(item)
    assert got == [1]


def test_an_evaluation_actor_out_of_gpu_memory_names_the_batch_size():
    """Out of GPU memory on a shard's features: the next actor would meet it too, so the job stops with one line
    naming eval.batch_size (an input error); other errors pass through as they are."""
    from dydit_dist.eval.metrics import EvalInputError

    worker = eval_actors.FeatureWorker.__new__(eval_actors.FeatureWorker)  # its pass replaced: no model needed
    worker.batch_size = 256

    def out_of_memory(url, record, captions):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB.")

    worker.run = out_of_memory
    with pytest.raises(EvalInputError, match=r"^evaluation actor on shard-000002.tar ran out of GPU memory \(CUDA out "
                                             r"of memory. Tried to allocate 3.00 GiB.\): eval.batch_size=256 does not "
                                             r"fit; lower it"):
        worker.features("s3://b/samples", {"name": "shard-000002.tar"}, None)
    worker.run = lambda *args: (_ for _ in ()).throw(KeyError("png"))
    with pytest.raises(KeyError, match="png"):
        worker.features("s3://b/samples", {"name": "shard-000002.tar"}, None)
