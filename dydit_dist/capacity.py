"""Capacity: every job sizes itself from its config, asks the cluster for that much, and waits for it.

    needs = [Need("finetune workers", cfg.ray.num_workers, cpus=1, gpus=1)]
    acquire(needs, use_gpu=True, timeout_s=cfg.ray.capacity_timeout_s)   # or CapacityError naming the resource

A job never shrinks to what happens to be up when it starts: `acquire` creates a placement group of
the job's bundles (one per worker or actor), which a Ray autoscaler (KubeRay's in-tree one) serves by
starting pods, and waits for it to be placed, logging what it waits for and what the cluster has. The
group is removed once placed: it only proves that the bundles fit, and the job's own actors (or Ray
Train's placement group) take their place at once. When they do not fit within the timeout the job
fails with a `CapacityError` naming the resource; a job configured for GPUs never falls back to CPU.

Every driver joins (or starts) Ray through `connect_ray(address)`, which keeps the process's SIGTERM
and SIGINT handlers: `ray.init` replaces them, and the jobs' own (exit 143 / 130 saying what was kept,
`dydit_dist.cli`) must stay in force while the job runs.

Inside a worker or actor configured for a GPU, `check_gpu(where)` is the first thing that runs: a
GPU-configured process without a usable GPU raises `GpuUnavailable`, and the device, driver and CUDA
versions are logged. That is a fault of the host Ray placed the process on (it advertised a GPU that torch
cannot use: a driver that fell over, a wrong CUDA_VISIBLE_DEVICES), not of the job's input, so it is
retried like a lost worker within ray.max_failures: a training worker is not stopped as on an input error
(`train.worker.NOT_RETRIED`), a sampling or evaluation actor is replaced, a prepare task is tried again.
`check_gpu` also allocates on the device, so a GPU that is present but busy or broken is found there.

A device error while working (`device_failure`) is one of two kinds. Out of memory: the same work meets
it again, so the job stops with one line naming the config keys that size the work (`on_device_error`
raises the caller's input error). A CUDA error (an illegal access; an ECC or Xid error surfacing as one):
the process's CUDA context is unusable, so the actor's process ends and the pool replaces it, within
ray.max_failures, as a lost actor.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import socket
import statistics
import threading
import time
from dataclasses import dataclass

import torch

from dydit_dist.config import ConfigError, JobFailed

log = logging.getLogger(__name__)
LOG_EVERY_S = 30.0  # a progress line while waiting
POLL_S = 30.0  # how often `ActorPool.wait` checks that replacement actors have started and calls have not stalled
STALL_FLOOR_S = 300.0  # a call is never taken for stalled sooner than this
STALL_MIN_FINISHED = 3  # finished calls before any is taken for stalled (their median sets the limit)


def connect_ray(address: str | None) -> None:
    """Join (or start) Ray at `address` unless this process already did, keeping its signal handlers."""
    import ray

    if ray.is_initialized():
        return
    main = threading.current_thread() is threading.main_thread()  # only there can handlers be set
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    ray.init(address=address)
    for sig, handler in handlers.items():
        if handler is not None:  # None: set from outside Python, nothing to restore
            signal.signal(sig, handler)


class CapacityError(ConfigError):
    """The capacity a job is configured for did not arrive."""


class GpuUnavailable(RuntimeError):
    """A GPU-configured worker or actor on a host whose GPU torch cannot use (retried, see above)."""


def device_failure(err: BaseException) -> str | None:
    """"oom" (out of device memory), "fault" (a CUDA error: the process's device is unusable) or None. A Ray
    task's or actor's error is read through to its cause."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "oom"
    accelerator_error = getattr(torch, "AcceleratorError", ())  # torch >= 2.8: CUDA errors have their own type
    text = str(err)
    if isinstance(err, accelerator_error) or (isinstance(err, RuntimeError) and any(
            marker in text for marker in ("CUDA error", "CUBLAS_STATUS_", "CUDNN_STATUS_", "cuDNN error"))):
        return "fault"
    return None


def on_device_error(err: BaseException, where: str, advice: str, input_error: type[Exception]) -> None:
    """In an actor, on an exception of its work: out of device memory raises `input_error` (the job stops,
    one line) saying `where` and `advice` (the keys that size the work); a CUDA fault ends this process,
    which its pool replaces; any other error returns (the caller re-raises it)."""
    kind = device_failure(err)
    if kind == "oom":
        first = str(err).strip().splitlines()[0] if str(err).strip() else "out of memory"
        raise input_error(f"{where} ran out of GPU memory ({first}): {advice}") from None
    if kind == "fault":
        log.error("%s on %s: %s: %s; its CUDA context is unusable, so the process ends and is replaced", where,
                  socket.gethostname(), type(err).__name__, str(err).strip().splitlines()[0])
        logging.shutdown()
        os._exit(70)  # EX_SOFTWARE: the driver sees the actor die


def death_cause(err: Exception) -> str:
    """The last line of a Ray actor's death: its error's type and message without Ray's framing, the
    creation task's traceback and its terminal colours."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    return lines[-1] if lines else type(err).__name__


class Stalled(Exception):
    """A call on a pool's actor that has run far longer than the finished ones (`StallWatch`): an actor
    alive but stuck (a hung kernel, a wedged NCCL or storage call) is taken for lost."""

    def __init__(self, ref, seconds: float, limit: float):
        self.ref = ref
        super().__init__(f"a call stalled: running for {seconds:.0f} s, more than {limit:.0f} s (ray.stall_factor x "
                         "the median finished call, at least 5 min)")


class StallWatch:
    """When each work call on a pool's actors started, and how long the finished ones took. Once
    `STALL_MIN_FINISHED` have finished, a call running longer than `factor` x their median (and at least
    `STALL_FLOOR_S`) is stalled (`ActorPool.wait` raises `Stalled`); `factor` 0 never. A call queued
    behind another on its actor is `restart`ed when that one finishes."""

    def __init__(self, factor: float):
        self.factor = factor
        self.started: dict = {}  # ObjectRef -> time.monotonic() it started
        self.durations: list[float] = []

    def start(self, ref) -> None:
        self.started[ref] = time.monotonic()

    restart = start

    def finish(self, ref) -> None:
        since = self.started.pop(ref, None)
        if since is not None:
            self.durations.append(time.monotonic() - since)

    def forget(self, ref) -> None:
        self.started.pop(ref, None)

    def stalled(self) -> Stalled | None:
        if not self.factor or len(self.durations) < STALL_MIN_FINISHED:
            return None
        limit = max(self.factor * statistics.median(self.durations), STALL_FLOOR_S)
        now = time.monotonic()
        oldest = min(self.started.items(), key=lambda item: item[1], default=None)
        return Stalled(oldest[0], now - oldest[1], limit) if oldest and now - oldest[1] > limit else None


@dataclass(frozen=True)
class Need:
    """`count` bundles of `cpus` CPUs and `gpus` GPUs each, for `what` (the log's and the error's words);
    `keys` names the config keys that set them, for the error message."""

    what: str
    count: int
    cpus: float
    gpus: float = 0.0
    keys: str = ""

    def bundle(self) -> dict[str, float]:
        return {k: v for k, v in (("CPU", self.cpus), ("GPU", self.gpus)) if v > 0}

    def totals(self) -> dict[str, float]:
        return {kind: self.count * per for kind, per in self.bundle().items()}

    def describe(self) -> str:
        per = " + ".join(f"{v:g} {k}" for k, v in self.bundle().items()) or "no resources"
        total = ", ".join(f"{v:g} {k}s" for k, v in self.totals().items())
        keys = f" ({self.keys})" if self.keys else ""
        return f"{self.count} {self.what} x {per}{keys} = {total}"


def _totals(needs: list[Need]) -> dict[str, float]:
    out: dict[str, float] = {}
    for need in needs:
        for kind, amount in need.totals().items():
            out[kind] = out.get(kind, 0.0) + amount
    return out


def acquire(needs: list[Need], use_gpu: bool, timeout_s: float) -> None:
    """Wait until the cluster can place every bundle of `needs` (at most `timeout_s`), else CapacityError.

    `use_gpu`: the job's `ray.use_gpu`, named in the error. Ray must be initialized."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if use_gpu and not any(n.gpus > 0 for n in needs):
        raise CapacityError("ray.use_gpu=true but no GPU is requested per worker or actor: set "
                            "ray.gpus_per_worker / sample.gpus_per_actor above 0")
    bundles = [n.bundle() for n in needs for _ in range(n.count) if n.bundle()]
    if not bundles:
        return
    wanted = "; ".join(n.describe() for n in needs)
    group = placement_group(bundles, strategy="PACK")
    start = time.monotonic()
    try:
        log.info("waiting up to %g s (ray.capacity_timeout_s) for %s", timeout_s, wanted)
        while True:
            left = timeout_s - (time.monotonic() - start)
            if left <= 0:
                break
            if group.wait(timeout_seconds=math.ceil(min(LOG_EVERY_S, left))):  # Ray takes whole seconds
                log.info("capacity ready after %.1f s: %s", time.monotonic() - start, wanted)
                return
            log.info("still waiting (%.0f of %g s) for %s; the cluster has %s", time.monotonic() - start,
                     timeout_s, wanted, _have(ray.cluster_resources()))
    finally:
        remove_placement_group(group)
    have = ray.cluster_resources()
    short = [f"{amount:g} {kind}s (the cluster has {have.get(kind, 0):g})"
             for kind, amount in _totals(needs).items() if amount > have.get(kind, 0)]
    why = f"it needs {' and '.join(short)}" if short else f"the bundles do not fit its nodes ({_have(have)})"
    fallback = (" A job configured with ray.use_gpu=true never falls back to CPU; start GPU nodes (or let the "
                "autoscaler start them), raise ray.capacity_timeout_s, or set ray.use_gpu=false.") if use_gpu else ""
    raise CapacityError(f"the cluster did not provide {wanted} within ray.capacity_timeout_s={timeout_s:g} s: "
                        f"{why}.{fallback}")


class ActorPool:
    """The actors of one kind a job runs: once the cluster has room for all of them (`acquire`), `need.count`
    actors `worker_cls(*args)` of `need`'s CPUs and GPUs each (`options`: more `ray.remote` options). A lost
    one is replaced (`replace`), `max_failures` times in all."""

    def __init__(self, worker_cls: type, args: tuple, need: Need, use_gpu: bool, timeout_s: float,
                 max_failures: int, noun: str, **options):
        import ray

        acquire([need], use_gpu, timeout_s)
        self.actor_cls = ray.remote(worker_cls).options(num_cpus=need.cpus, num_gpus=need.gpus, max_restarts=0, **options)
        self.args, self.max_failures, self.noun = args, max_failures, noun
        self.need, self.timeout_s = need, timeout_s
        self.failures = 0
        self.actors = []
        self._starting: list[tuple] = []  # (actor, its __ray_ready__ ref, when asked for, a replacement?)
        for _ in range(need.count):  # `acquire` reserved nothing: another job may take the room before these
            self._start(replacement=False)

    def _start(self, replacement: bool) -> None:
        self.actors.append(self.actor_cls.remote(*self.args))
        self._starting.append((self.actors[-1], self.actors[-1].__ray_ready__.remote(), time.monotonic(), replacement))

    def replace(self, actor, err: Exception) -> None:
        """Drop a lost actor; start another while the failure budget lasts (it loads while it waits for its
        first call); RuntimeError naming the cause `err` once the budget is spent and no actor is left. The
        lost one is killed: Ray reports an actor that is only unavailable for the moment
        (`ActorUnavailableError`) as lost too, and one still alive would go on working on what is now
        requeued and holding its GPU (killing a dead actor does nothing)."""
        import ray

        ray.kill(actor, no_restart=True)
        self.actors.remove(actor)
        self.failures += 1
        if self.failures <= self.max_failures:
            self._start(replacement=True)
        elif not self.actors:
            raise JobFailed(f"every {self.noun} died ({self.failures} failures > ray.max_failures="
                            f"{self.max_failures}), the last with {death_cause(err)}") from None

    def wait(self, refs: list, watch: StallWatch | None = None):
        """The first of `refs` (calls on this pool's actors) to finish, as `ray.wait`; meanwhile, every
        POLL_S, a CapacityError once an actor has waited for room longer than ray.capacity_timeout_s (a
        replacement whose node is lost and none back; a first one whose room another job took after
        `acquire`): the calls on it would wait forever. An actor placed on a node and still loading (its
        `__init__`: a network, T5-XXL) is not waiting for room, however long it takes. With `watch`, the
        work calls it times: `Stalled` for one that runs far too long (the caller replaces its actor)."""
        import ray

        while True:
            done, _ = ray.wait(refs, num_returns=1, timeout=POLL_S)
            if done:
                if watch is not None:
                    watch.finish(done[0])
                return done[0]
            self._check_started()
            if watch is not None and (stalled := watch.stalled()) is not None:
                watch.forget(stalled.ref)
                raise stalled

    def _check_started(self) -> None:
        import ray

        waiting = []
        for actor, ref, since, replacement in self._starting:
            if actor not in self.actors or ray.wait([ref], timeout=0)[0]:
                continue  # replaced again, or started
            waited = time.monotonic() - since
            if waited > self.timeout_s:
                where = placed(actor)
                if where is None and waited > 2 * self.timeout_s:
                    where = False  # the actor table would not say for a whole timeout more
                if where is False:
                    which, why = ("a replacement", "its node lost and none back") if replacement else \
                        ("a", "taken by other work after the cluster had room for all")
                    raise CapacityError(f"{which} {self.noun} found no room within ray.capacity_timeout_s="
                                        f"{self.timeout_s:g} s ({self.need.cpus:g} CPUs, {self.need.gpus:g} GPUs: "
                                        f"{why}); what is done is kept, rerun to go on")
                if where:  # placed, loading on its node (its __init__): waited for however long it takes
                    continue
            waiting.append((actor, ref, since, replacement))
        self._starting = waiting

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def placed(actor) -> bool | None:
    """Whether Ray has placed `actor` on a node (its creation task runs there, or ran): the actor table
    gives it a worker's port then; one waiting for resources has port 0. None when the table cannot say
    (a GCS hiccup): the caller waits, for a while."""
    from ray._private import state  # the GCS actor table; ray.util.state needs the dashboard

    try:
        return bool(state.actors(actor._actor_id.hex())["Address"]["Port"])
    except Exception:  # noqa: BLE001 - no answer, which is not "no room"
        return None


def _have(resources: dict) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}s" for k in ("CPU", "GPU"))


