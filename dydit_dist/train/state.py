"""Trainer state: what a resumed run needs beyond DeepSpeed's own checkpoint (model, optimizer, LR).

One object per rank: the optimizer step, the data stream's position, this rank's RNG states and its
EMA slice. Saved as `trainer/rank-{r:05d}.pt` inside the checkpoint and read back with
`torch.load(weights_only=True)`: tensors and plain containers only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from dydit_dist.train.ema import PartitionedEMA


def rng_state() -> dict:
    """torch (CPU and current CUDA device), numpy and python RNG states as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class TrainerState:
    """step: optimizer steps done; data: `LatentStream.state_dict()` after them; ema: this rank's slice;
    norm_skips: the updates `skip_on_grad_norm` skipped in the run's earlier workers (its own count starts at 0
    in each; 0 in checkpoints written before it was recorded)."""

    ema: PartitionedEMA
    step: int = 0
    data: dict | None = None
    norm_skips: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "data": self.data, "rng": rng_state(), "ema": self.ema.state_dict(),
                "norm_skips": self.norm_skips}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.data = state["data"]
        self.norm_skips = int(state.get("norm_skips", 0))
        set_rng_state(state["rng"])
        self.ema.load_state_dict(state["ema"])

    def save(self, path: str) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: str) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
