"""Training metrics: the log window of the trainer, and TensorBoard event files under `{run}/tensorboard/`.

`MetricsWindow` collects the loss terms of the steps since the last log line and times them; every
`train.log_every` steps (and at the last) it averages them over the ranks (and sums the ranks' skip
counters, `SUMMED`, in the same all-reduce), writes the progress line
(rank 0) and the TensorBoard scalars, and says whether they also go to the session.

The TensorBoard writer (rank 0) logs to a local folder; after every flush each event file is uploaded
whole (one PUT) to the run folder, so `tensorboard --logdir {run}/tensorboard` (or a synced copy) sees
every scalar. The uploads run on a thread of their own, one at a time (a flush while one runs is taken by
the next): rank 0 never makes the others wait at the next all-reduce for object storage, and a failed
upload is a warning (the scalars are observability, not state; the next upload carries them), also at
`close`. A resumed run starts a new event file next to the old ones; TensorBoard merges them by step.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time

import torch
import torch.distributed as dist

from dydit_dist import storage

log = logging.getLogger(__name__)

# Counters of `extra` summed over the ranks in `MetricsWindow.close`: each rank counts only the shards and
# samples its own readers skipped, and rank 0's metrics are the ones reported, logged and written.
SUMMED = ("data/skipped_shards", "data/skipped_samples")


class TensorBoardLog:
    """`log(step, scalars)` on rank 0; a no-op on the other ranks."""

    def __init__(self, url: str, enabled: bool):
        self.url, self.enabled = url, enabled
        self.local = None
        self.writer = None
        self._uploader: threading.Thread | None = None
        self._running = False  # an upload thread runs and will look at _stale again (both under the lock)
        self._stale = False  # flushed since the running upload read the files
        self._lock = threading.Lock()
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.local = tempfile.mkdtemp(prefix="dydit-tb-")
            self.writer = SummaryWriter(log_dir=self.local)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        with self._lock:
            if self._running:
                self._stale = True  # the running upload uploads again when it ends
                return
            self._running = True
            self._uploader = threading.Thread(target=self._upload_while_stale, name="tensorboard-upload",
                                              daemon=True)
            self._uploader.start()

    def _upload_while_stale(self) -> None:
        while True:
            with self._lock:
                self._stale = False
            self._upload()
            with self._lock:
                if not self._stale:
                    self._running = False  # under the lock: a log() after this starts a thread of its own
                    return

    def _upload(self) -> None:
        try:
            for name in os.listdir(self.local):
                with open(os.path.join(self.local, name), "rb") as f:
                    storage.write_bytes(storage.join(self.url, name), f.read())
        except Exception as e:  # noqa: BLE001 - the next upload carries the scalars; training goes on
            log.warning("TensorBoard upload to %s failed (%s); training goes on, the next upload retries",
                        self.url, e)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            if self._uploader is not None:
                self._uploader.join()
            self._upload()
            shutil.rmtree(self.local, ignore_errors=True)
            self.enabled = False


def progress_line(metrics: dict, max_steps: int) -> str:
    """One line for the driver: step, loss, FLOPs ratio vs its target, throughput, LR, the time left at
    this window's throughput."""
    parts = [f"step {metrics['step']}/{max_steps}", f"loss {metrics['loss']:.4f}"]
    if "flops_ratio" in metrics:
        parts.append(f"flops {metrics['flops_ratio']:.3f} (target {metrics['lambda_t']:.3f})")
    parts += [f"{metrics['samples_per_s']:.1f} samples/s", f"lr {metrics['lr']:.2e}"]
    if metrics.get("grad_norm") is not None:
        parts.append(f"grad norm {metrics['grad_norm']:.3f}")
    if metrics.get("data/skipped_shards"):
        parts.append(f"skipped {metrics['data/skipped_shards']:.0f} shards "
                     f"({metrics.get('data/skipped_samples', 0):.0f} samples)")
    if metrics.get("eta_s") is not None:
        parts.append(f"eta {duration(metrics['eta_s'])}")
    return " | ".join(parts)


