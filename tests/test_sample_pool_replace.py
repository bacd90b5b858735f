"""Replacing a sampling actor: the old one is killed even if it is still alive, and a replacement that
cannot load its inputs stops the job with that input error."""

from __future__ import annotations

import shutil

import pytest
from actor_faults import SamplingWorkerWithBadConfig, dies_soon, swapped_actor
from sampling_util import random_checkpoint, tiny_config

from dydit_dist import storage
from dydit_dist.config import ConfigError
from dydit_dist.models import CheckpointError, DiT
from dydit_dist.network import save_weights
from dydit_dist.sample import pool, run_sampling

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "static.safetensors"))


def test_a_replaced_actor_is_killed_even_if_it_is_alive(ray_local, tmp_path, checkpoint):
    """Ray also reports an actor that is only unavailable for the moment as lost (`ActorUnavailableError`
    is a `RayActorError`): once replaced, it must not go on writing or holding its device."""
    from ray.exceptions import RayActorError

    cfg = pool.absolute_root(tiny_config(str(tmp_path), f"model.checkpoint={checkpoint}"))
    sampling = pool.SamplingPool(cfg, str(tmp_path / "samples"), num_todo=1)
    try:
        old = sampling.actors[0]
        sampling.replace(old, RayActorError())
        assert dies_soon(old)
        new = sampling.actors[0]
        assert new != old and sampling.failures == 1
        ray_local.kill(new)
        sampling.replace(new, RayActorError())  # killing an actor that is already dead is harmless
        assert sampling.failures == 2 and len(sampling.actors) == 1
    finally:
        sampling.shutdown()


def test_a_replacement_that_cannot_load_the_checkpoint_stops_the_job(ray_local, tmp_path, checkpoint):
    """The checkpoint goes bad while the job runs and the only actor dies: its replacement's CheckpointError,
    naming the file, stops the job (exit 2), not an AttributeError from an actor with no generator."""
    ckpt = str(tmp_path / "static.safetensors")
    shutil.copy(checkpoint, ckpt)
    cfg = tiny_config(str(tmp_path / "run"), f"model.checkpoint={ckpt}", "sample.num_actors=1")

    def break_checkpoint_and_kill(sampling, record):
        if sampling.failures == 0:
            save_weights(DiT(input_size=8, num_classes=10, depth=2, hidden_size=64, patch_size=2, num_heads=4), ckpt)
            ray_local.kill(sampling.actors[0])

    with pytest.raises(CheckpointError, match="static.safetensors does not fit"):
        run_sampling(cfg, on_shard=break_checkpoint_and_kill)


def test_a_config_the_actors_refuse_is_an_input_error(ray_local, tmp_path, checkpoint, monkeypatch):
    """A config that the actors' copy of the package refuses is the ConfigError itself (exit 2), not actors
    that died starting, replaced ray.max_failures times; no manifest is written."""
    cfg = tiny_config(str(tmp_path / "run"), f"model.checkpoint={checkpoint}", "sample.num_actors=2")
    with (swapped_actor(monkeypatch, pool, "SamplingWorker", SamplingWorkerWithBadConfig),
          pytest.raises(ConfigError, match="unknown config key 'sample.colour'")):
        run_sampling(cfg)
    assert not storage.find(str(tmp_path / "run" / "runs/t/samples"))


def test_actors_started_before_a_failed_start_are_stopped(monkeypatch):
    """A CapacityError while the others load (one actor's room taken by other work) left the actors started
    so far alive, holding their GPUs, in a process that goes on (a notebook, a test, a reproduce)."""
    from dydit_dist.capacity import ActorPool, CapacityError

    killed = []

    class Actor:
        class ready:  # noqa: N801 - as a Ray actor method has .remote()
            @staticmethod
            def remote():
                return object()

    def fake_init(self, *args, **kwargs):
        self.actors = [Actor(), Actor()]

    def no_room(self, refs):
        raise CapacityError("a sampling actor found no room within ray.capacity_timeout_s=1 s")

    monkeypatch.setattr(ActorPool, "__init__", fake_init)
    monkeypatch.setattr(pool.SamplingPool, "wait", no_room)
    monkeypatch.setattr(ActorPool, "shutdown", lambda self: killed.extend(self.actors))
    with pytest.raises(CapacityError, match="found no room"):
        pool.SamplingPool(tiny_config("/tmp/unused"), "/tmp/unused", 2)
    assert len(killed) == 2
