"""The only module that talks to the Ray Train session: ranks, the checkpoint to resume from, reports.

The training loop sees a `Session`: `RaySession` inside a Ray Train worker, `LocalSession` in one
process without Ray (unit tests, the benchmark's bare runs), with the same three operations
(`FaultySession` wraps either, for tests that lose a worker):

    with session.restore() as folder:   # a local folder of the latest checkpoint, or None
        ...
    session.report(metrics, checkpoint_dir=folder, name="step-0000010")   # every rank, same count
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator

import torch

from dydit_dist import storage

log = logging.getLogger(__name__)


class RaySession:
    """Ray Train V2: `get_context`, `get_checkpoint`, `report` (+ `get_all_reported_checkpoints`).

    `min_report_interval_s`: Ray Train's controller collects each worker's reports by polling it every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), one at a time, and a worker that reports again
    before the last one was collected waits for the next poll: 0.4-0.8 s per report with a report every
    1.3 s (debug model, 2 workers). Metrics are reported to Ray at most every 2.5 polls; TensorBoard and
    the rank-0 log line still get every window.
    """

    def __init__(self):
        import ray.train

        poll = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))
        self.min_report_interval_s = 2.5 * poll
        ctx = ray.train.get_context()
        self.world_rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    def device(self, use_gpu: bool) -> torch.device:
        if use_gpu:
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cpu")

    @contextlib.contextmanager
    def restore(self) -> Iterator[str | None]:
        """The latest checkpoint reported by this run (after a lost worker, or a resubmission with the same
        storage path and name), downloaded once per node; None for a fresh run."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield folder

    def report(self, metrics: dict, checkpoint_dir: str | None = None, name: str | None = None) -> None:
        """Metrics (rank 0's are kept) and this rank's part of a checkpoint; Ray merges the parts.

        With a checkpoint, returns only once the controller has committed it: the controller collects
        reports by polling the workers, so a worker lost right after reporting could otherwise take
        the checkpoint with it, and the restarted run would begin from an older one.
        """
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)
        if checkpoint is not None:
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


class LocalSession:
    """One process, no Ray: checkpoints are copied to `folder/{name}`, metrics kept in `self.reports`
    (every log window)."""

    def __init__(self, folder: str, device: str = "cpu"):
        import torch.distributed as dist

        self.min_report_interval_s = 0.0  # every log window
        self.folder = folder
        self.world_rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.local_rank = self.world_rank
        self._device = torch.device(device)
        self.reports: list[dict] = []

    def device(self, use_gpu: bool) -> torch.device:
        return self._device

    def checkpoints(self) -> list[str]:
        if not os.path.isdir(self.folder):
            return []
        return sorted(n for n in os.listdir(self.folder) if os.path.isdir(os.path.join(self.folder, n)))

    @contextlib.contextmanager
    def restore(self) -> Iterator[str | None]:
        names = self.checkpoints()
        yield os.path.join(self.folder, names[-1]) if names else None

    def report(self, metrics: dict, checkpoint_dir: str | None = None, name: str | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir:
            shutil.copytree(checkpoint_dir, os.path.join(self.folder, name), dirs_exist_ok=True)


class FaultySession:
    """A session that loses a worker, for tests: rank `rank` kills its own process (`os._exit`) when it
    is about to report step `step`, once per run (the object `marker`, written first, keeps the
    restarted worker from doing it again); everything else goes to `session`.

        marker = RunPaths(cfg).fault_marker(1, 4)
        launcher.build_trainer(cfg, wrap_session=functools.partial(FaultySession, rank=1, step=4, marker=marker))
    """

    def __init__(self, session, rank: int, step: int, marker: str):
        self.session, self.rank, self.step, self.marker = session, rank, step, marker

    def __getattr__(self, name: str):
        return getattr(self.session, name)

    def report(self, metrics: dict, checkpoint_dir: str | None = None, name: str | None = None) -> None:
        if self.session.world_rank == self.rank and metrics.get("step") == self.step:
            if not storage.exists(self.marker):
                storage.write_json(self.marker, {"rank": self.rank, "step": self.step, "pid": os.getpid()})
                log.warning("test fault: rank %d exits its process at the report of step %d", self.rank, self.step)
                logging.shutdown()
                os._exit(1)
        self.session.report(metrics, checkpoint_dir=checkpoint_dir, name=name)