def check_gpu(where: str) -> str:
    """First thing in a GPU-configured worker or actor: GpuUnavailable without a usable GPU; logs and returns
    the device line (name, compute capability, driver and CUDA versions)."""
    host = socket.gethostname()
    if not torch.cuda.is_available():
        raise GpuUnavailable(f"{where} on {host} is configured for a GPU (ray.use_gpu=true) but torch sees none "
                            f"(torch.cuda.is_available() is False; CUDA_VISIBLE_DEVICES="
                            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch built for CUDA {torch.version.cuda})")
    index = torch.cuda.current_device()
    try:  # a context and one kernel: a GPU that is busy (exclusive mode) or broken fails here, not in the work
        torch.ones(1, device=f"cuda:{index}").add_(1).item()
    except RuntimeError as err:
        raise GpuUnavailable(f"{where} on {host} cannot use cuda:{index} ({type(err).__name__}: "
                            f"{str(err).strip().splitlines()[0]})") from None
    props = torch.cuda.get_device_properties(index)
    line = (f"{where} on {host}: cuda:{index} {props.name} (sm_{props.major}{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB), driver {_driver_version()}, CUDA runtime {torch.version.cuda}")
    log.info(line)
    return line


def _driver_version() -> str:
    """The NVIDIA kernel driver's version, from /proc (Linux); 'unknown' elsewhere."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            match = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", f.read())
    except OSError:
        return "unknown"
    return match[1] if match else "unknown"
