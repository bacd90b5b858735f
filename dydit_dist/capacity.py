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
`dydit_dist.cli`) must stay in force while the job runs. When it starts a local Ray (no address), the token
Ray writes to `~/.ray/auth_token` is made readable by this user only (`keep_ray_token_private`).

Inside a worker or actor configured for a GPU, `check_gpu(where)` is the first thing that runs: a
GPU-configured process without a usable GPU raises `GpuUnavailable`, and the device, driver and CUDA
versions are logged. That is a fault of the host Ray placed the process on (it advertised a GPU that torch
cannot use: a driver that fell over, a wrong CUDA_VISIBLE_DEVICES), not of the job's input, so it is
retried like a lost worker within ray.max_failures: a training worker is not stopped as on an input error
(`train.worker.NOT_RETRIED`), a sampling or evaluation actor is replaced, a prepare task is tried again.
`check_gpu` also runs a kernel, so a GPU that is present but busy or broken is found there. Failures while
working (device errors, stuck actors) are `dydit_dist.faults`'.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dydit_dist import faults
from dydit_dist.config import ConfigError, JobFailed

log = logging.getLogger(__name__)
LOG_EVERY_S = 30.0  # a progress line while waiting
POLL_S = 30.0  # how often `ActorPool.wait` checks that actors have started and calls have not stalled


def connect_ray(address: str | None) -> None:
    """Join (or start) Ray at `address` unless this process already did, keeping its signal handlers. No address:
    the cluster of `RAY_ADDRESS` (a job `ray job submit` started), else a local instance of its own."""
    import ray

    if ray.is_initialized():
        return
    main = threading.current_thread() is threading.main_thread()  # only there can handlers be set
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    if address is None and not os.environ.get("RAY_ADDRESS"):  # a job Ray did not start: a local instance, not
        address = "local"  # the host's latest `ray start` (ray.init(None) joins it, whoever's it is)
    starts_local = address == "local"  # None here: the cluster of RAY_ADDRESS
    if starts_local:
        keep_ray_token_private()
    ray.init(address=address)
    if starts_local:
        keep_ray_token_private()
    for sig, handler in handlers.items():
        if handler is not None:  # None: set from outside Python, nothing to restore
            signal.signal(sig, handler)


def keep_ray_token_private() -> None:
    """`~/.ray` mode 0700 (created so when missing) and `~/.ray/auth_token` 0600, when they are this user's.

    A local Ray that `ray.init` starts (Ray 2.60) turns token authentication on and writes its token to
    `~/.ray/auth_token` with a plain `open`: mode 0644 under the usual umask, in a 0755 `~/.ray`. Whoever
    reads the token can submit jobs to the instance, and those run with this job's environment (its AWS keys).
    Called before `ray.init`, so that the token is never written into a folder others can enter, and after it.
    """
    folder = Path.home() / ".ray"
    with contextlib.suppress(OSError):  # no home, or one not writable: Ray cannot write the token there either
        folder.mkdir(mode=0o700, exist_ok=True)
    for path, private in ((folder, 0o700), (folder / "auth_token", 0o600)):
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():  # chmod would follow the link
            log.debug("%s is not this user's (or a link): its mode is left as it is", path)
            continue
        mode = stat.S_IMODE(info.st_mode)
        if mode & ~private:  # only ever narrowed: a 0400 token stays 0400
            os.chmod(path, mode & private)


class CapacityError(ConfigError):
    """The capacity a job is configured for did not arrive."""


class GpuUnavailable(RuntimeError):
    """A GPU-configured worker or actor on a host whose GPU torch cannot use (retried, see above)."""


