"""The CUDA precision switches the jobs set: TF32 for fp32 matmuls and convolutions.

    set_tf32(device, cfg.sample.tf32)      # sampling: TF32 where `sample.tf32` asks for it
    with exact_fp32(device): ...           # a DyDiT's width plan, the evaluation's features: never TF32

Nothing changes off CUDA (the CPU has no TF32).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def set_tf32(device: torch.device, enabled: bool) -> None:
    """On CUDA, let fp32 matmuls and convolutions use TF32 (`sample.tf32`); nothing elsewhere."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


@contextmanager
def exact_fp32(device: torch.device):
    """fp32 matmuls and convolutions in full precision on a CUDA device while it lasts (TF32 off, the
    setting before restored after); nothing elsewhere."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_tf32(device, False)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
