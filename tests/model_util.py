"""Test helpers: non-trivial weights everywhere (the official init zeroes adaLN and the output layers), and
the MACs torch itself counts."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


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


def torch_macs(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(the MACs torch's FlopCounterMode sees while `fn()` runs without gradients, what `fn` returned). The
    counter reports 2 FLOPs per MAC and skips LayerNorm; on CPU the fused SDPA kernel is not in its
    registry, so attention runs on the math backend (bmm, which is)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        out = fn()
    return counter.get_total_flops() / 2, out
