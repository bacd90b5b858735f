"""Test helper: non-trivial weights everywhere (the official init zeroes adaLN and the output layers)."""

from __future__ import annotations

import math

import torch


def randomize_(model: torch.nn.Module, seed: int = 0, std: float | None = None) -> torch.nn.Module:
    """Overwrite every trainable tensor with Gaussian noise of `std`, or, when None, 1/sqrt(fan-in) for
    matrices and 0.1 for vectors. Returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                scale = std if std is not None else (1 / math.sqrt(p.shape[1]) if p.ndim > 1 else 0.1)
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model
