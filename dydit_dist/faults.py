"""What a failing sampling, evaluation or training process means for its job: device errors and stalls.

A device error while working (`device_failure`) is one of two kinds. Out of memory: the same work meets
it again, so the job stops with one line naming the config keys that size the work (`on_device_error`
raises the caller's input error; a training run stops the second time without progress in between,
`train.launcher.StopOnInputError`). A CUDA error (an illegal access; an ECC or Xid error surfacing as
one): the process's CUDA context is unusable, so the actor's process ends and its pool replaces it,
within ray.max_failures, as a lost actor.

An actor alive but stuck (a hung kernel, a wedged storage call) never fails its call: `StallWatch` times
the work calls on a pool's actors from when their actor is ready and the call is at the head of its
queue, and once `STALL_MIN_FINISHED` have finished, a call running `ray.stall_factor` x their median (and
at least `STALL_FLOOR_S`) is stalled: `capacity.ActorPool.wait` raises `Stalled`, and the job replaces the
actor and requeues its work as for a lost one. An actor stuck in its `__init__` (a hung CUDA init, a wedged
download) is found the same way, against how long the pool's other actors took to load, from when it was
placed on a node, and never before `STALL_LOAD_FLOOR_S` (`capacity.ActorPool`; one load finished is enough,
since the first ones load at once). The prepare job's encoder tasks are watched alike, with that floor, as a
worker process's first task loads the encoders (`data.pipeline`): a stuck one is killed and tried again.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import time

import torch

log = logging.getLogger(__name__)
STALL_FLOOR_S = 300.0  # a call is never taken for stalled sooner than this
STALL_MIN_FINISHED = 3  # finished calls before any is taken for stalled (their median sets the limit)
# an actor's start is never taken for stuck sooner than this: a node with a cold cache may copy T5-XXL or a
# checkpoint for many minutes while another, warm, loads in seconds
STALL_LOAD_FLOOR_S = 1800.0
_OUT_OF_MEMORY = ("out of memory", "ALLOC_FAILED")  # CUDA / cuBLAS / cuDNN allocation failures outside torch's allocator
_CUDA_ERRORS = ("CUDA error", "CUBLAS_STATUS_", "CUDNN_STATUS_", "cuDNN error")


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
    if not (isinstance(err, accelerator_error) or (isinstance(err, RuntimeError) and any(m in text for m in _CUDA_ERRORS))):
        return None
    return "oom" if any(m in text for m in _OUT_OF_MEMORY) else "fault"


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


class Stalled(Exception):
    """A work call on a pool's actor that has run far longer than the finished ones (`StallWatch`)."""

    def __init__(self, ref, seconds: float, limit: float, floor_s: float | None = None, what: str = "call"):
        self.ref = ref
        floor_s = STALL_FLOOR_S if floor_s is None else floor_s
        super().__init__(f"a {what} stalled: running for {seconds:.0f} s, more than {limit:.0f} s (ray.stall_factor "
                         f"x the median finished {what}, at least {floor_s:g} s)")


class StallWatch:
    """The running work calls on a pool's actors (or tasks: `actor` None) and how long the finished ones took
    (see the module docstring); `factor` 0 never stalls, `floor_s` is the least limit (None: STALL_FLOOR_S as
    it is when checked). A call's clock starts when it is `start`ed (at the head of its
    actor's queue: a call queued behind another is started when that one finishes) and runs only while
    its actor is ready: `stalled(starting)` restarts the clocks of the actors still being placed or loading."""

    def __init__(self, factor: float, floor_s: float | None = None, what: str = "call"):
        self.factor, self.floor_s, self.what = factor, floor_s, what
        self.started: dict = {}  # ObjectRef -> (actor, time.monotonic() its clock started)
        self.durations: list[float] = []

    def start(self, ref, actor) -> None:
        self.started[ref] = (actor, time.monotonic())

    def finish(self, ref) -> None:
        """A call that returned its result: its time counts toward the median."""
        actor, since = self.started.pop(ref, (None, None))
        if since is not None:
            self.durations.append(time.monotonic() - since)

    def forget(self, ref) -> None:
        """A call that failed, or was dropped with its actor: its time does not count."""
        self.started.pop(ref, None)

    def stalled(self, starting: set = frozenset()) -> Stalled | None:
        """The longest-running call past the limit, if any; the clocks of `starting` actors restart."""
        now = time.monotonic()
        for ref, (actor, _) in list(self.started.items()):
            if actor in starting:
                self.started[ref] = (actor, now)
        limit = stall_limit(self.factor, self.durations, floor_s=self.floor_s)
        if limit is None or not self.started:
            return None
        ref, (_, since) = min(self.started.items(), key=lambda item: item[1][1])
        return Stalled(ref, now - since, limit, self.floor_s, self.what) if now - since > limit else None


def stall_limit(factor: float, durations: list[float], min_finished: int = STALL_MIN_FINISHED,
                floor_s: float | None = None) -> float | None:
    """How long work like `durations` (the finished ones) may run before it counts as stuck: `factor` x their
    median, at least `floor_s` (STALL_FLOOR_S); None (no limit) with `factor` 0 or fewer than `min_finished`
    finished."""
    if not factor or len(durations) < max(min_finished, 1):
        return None
    return max(factor * statistics.median(durations), STALL_FLOOR_S if floor_s is None else floor_s)


def process_alive(pid: int) -> bool:
    """Whether a process of this host still runs (another user's counts as running): the owner of a
    temporary file or folder named after its process id (`train.checkpoints.remove_stale_staging`)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no process can have that number
        return False
    except PermissionError:  # another user's process
        return True
    return True
