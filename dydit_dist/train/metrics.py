"""Training metrics: TensorBoard event files under `{run}/tensorboard/`, written by rank 0.

The writer logs to a local folder; after every flush each event file is uploaded whole (one PUT) to
the run folder, so `tensorboard --logdir {run}/tensorboard` (or a synced copy) sees every scalar.
A resumed run starts a new event file next to the old ones; TensorBoard merges them by step.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from dydit_dist import storage

log = logging.getLogger(__name__)


class TensorBoardLog:
    """`log(step, scalars)` on rank 0; a no-op on the other ranks."""

    def __init__(self, url: str, enabled: bool):
        self.url, self.enabled = url, enabled
        self.local = None
        self.writer = None
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
        self._upload()

    def _upload(self) -> None:
        for name in os.listdir(self.local):
            with open(os.path.join(self.local, name), "rb") as f:
                storage.write_bytes(storage.join(self.url, name), f.read())

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self._upload()
            shutil.rmtree(self.local, ignore_errors=True)
            self.enabled = False


def progress_line(metrics: dict, max_steps: int) -> str:
    """One line for the driver: step, loss, FLOPs ratio vs its target, throughput, LR."""
    parts = [f"step {metrics['step']}/{max_steps}", f"loss {metrics['loss']:.4f}"]
    if "flops_ratio" in metrics:
        parts.append(f"flops {metrics['flops_ratio']:.3f} (target {metrics['lambda_t']:.3f})")
    parts += [f"{metrics['samples_per_s']:.1f} samples/s", f"lr {metrics['lr']:.2e}"]
    if metrics.get("grad_norm") is not None:
        parts.append(f"grad norm {metrics['grad_norm']:.3f}")
    return " | ".join(parts)