def duration(seconds: float) -> str:
    """`2d 03h`, `3h 12m`, `4m 05s` or `12s`: the two largest units of a time span."""
    s = max(0, round(seconds))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit} {s % size // sub_size:02d}{sub}"
    return f"{s}s"


class MetricsWindow:
    """The optimizer steps since the last log: their summed loss terms, wall and CPU time, and the time
    since the session last took a report.

        window.add(terms)                                 # after every optimizer step
        if window.due(step):                              # every train.log_every steps, and at the last
            metrics, report_due = window.close(step, extra)
        window.restart()                                  # time since close() is not throughput (a checkpoint)
        window.reported()                                 # the session took a report

    A session may take reports no more often than its `min_report_interval_s` (Ray Train's controller
    collects one per poll, and a worker that reports again before that blocks until it has); the time
    since the last report rides along the ranks' all-reduce, so every rank makes the same choice and
    reports the same number of times.
    """

    def __init__(self, train_cfg, tensorboard: TensorBoardLog, device: torch.device, rank: int, world_size: int,
                 min_report_interval_s: float):
        self.log_every, self.max_steps = train_cfg.log_every, train_cfg.max_steps
        self.checkpoint_every = train_cfg.checkpoint_every
        self.checkpoint_s = 0.0  # how long the last checkpoint held the loop up (`restart`)
        self.global_batch_size = train_cfg.global_batch_size
        self.tensorboard, self.device = tensorboard, device
        self.rank, self.world_size = rank, world_size
        self.min_report_interval_s = min_report_interval_s
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.start, self.start_cpu = time.perf_counter(), time.process_time()
        self.reported_at = self.start

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.steps += 1

    def due(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.max_steps

    def close(self, step: int, extra: dict) -> tuple[dict, bool]:
        """End the window at `step` (collective): loss terms averaged over the window and the ranks,
        `extra` (learning rate, gradient norm, ...; its `SUMMED` counters summed over the ranks), throughput (samples/s of the whole job;
        cpu_s_per_step: this process's CPU seconds per step, rank 0's kept), eta_s (the steps left at this
        window's throughput, plus the checkpoints left at the last one's duration). The progress line (rank 0) and TensorBoard get them. -> (metrics, whether
        they go to the session too)."""
        now, now_cpu = time.perf_counter(), time.process_time()
        names = sorted(self.sums)
        # float64: the summed counters stay exact past float32's 2^24
        values = torch.stack([self.sums[k] / self.steps for k in names]).to(self.device, torch.float64)
        summed = [k for k in SUMMED if extra.get(k) is not None]
        values = torch.cat([values, values.new_tensor([now - self.reported_at] + [float(extra[k]) for k in summed])])
        if self.world_size > 1:  # one all-reduce: the mean of the terms and the time, the sum of the counters
            dist.all_reduce(values)
            values[: len(names) + 1] /= self.world_size
        *terms, since_report = values[: len(names) + 1].tolist()
        metrics = dict(zip(names, terms, strict=True))
        extra = {**extra, **{k: round(v) for k, v in zip(summed, values[len(names) + 1 :].tolist(), strict=True)}}
        steps_per_s = self.steps / max(now - self.start, 1e-9)
        metrics.update(step=step, **extra, samples_per_s=self.global_batch_size * steps_per_s,
                       cpu_s_per_step=(now_cpu - self.start_cpu) / self.steps,
                       eta_s=(self.max_steps - step) / steps_per_s + self.checkpoints_left(step) * self.checkpoint_s)
        if self.rank == 0:
            log.info(progress_line(metrics, self.max_steps))
        # The next window starts here, so its samples/s includes this window's logging and report.
        self.start, self.start_cpu, self.sums, self.steps = now, now_cpu, {}, 0
        self.tensorboard.log(step, {k: v for k, v in metrics.items() if k not in ("step", "eta_s") and v is not None})
        return metrics, since_report >= self.min_report_interval_s

    def checkpoints_left(self, step: int) -> int:
        """Checkpoints still to write once the window closes at `step` (`step` >= 1; its own checkpoint, if due,
        comes after the close): every `train.checkpoint_every` steps and at the last (`checkpoints.due`)."""
        if step > self.max_steps:
            return 0
        every = self.checkpoint_every
        return self.max_steps // every - (step - 1) // every + (1 if self.max_steps % every else 0)

    def restart(self) -> None:
        """After a checkpoint: its time is left out of the next window's throughput, and counted in the ETA."""
        now = time.perf_counter()
        self.checkpoint_s = now - self.start
        self.start, self.start_cpu = now, time.process_time()

    def reported(self) -> None:
        self.reported_at = time.perf_counter()