def death_cause(err: Exception) -> str:
    """The last line of a Ray actor's death: its error's type and message without Ray's framing, the
    creation task's traceback and its terminal colours."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    return lines[-1] if lines else type(err).__name__


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
    one is replaced (`replace`), `max_failures` times in all. One placed on a node and still in its
    `__init__` `stall_factor` x the median load of the pool's started actors (at least
    `faults.STALL_LOAD_FLOOR_S`) is stuck: it is killed, and its calls fail as a lost actor's."""

    def __init__(self, worker_cls: type, args: tuple, need: Need, use_gpu: bool, timeout_s: float,
                 max_failures: int, noun: str, stall_factor: float = 0.0, **options):
        import ray

        acquire([need], use_gpu, timeout_s)
        self.actor_cls = ray.remote(worker_cls).options(num_cpus=need.cpus, num_gpus=need.gpus, max_restarts=0, **options)
        self.args, self.max_failures, self.noun = args, max_failures, noun
        self.need, self.timeout_s, self.stall_factor = need, timeout_s, stall_factor
        self.failures = 0
        self.actors = []
        self.load_seconds_seen: list[float] = []  # placed (or asked for) -> ready, of each started actor
        self._starting: list[_Starting] = []
        self._checked = time.monotonic()
        for _ in range(need.count):  # `acquire` reserved nothing: another job may take the room before these
            self._start(replacement=False)

    def _start(self, replacement: bool) -> None:
        self.actors.append(self.actor_cls.remote(*self.args))
        self._starting.append(_Starting(self.actors[-1], self.actors[-1].__ray_ready__.remote(), time.monotonic(), replacement))

    def replace(self, actor, err: Exception) -> None:
        """Drop a lost actor; start another while the failure budget lasts (it loads while it waits for its
        first call); JobFailed naming the cause `err` once the budget is spent and no actor is left. The
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

    def wait(self, refs: list, watch: faults.StallWatch | None = None):
        """The first of `refs` (calls on this pool's actors) to finish, as `ray.wait`; meanwhile, every
        POLL_S, a CapacityError once an actor has waited for room longer than ray.capacity_timeout_s (a
        replacement whose node is lost and none back; a first one whose room another job took after
        `acquire`): the calls on it would wait forever. An actor placed on a node and still loading (its
        `__init__`: a network, T5-XXL) is not waiting for room; it is killed once stuck there (see the class
        docstring). With `watch`, the work calls it times: `Stalled` for one that runs far too long
        (`faults.StallWatch`; the caller replaces its actor), checked on every call and every POLL_S; the
        caller reports each call's end to it."""
        import ray

        while True:
            if time.monotonic() - self._checked >= POLL_S:  # also while calls keep finishing
                self._check_started()
                self._checked = time.monotonic()
            if watch is not None and (stalled := watch.stalled(self._still_starting())) is not None:
                watch.forget(stalled.ref)
                raise stalled
            done, _ = ray.wait(refs, num_returns=1, timeout=max(POLL_S - (time.monotonic() - self._checked), 0.01))
            if done:
                return done[0]

    def _still_starting(self) -> set:
        """The actors not ready yet (being placed, or in their `__init__`): their calls have not begun."""
        import ray

        return {s.actor for s in self._starting if s.actor in self.actors and not ray.wait([s.ref], timeout=0)[0]}

    def _check_started(self) -> None:
        import ray

        waiting = []
        for s in self._starting:
            now = time.monotonic()
            if s.actor not in self.actors:
                continue  # replaced
            if ray.wait([s.ref], timeout=0)[0]:  # started: how long its load took (to this check)
                self.load_seconds_seen.append(now - (s.placed_at or s.asked))
                continue
            where = placed(s.actor) if s.placed_at is None else True  # once placed, a table hiccup changes nothing
            if where and s.placed_at is None:
                s.placed_at = now
            if where:  # placed, loading on its node (its __init__: a network, T5-XXL): until it is stuck
                limit = faults.stall_limit(self.stall_factor, self.load_seconds_seen, min_finished=1,
                                           floor_s=faults.STALL_LOAD_FLOOR_S)
                if limit is not None and now - s.placed_at > limit:
                    log.warning("a %s has been loading on its node for %.0f s, more than %.0f s (ray.stall_factor x "
                                "the median load of the others, at least %g s): stuck, killed, and replaced as a "
                                "lost one", self.noun, now - s.placed_at, limit, faults.STALL_LOAD_FLOOR_S)
                    ray.kill(s.actor, no_restart=True)  # its calls fail; the caller replaces it
                    continue
            elif now - s.asked > self.timeout_s:
                if where is None and now - s.asked <= 2 * self.timeout_s:
                    waiting.append(s)  # the actor table does not answer: wait a whole timeout more
                    continue
                which, why = ("a replacement", "its node lost and none back") if s.replacement else \
                    ("a", "taken by other work after the cluster had room for all")
                raise CapacityError(f"{which} {self.noun} found no room within ray.capacity_timeout_s="
                                    f"{self.timeout_s:g} s ({self.need.cpus:g} CPUs, {self.need.gpus:g} GPUs: "
                                    f"{why}); what is done is kept, rerun to go on")
            waiting.append(s)
        self._starting = waiting

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


@dataclass
class _Starting:
    """An actor of a pool not known to be ready: its `__ray_ready__` call, when it was asked for and when it
    was first seen placed on a node (its `__init__` running there)."""

    actor: object
    ref: object
    asked: float
    replacement: bool
    placed_at: float | None = None


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
