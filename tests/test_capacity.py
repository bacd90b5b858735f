"""Jobs sized from the config wait for that capacity, say what they wait for, and fail naming the
resource when it does not come; a GPU job never falls back to CPU (`dydit_dist.capacity`)."""

from __future__ import annotations

import logging
import os
import time

import pytest
import torch
from sampling_util import tiny_config

from dydit_dist import config as config_lib
from dydit_dist import faults, storage
from dydit_dist.capacity import CapacityError, GpuUnavailable, Need, check_gpu
from dydit_dist.paths import RunPaths

GPU_WORKERS = ["ray.num_workers=4", "ray.use_gpu=true", "ray.gpus_per_worker=1", "ray.cpus_per_worker=0.5",
               "train.global_batch_size=16", "ray.capacity_timeout_s=3"]


def test_need_names_its_keys_and_totals():
    need = Need("training workers", 4, cpus=2, gpus=1, keys="ray.num_workers")
    assert need.bundle() == {"CPU": 2, "GPU": 1}
    assert need.describe() == "4 training workers x 2 CPU + 1 GPU (ray.num_workers) = 8 CPUs, 4 GPUs"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_gpu_configured_process_without_a_gpu_is_a_fault_of_its_host():
    """An error naming the process and host, of a kind that is retried like a lost worker: not an input
    error (ConfigError), which would end a multi-day run at once (`train.worker.NOT_RETRIED`)."""
    from dydit_dist.train.worker import NOT_RETRIED

    with pytest.raises(GpuUnavailable, match=r"sampling actor on .* is configured for a GPU \(ray.use_gpu=true\) "
                                             r"but torch sees none") as err:
        check_gpu("sampling actor")
    assert not isinstance(err.value, NOT_RETRIED) and not isinstance(err.value, config_lib.ConfigError)


