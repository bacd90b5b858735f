"""Actors whose start meets a host without a usable GPU, as `capacity.check_gpu` raises it there, for the
tests that a start failure is replaced like a lost actor; and one that refuses its config, for the test that
this is an input error. Ray ships these classes to the actors by value (`swapped_actor`): the actors cannot
import the tests' modules. `dies_soon`: whether a killed actor stops answering."""

from __future__ import annotations

import contextlib
import os
import sys
import time

import torch
from ray import cloudpickle  # the one Ray ships actors with

from dydit_dist.capacity import GpuUnavailable
from dydit_dist.eval.actors import FeatureWorker
from dydit_dist.sample.pool import SamplingWorker

FLAG = ""  # "": every start fails; a path: only the first start to create that file (O_EXCL: one of many)
STUCK_ON = 3  # the shard (sampling) or first sample (evaluation) a stuck actor hangs on


def _start(where: str) -> None:
    if FLAG:
        try:
            os.close(os.open(FLAG, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    raise GpuUnavailable(f"{where} on host-a is configured for a GPU but torch sees none")


class SamplingWorkerWithoutGpu(SamplingWorker):
    def __init__(self, *args):
        _start("sampling actor")
        super().__init__(*args)


class SamplingWorkerWithBadConfig(SamplingWorker):
    """A config the actor's copy of the package refuses (a key it does not know)."""

    def __init__(self, cfg_dict: dict, *args):
        super().__init__({**cfg_dict, "sample": {**cfg_dict["sample"], "colour": "red"}}, *args)


class SamplingWorkerWithDeviceError(SamplingWorker):
    """Its generator raises a device error on shard 1: out of memory every time (ERROR "oom"), or a CUDA
    fault (ERROR "fault") in the first actor to create FLAG (O_EXCL: one of many)."""

    ERROR = "oom"

    def __init__(self, *args):
        super().__init__(*args)
        generate = self.generator.generate

        def failing(unit):
            if unit.index == 1 and self.ERROR == "oom":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a "
                                                  "total capacity of 79.10 GiB of which 1.2 GiB is free.")
            if unit.index == 1 and self.ERROR == "fault" and _first(FLAG):
                raise getattr(torch, "AcceleratorError", RuntimeError)(
                    "CUDA error: an illegal memory access was encountered")
            return generate(unit)

        self.generator.generate = failing


def _first(flag: str) -> bool:
    """Whether this is the first process to claim `flag` (O_EXCL: one of many)."""
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class SamplingWorkerStuckOnce(SamplingWorker):
    """Alive but stuck (a hung kernel) on shard STUCK_ON, in the first actor to claim FLAG."""

    def __init__(self, *args):
        super().__init__(*args)
        generate = self.generator.generate

        def stuck(unit):
            if unit.index == STUCK_ON and _first(FLAG):
                time.sleep(120)  # without the stall watch the job waits it out, and the assertions fail
            return generate(unit)

        self.generator.generate = stuck


class FeatureWorkerStuckOnce(FeatureWorker):
    """Alive but stuck on the samples starting at STUCK_ON, in the first actor to claim FLAG."""

    def features(self, url, record, captions):
        if record["start"] == STUCK_ON and _first(FLAG):
            time.sleep(120)  # without the stall watch the job waits it out, and the assertions fail
        return super().features(url, record, captions)


class FeatureWorkerWithoutGpu(FeatureWorker):
    def __init__(self, *args):
        _start("evaluation actor")
        super().__init__(*args)


@contextlib.contextmanager
def lost_gpu_at_start(monkeypatch, module, name: str, cls, flag: str = ""):
    """`module.name` -> `cls` (one of the above) while the block runs; `flag` as FLAG."""
    global FLAG
    FLAG = flag
    with swapped_actor(monkeypatch, module, name, cls):
        yield


@contextlib.contextmanager
def swapped_actor(monkeypatch, module, name: str, cls):
    """`module.name` -> `cls` (one of the above) while the block runs."""
    original = getattr(module, name)
    monkeypatch.setattr(module, name, cls)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        monkeypatch.setattr(module, name, original)


def dies_soon(actor, seconds: float = 60.0) -> bool:
    """Whether `actor` stops answering within `seconds`. `ray.kill` takes effect asynchronously: a call sent
    right after it may still be answered (seen for a `__ray_ready__` sent at once), so one call proves nothing."""
    import ray
    from ray.exceptions import RayActorError

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
        except RayActorError:
            return True
        except ray.exceptions.GetTimeoutError:
            return False
        time.sleep(0.2)
    return False
