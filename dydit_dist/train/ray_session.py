"""The only module that talks to the Ray Train session: ranks, the checkpoint to resume from, reports.

The training loop sees a `Session`: `RaySession` inside a Ray Train worker, `LocalSession` in one
process without Ray (unit tests, the benchmark's bare runs), with the same operations (`FaultySession`
wraps either, for tests that lose a worker; `FailingUpload` for tests whose upload fails):

    with session.restore() as folder:   # a local folder of the latest committed checkpoint, or None
        ...
    session.report(metrics, checkpoint_dir=folder, name="step-0000010")   # every rank, same count
    session.wait_committed()            # every checkpoint reported so far is committed (or its error raised)

`report` takes the folder over: with `background=True` (`train.async_checkpoint`) it returns at once,
uploads the folder in a thread and deletes it afterwards; a checkpoint is committed, the one a restart
resumes from, only once every rank's upload finished. An upload that fails never becomes a resume point.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

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

    def __init__(self, background: bool = True, upload_through_storage: bool = False):
        import ray.train

        self.background = background
        self.upload_through_storage = upload_through_storage  # S3: `upload_checkpoint`, not pyarrow's copy
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

    def report(self, metrics: dict, checkpoint_dir: str | None = None, name: str | None = None,
               upload_fn: Callable | None = None) -> None:
        """Metrics (rank 0's are kept) and this rank's part of a checkpoint; Ray merges the parts.

        In the background (Ray Train's ASYNC upload: one upload thread per worker, reports delivered in
        order, the local folder deleted once uploaded; metrics-only reports go the same way so that they
        do not queue behind an upload), or, without `background`, returning only once the checkpoint is
        committed. An upload that fails fails the worker: the run restarts from the last committed
        checkpoint. `upload_fn(checkpoint, name) -> Checkpoint`: Ray's `checkpoint_upload_fn` (tests).
        """
        import ray.train

        mode = ray.train.CheckpointUploadMode.ASYNC if self.background else ray.train.CheckpointUploadMode.SYNC
        if upload_fn is None and self.upload_through_storage:
            upload_fn = upload_checkpoint
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None,
                         checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=checkpoint is not None,
                         checkpoint_upload_fn=upload_fn)
        if checkpoint is not None and not self.background:
            self.wait_committed()

    def wait_committed(self) -> None:
        """Until the controller has committed every report of this worker so far: a worker lost after this
        cannot take a checkpoint with it (the controller collects reports by polling the workers, so this
        waits up to a poll interval)."""
        import ray.train

        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def upload_checkpoint(checkpoint, name: str):
    """Ray Train's `checkpoint_upload_fn` for object storage: the folder's files uploaded through `storage`
    (each whole, transient errors retried with backoff, a failure raised) to the checkpoint's place in the
    run; the persisted `Checkpoint`. Ray's default, `pyarrow.fs.copy_files` through the fsspec wrapper,
    ignores an error raised when a file is closed, which is when s3fs sends its PUT or completes its
    multipart upload: one 503 there, and the rank reported a checkpoint with a file missing, which Ray then
    committed (and the run could not resume from it)."""
    import ray.train

    context = ray.train.get_context().get_storage()
    destination = f"{context.experiment_fs_path}/{name}"
    url = f"s3://{destination}"
    for folder, _, files in os.walk(checkpoint.path):
        for file in sorted(files):
            local = os.path.join(folder, file)
            storage.upload(local, storage.join(url, os.path.relpath(local, checkpoint.path)))
    return ray.train.Checkpoint(path=destination, filesystem=context.storage_filesystem)


class LocalSession:
    """One process, no Ray: checkpoints are copied to `folder/{name}` (in a thread with `background`), each
    rank's part committed by its marker `{name}/committed/rank-{r}` once copied; metrics are kept in
    `self.reports` (every log window)."""

    def __init__(self, folder: str, device: str = "cpu", background: bool = True):
        import torch.distributed as dist

        self.min_report_interval_s = 0.0  # every log window
        self.folder = folder
        self.world_rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.local_rank = self.world_rank
        self._device = torch.device(device)
        self.reports: list[dict] = []
        self.background = background
        self.uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self.pending: list[Future] = []

    def device(self, use_gpu: bool) -> torch.device:
        return self._device

    def checkpoints(self) -> list[str]:
        """Names of the committed checkpoints (every rank's marker there), oldest first."""
        if not os.path.isdir(self.folder):
            return []
        return sorted(n for n in os.listdir(self.folder)
                      if all(os.path.exists(os.path.join(self.folder, n, "committed", f"rank-{r:05d}"))
                             for r in range(self.world_size)))

    @contextlib.contextmanager
    def restore(self) -> Iterator[str | None]:
        names = self.checkpoints()
        yield os.path.join(self.folder, names[-1]) if names else None

    def report(self, metrics: dict, checkpoint_dir: str | None = None, name: str | None = None,
               upload_fn: Callable | None = None) -> None:
        """`upload_fn(source, destination)`: copies the folder (default `shutil.copytree`; tests make it fail)."""
        self.reports.append(dict(metrics))
        if checkpoint_dir:
            self.pending.append(self.uploads.submit(self._upload, checkpoint_dir, name, upload_fn or _copy))
            if not self.background:
                self.wait_committed()

    def _upload(self, source: str, name: str, upload_fn: Callable) -> None:
        destination = os.path.join(self.folder, name)
        try:
            upload_fn(source, destination)
            os.makedirs(os.path.join(destination, "committed"), exist_ok=True)
            with open(os.path.join(destination, "committed", f"rank-{self.world_rank:05d}"), "w"):
                pass
        finally:
            shutil.rmtree(source, ignore_errors=True)

    def wait_committed(self) -> None:
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()


def _copy(source: str, destination: str) -> None:
    shutil.copytree(source, destination, dirs_exist_ok=True)


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

    def report(self, metrics: dict, checkpoint_dir: str | None = None, name: str | None = None,
               upload_fn: Callable | None = None) -> None:
        if self.session.world_rank == self.rank and metrics.get("step") == self.step:
            if not storage.exists(self.marker):
                storage.write_json(self.marker, {"rank": self.rank, "step": self.step, "pid": os.getpid()})
                log.warning("test fault: rank %d exits its process at the report of step %d", self.rank, self.step)
                logging.shutdown()
                os._exit(1)
        self.session.report(metrics, checkpoint_dir=checkpoint_dir, name=name, upload_fn=upload_fn)


class FailingUpload:
    """A session whose upload of the checkpoint of step `step` fails, once per run (the object `marker`,
    written first, keeps a restarted worker from failing again), on every rank; everything else goes to
    `session`. For tests: the failed checkpoint must never become the resume point."""

    def __init__(self, session, step: int, marker: str):
        self.session, self.step, self.marker = session, step, marker

    def __getattr__(self, name: str):
        return getattr(self.session, name)

    def report(self, metrics: dict, checkpoint_dir: str | None = None, name: str | None = None,
               upload_fn: Callable | None = None) -> None:
        if checkpoint_dir and metrics.get("step") == self.step and not storage.exists(self.marker):
            if self.session.world_rank == 0:
                storage.write_json(self.marker, {"step": self.step, "pid": os.getpid()})
            upload_fn = _fail_upload
        self.session.report(metrics, checkpoint_dir=checkpoint_dir, name=name, upload_fn=upload_fn)


def _fail_upload(*args) -> None:
    raise OSError("test fault: the checkpoint upload failed")