def test_a_gpu_that_is_there_but_unusable_is_found_by_the_check(monkeypatch):
    """A GPU torch lists but cannot run a kernel on (exclusive mode and busy, a fallen driver): found when the
    actor starts (retried as a host fault), not at its first batch."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def busy(*args, **kwargs):
        raise RuntimeError("CUDA error: CUDA-capable device(s) is/are busy or unavailable\nCUDA kernel errors ...")

    monkeypatch.setattr(torch, "ones", busy)
    with pytest.raises(GpuUnavailable, match=r"sampling actor on .* cannot use cuda:0 \(RuntimeError: CUDA error: "
                                             r"CUDA-capable device\(s\) is/are busy or unavailable\)$"):
        check_gpu("sampling actor")


def test_device_errors_are_out_of_memory_or_a_fault():
    """Out of memory: the same work meets it again, so the job stops naming the keys that size it; a CUDA
    error: the process's context is gone, so the process ends and its pool replaces it."""
    from dydit_dist.faults import device_failure, on_device_error

    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity "
                                      "of 79.10 GiB\nmore")
    illegal = getattr(torch, "AcceleratorError", RuntimeError)("CUDA error: an illegal memory access was encountered")
    assert device_failure(oom) == "oom" and device_failure(illegal) == "fault"
    assert device_failure(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx")) == "fault"
    assert device_failure(RuntimeError("shape mismatch")) is None and device_failure(ValueError("CUDA error")) is None
    # allocation failures outside torch's caching allocator are out of memory too, not a broken device
    assert device_failure(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ...")) == "oom"
    assert device_failure(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)")) == "oom"

    class Wrapped(Exception):  # as Ray's RayTaskError carries a remote error
        cause = oom

    assert device_failure(Wrapped()) == "oom"
    with pytest.raises(ValueError, match=r"^sampling actor on shard 3 ran out of GPU memory \(CUDA out of memory. "
                                         r"Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.10 GiB\): "
                                         r"sample.batch_size=64 does not fit$"):
        on_device_error(oom, "sampling actor on shard 3", "sample.batch_size=64 does not fit", ValueError)
    ended = []

    def exit_(code):
        ended.append(code)
        raise SystemExit(code)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(faults.os, "_exit", exit_)
        with pytest.raises(SystemExit):
            on_device_error(illegal, "sampling actor on shard 3", "", ValueError)
        on_device_error(RuntimeError("shape mismatch"), "sampling actor on shard 3", "", ValueError)  # returns
    assert ended == [70]


def test_a_stalled_call_is_timed_from_when_its_actor_is_ready(monkeypatch):
    """The limit is stall_factor x the median of the finished calls (at least the floor), once 3 finished; an
    actor still being placed or loading its model has not begun its call; failed calls do not count."""
    clock = [0.0]
    monkeypatch.setattr(faults.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(faults, "STALL_FLOOR_S", 5.0)
    watch = faults.StallWatch(factor=3)
    for ref in ("a", "b", "c", "quick-failure"):
        watch.start(ref, "actor-1")
    clock[0] = 4.0
    for ref in ("a", "b", "c"):
        watch.finish(ref)  # 4 s each: the limit is max(3 x 4, 5) = 12 s
    watch.forget("quick-failure")
    watch.start("stuck", "actor-1")
    watch.start("loading", "actor-2")
    clock[0] = 15.0
    assert watch.stalled(starting={"actor-2"}) is None  # 11 s: not yet; actor-2's clock restarts at 15
    clock[0] = 16.5
    stalled = watch.stalled(starting=set())
    assert stalled.ref == "stuck" and "running for 12 s, more than 12 s" in str(stalled)
    watch.forget("stuck")
    clock[0] = 27.5
    assert watch.stalled().ref == "loading"  # 12.5 s after its actor was ready: past the limit
    assert faults.StallWatch(factor=0).stalled() is None


@pytest.mark.integration
def test_four_gpu_workers_on_a_cluster_without_gpus_wait_then_fail(ray_local, tmp_path, caplog):
    from jobs import finetune

    cfg = config_lib.load("debug", [f"storage.root=file://{tmp_path}", "storage.run=gpu", *GPU_WORKERS])
    caplog.set_level(logging.INFO, logger="dydit_dist.capacity")
    start = time.monotonic()
    with pytest.raises(CapacityError) as err:
        finetune.fit(cfg)
    waited = time.monotonic() - start
    assert 3 <= waited < 30
    wanted = "4 training workers x 0.5 CPU + 1 GPU (ray.num_workers, ray.cpus_per_worker, ray.gpus_per_worker)"
    assert f"waiting up to 3 s (ray.capacity_timeout_s) for {wanted} = 2 CPUs, 4 GPUs" in caplog.text
    message = str(err.value)
    assert "within ray.capacity_timeout_s=3 s: it needs 4 GPUs (the cluster has 0)" in message
    assert "never falls back to CPU" in message
    assert not storage.exists(RunPaths(cfg).url)  # no config, no checkpoint: nothing started


@pytest.mark.integration
def test_sampling_actors_configured_for_gpus_never_start_on_cpus(ray_local, tmp_path, caplog):
    from dydit_dist.sample.pool import run_sampling

    cfg = tiny_config(f"file://{tmp_path}", "ray.use_gpu=true", "sample.num_actors=2", "ray.capacity_timeout_s=2")
    caplog.set_level(logging.INFO, logger="dydit_dist.capacity")
    with pytest.raises(CapacityError, match=r"2 sampling actors x 1 CPU \+ 1 GPU .* it needs 2 GPUs \(the cluster "
                                            r"has 0\)"):
        run_sampling(cfg)
    assert "waiting up to 2 s (ray.capacity_timeout_s) for 2 sampling actors" in caplog.text


@pytest.mark.integration
def test_cpu_capacity_that_fits_is_taken_at_once(ray_local):
    from dydit_dist.capacity import acquire

    start = time.monotonic()
    acquire([Need("encoder tasks", 2, cpus=1)], use_gpu=False, timeout_s=5)
    assert time.monotonic() - start < 5
    with pytest.raises(CapacityError, match=r"it needs 3 CPUs \(the cluster has 2\)\.$"):
        acquire([Need("encoder tasks", 3, cpus=1)], use_gpu=False, timeout_s=1)


def test_training_workers_that_never_start_again_end_within_the_capacity_timeout(monkeypatch):
    """Ray Train restarts a worker group that did not start forever by default (a lost node whose GPUs never
    come back would hold the job and its lease): the restarts add up to about ray.capacity_timeout_s, and
    the last failure is a CapacityError (exit 2) naming it."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from dydit_dist.capacity import CapacityError
    from dydit_dist.train import launcher

    assert [launcher.worker_start_retries(s) for s in (1, 60, 61, 900)] == [1, 1, 2, 15]
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    assert launcher.worker_start_retries(900) == 3

    class NeverStarts:
        def fit(self):
            raise ControllerError(WorkerGroupStartupTimeoutError(4))

    with pytest.raises(CapacityError, match=r"training workers \(4\) did not start: the run's 3 start attempts \(about "
                                            r"ray.capacity_timeout_s=900 s, counted over the whole run by Ray\) are spent"):
        launcher.fit(NeverStarts(), 900)


@pytest.mark.integration
def test_a_replacement_actor_that_finds_no_room_ends_the_wait(ray_local, monkeypatch):
    """A lost actor's replacement that no node can hold (its node gone, the rest taken): the pool's wait
    stops with a CapacityError after ray.capacity_timeout_s instead of waiting on it forever."""
    import ray

    from dydit_dist import capacity

    class Idle:  # defined here: Ray's workers get it by value (the tests folder is not on their path)
        def work(self, seconds: float) -> str:
            time.sleep(seconds)
            return "done"

    monkeypatch.setattr(capacity, "POLL_S", 0.5)
    pool = capacity.ActorPool(Idle, (), Need("test actors", 1, cpus=1), False, 3.0, 2, "test actor")
    blockers = []
    try:
        ref = pool.actors[0].work.remote(0.0)
        assert pool.wait([ref]) == ref and ray.get(ref) == "done"
        for _ in range(2):  # the cluster's other CPU, then the one the lost actor frees: taken by others
            blockers.append(ray.remote(num_cpus=1)(Idle).remote())
            assert ray.get(blockers[-1].work.remote(0.0), timeout=60) == "done"
            if len(blockers) == 1:
                ray.kill(pool.actors[0])
        pool.replace(pool.actors[0], RuntimeError("lost"))
        start = time.monotonic()
        with pytest.raises(CapacityError, match=r"a replacement test actor found no room within "
                                                r"ray.capacity_timeout_s=3 s \(1 CPUs, 0 GPUs"):
            pool.wait([pool.actors[0].work.remote(0.0)])
        assert 3.0 <= time.monotonic() - start < 30
    finally:
        pool.shutdown()
        for blocker in blockers:
            ray.kill(blocker)


@pytest.mark.integration
def test_a_first_actor_whose_room_was_taken_ends_the_wait_but_a_slow_loader_does_not(ray_local, monkeypatch):
    """`acquire` reserves nothing: work that takes the room before the pool's first actors are placed
    leaves them waiting, and the pool's wait stops with a CapacityError after ray.capacity_timeout_s. An
    actor that is placed but still in its `__init__` longer than that (a network loading) is waited for."""
    import ray

    from dydit_dist import capacity

    class Idle:
        def work(self, seconds: float) -> str:
            time.sleep(seconds)
            return "done"

    class SlowLoad(Idle):
        def __init__(self):
            time.sleep(6.0)

    monkeypatch.setattr(capacity, "POLL_S", 0.5)
    pool = capacity.ActorPool(SlowLoad, (), Need("test actors", 1, cpus=1), False, 2.0, 0, "test actor")
    try:
        ref = pool.actors[0].work.remote(0.0)
        assert pool.wait([ref]) == ref and ray.get(ref) == "done"  # placed at once, loaded after 6 s > 2 s
    finally:
        pool.shutdown()
    deadline = time.monotonic() + 30  # the killed actor's CPU comes back
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.2)
    free = int(ray.available_resources().get("CPU", 0))
    blockers = [ray.remote(num_cpus=1)(Idle).remote() for _ in range(free)]
    try:
        assert ray.get([b.work.remote(0.0) for b in blockers], timeout=60) == ["done"] * free
        monkeypatch.setattr(capacity, "acquire", lambda *args: None)  # the room was there when it looked
        pool = capacity.ActorPool(Idle, (), Need("test actors", 1, cpus=1), False, 3.0, 2, "test actor")
        start = time.monotonic()
        with pytest.raises(CapacityError, match=r"a test actor found no room within ray.capacity_timeout_s=3 s "
                                                r"\(1 CPUs, 0 GPUs: taken by other work after the cluster had room"):
            pool.wait([pool.actors[0].work.remote(0.0)])
        assert 3.0 <= time.monotonic() - start < 30
        pool.shutdown()
        monkeypatch.setattr(capacity, "placed", lambda actor: None)  # the actor table does not answer:
        pool = capacity.ActorPool(Idle, (), Need("test actors", 1, cpus=1), False, 1.5, 2, "test actor")
        start = time.monotonic()  # waited on for a second timeout before it counts as no room
        with pytest.raises(CapacityError, match=r"a test actor found no room within ray.capacity_timeout_s=1.5 s"):
            pool.wait([pool.actors[0].work.remote(0.0)])
        assert 3.0 <= time.monotonic() - start < 30
        pool.shutdown()
    finally:
        for blocker in blockers:
            ray.kill(blocker)


def test_an_actor_stuck_in_its_start_is_killed_once_the_others_have_loaded(ray_local, monkeypatch, tmp_path):
    """An actor placed on a node whose `__init__` hangs (a hung CUDA init, a wedged download) used to be
    waited for forever; once another actor of the pool has loaded, one loading ray.stall_factor x as long
    (at least STALL_FLOOR_S) is killed, so its calls fail as a lost actor's and the caller replaces it."""
    import ray
    from ray.exceptions import RayActorError

    from dydit_dist import capacity

    flag = str(tmp_path / "stuck")

    class HangsOnce:
        def __init__(self, flag: str):
            try:
                os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                time.sleep(0.2)
                return
            time.sleep(120)  # without the load watch the wait below waits it out

        def work(self) -> str:
            return "done"

    monkeypatch.setattr(capacity, "POLL_S", 0.2)
    monkeypatch.setattr(faults, "STALL_LOAD_FLOOR_S", 2.0)
    pool = capacity.ActorPool(HangsOnce, (flag,), Need("test actors", 2, cpus=0.5), False, 60.0, 1, "test actor", 3.0)
    try:
        start = time.monotonic()
        refs = [actor.work.remote() for actor in pool.actors]
        outcomes = []
        while refs:
            ref = pool.wait(refs)
            refs.remove(ref)
            try:
                outcomes.append(ray.get(ref))
            except RayActorError:
                outcomes.append("lost")
        assert sorted(outcomes) == ["done", "lost"] and time.monotonic() - start < 60
        assert len(pool.load_seconds_seen) == 1
    finally:
        pool.shutdown()


def test_the_token_of_a_local_ray_is_readable_by_this_user_only(tmp_path, monkeypatch):
    """Ray writes `~/.ray/auth_token` with mode 0644 in a 0755 `~/.ray` when `ray.init` starts a local
    instance; whoever reads it can run jobs with this job's AWS keys. connect_ray leaves both private."""
    import stat
    import sys
    import types

    from dydit_dist.capacity import connect_ray, keep_ray_token_private

    def mode(path):
        return stat.S_IMODE(path.lstat().st_mode)

    monkeypatch.setenv("HOME", str(tmp_path))
    folder, token = tmp_path / ".ray", tmp_path / ".ray" / "auth_token"

    def init_like_ray(address=None):  # what Ray 2.60 does: mkdir and a plain open() under umask 022
        folder.mkdir(mode=0o755, exist_ok=True)
        token.write_text("token")
        os.chmod(token, 0o644)

    fake_ray = types.SimpleNamespace(is_initialized=lambda: False, init=init_like_ray)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    connect_ray(None)
    assert (mode(folder), mode(token)) == (0o700, 0o600)

    os.chmod(folder, 0o755)  # an existing token from an earlier run: narrowed, not only new ones
    os.chmod(token, 0o644)
    keep_ray_token_private()
    assert (mode(folder), mode(token)) == (0o700, 0o600)
    os.chmod(token, 0o400)  # only ever narrowed
    keep_ray_token_private()
    assert mode(token) == 0o400

    elsewhere = tmp_path / "elsewhere"  # a link: chmod would change what it points to
    elsewhere.write_text("x")
    os.chmod(elsewhere, 0o644)
    token.unlink()
    token.symlink_to(elsewhere)
    keep_ray_token_private()
    assert mode(elsewhere) == 0o644

    os.chmod(folder, 0o755)  # another user's folder (a shared HOME): left as it is
    monkeypatch.setattr(os, "getuid", lambda: folder.stat().st_uid + 1)
    keep_ray_token_private()
    assert mode(folder) == 0o755


def test_no_address_starts_a_local_ray_unless_ray_address_names_one(monkeypatch):
    """ray.init(None) joins the host's latest `ray start` (/tmp/ray/ray_current_cluster), maybe another user's,
    and sends it this job's work and token; ray.address unset means a local instance, as the README says,
    except in a job `ray job submit` started (RAY_ADDRESS set)."""
    import sys
    import types

    from dydit_dist import capacity

    asked = []
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False,
                                                                  init=lambda address=None: asked.append(address)))
    monkeypatch.setattr(capacity, "keep_ray_token_private", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    capacity.connect_ray(None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    capacity.connect_ray(None)
    capacity.connect_ray("ray://head:10001")
    assert asked == ["local", None, "ray://head:10001"]
