"""What Ray Train runs on every worker: `train_loop_per_worker(config_dict)`.

The typed config is rebuilt from the plain dict inside the worker, storage and logging are set up,
glibc's malloc is told to keep freed memory (`retain_freed_memory`), then the rank's `Trainer` runs
against the Ray Train session (wrapped by `wrap_session` when a test injects faults). An input error
(`NOT_RETRIED`: a corrupt shard, a checkpoint of another model, a config the worker refuses) is raised
again without the traceback through the trainer and the data reader, whose message already names the
input (`without_worker_traceback`); the launcher's callback then ends the run without retrying it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from dydit_dist import config as config_lib
from dydit_dist import storage
from dydit_dist.data import DataError
from dydit_dist.models import CheckpointError
from dydit_dist.paths import RunPaths
from dydit_dist.shardset import ShardError
from dydit_dist.train.loop import Trainer
from dydit_dist.train.ray_session import RaySession

# A worker's error that a restart meets again (ManifestError is a DataError).
NOT_RETRIED = (config_lib.ConfigError, DataError, ShardError, CheckpointError)


def train_loop_per_worker(config_dict: dict, wrap_session: Callable | None = None) -> None:
    """Ray Train's per-worker function. wrap_session: session -> session (e.g. `FaultySession`), or None."""
    cfg = config_lib.from_dict(config_dict)
    storage.configure_from(cfg.storage)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    retain_freed_memory()
    session = RaySession(background=cfg.train.async_checkpoint,
                         upload_through_storage=RunPaths(cfg).url.startswith("s3://"))
    if wrap_session is not None:
        session = wrap_session(session)
    try:
        Trainer(cfg, session).train()
    except NOT_RETRIED as err:
        raise without_worker_traceback(err) from None  # the message names the input; the reader's frames add nothing


def without_worker_traceback(err: Exception) -> Exception:
    """`err` again, of its type, with the message it was raised with. torch's DataLoader re-raises an
    error of a worker process (`data.num_workers` > 0) as the same type with the message
    "Caught ShardError in DataLoader worker process 0.\nOriginal Traceback ...": the worker's formatted
    traceback, whose last exception ends with `module.ShardError: <the original message>`."""
    message, cls = str(err), type(err)
    if message.startswith(f"Caught {cls.__name__} ") and "\nOriginal Traceback" in message:
        for name in (f"{cls.__module__}.{cls.__qualname__}", cls.__qualname__):  # no module: builtins, __main__
            _, found, own = message.rpartition(f"\n{name}: ")
            if found:
                return cls(own.rstrip("\n"))
    return cls(*err.args)


def retain_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30,
                        top_pad: int = 64 << 20) -> bool:
    """glibc malloc: keep the memory of freed tensors in the process instead of handing it back to the
    kernel and faulting it in again on the next step. PyTorch's CPU allocator frees every step's
    activations; in a fresh Ray worker (about 3,000 page faults and 4-11% system time per step of the
    debug model, which a long-lived process whose malloc thresholds have grown does not pay):

    - `mmap_threshold`: tensors up to this size come from the heap, not from their own mmap;
    - `trim_threshold`: up to this much free memory at the top of the main heap stays mapped;
    - `top_pad`: Ray Train runs the training function on a thread of its own, whose allocations come
      from a per-thread arena made of 64 MiB heaps; glibc unmaps such a heap as soon as it is free,
      whatever the trim threshold, unless the top pad is at least a heap's size.

    -> False where there is no glibc (the call does nothing there)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: glibc on Linux
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    return all(bool(mallopt(option, value)) for option, value in
               ((m_mmap_threshold, mmap_threshold), (m_trim_threshold, trim_threshold), (m_top_pad, top_pad)))
