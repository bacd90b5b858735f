"""Actors whose start meets a host without a usable GPU, as `capacity.check_gpu` raises it there, for the
tests that a start failure is replaced like a lost actor; and one that refuses its config, for the test that
this is an input error. Ray ships these classes to the actors by value (`swapped_actor`): the actors cannot
import the tests' modules."""

from __future__ import annotations

import contextlib
import os
import sys

from ray import cloudpickle  # the one Ray ships actors with

from dydit_dist.capacity import GpuUnavailable
from dydit_dist.eval.actors import FeatureWorker
from dydit_dist.sample.pool import SamplingWorker

FLAG = ""  # "": every start fails; a path: only the first start to create that file (O_EXCL: one of many)


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
