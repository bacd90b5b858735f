"""What a sampling runner needs of its network: the model, DyDiT's fast path, and the FLOPs counter.

The runners drive a network through the block protocol (`models.blocks`): `model.embed`, one
`Branches` object per call, `model.head`. The backend hands out the branches of a step (the static
block's own, or a DyDiT's fast branches at that timestep) and turns what each block computed into a
`flops.BlockActivity`:

    backend = Backend(model)                          # a DyDiT in eval mode goes through FastPath
    inp = model.embed(x, t, **cond)
    branches = backend.branches(timestep)             # DyDiT: that timestep's sliced weights
    tokens = run_blocks(model.blocks, inp, branches)
    records = [backend.record(i, branches) for i in range(backend.depth)]
    backend.count(records, grid)                      # MACs of that call for one sample row

For a static model this is exactly `model(x, t, **cond)`; for a DyDiT it is `FastPath(model)(x, t, **cond)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import NamedTuple

import torch

from dydit_dist import flops
from dydit_dist.dynamic import DynamicModel, FastBranches, FastPath
from dydit_dist.models import Branches, DiT, PixArt


class BlockRecord(NamedTuple):
    """What block i computed in one call; `keep` (a 0-dim tensor on the device) is the fraction of tokens
    DyDiT's token mask kept, read when counted (not per call: on a GPU that read is a host sync; nor the
    mask itself, B x N per block and step, kept for the whole batch)."""

    activity: flops.BlockActivity
    keep: torch.Tensor | None = None


class Backend:
    """A DiT, PixArt, DyDiT or DyPixArt as the runners see it (see the module docstring)."""

    def __init__(self, model, fast: FastPath | None = None):
        if not isinstance(model, DiT | PixArt):
            raise ValueError(f"expected a DiT or PixArt model (static or DyDiT), got {type(model).__name__}")
        self.model = model
        self.dynamic = isinstance(model, DynamicModel)
        if self.dynamic:
            fast = fast if fast is not None else FastPath(model)  # refuses a model in training mode
            if fast.model is not model:
                raise ValueError("the FastPath given wraps another model")
        self.fast = fast
        self.arch = flops.arch_of(model)
        self.depth = len(model.blocks)
        self.in_channels = model.in_channels
        self.num_heads = model.num_heads
        self.sdt = self.dynamic and model.router_options.sdt

    def branches(self, timestep: float) -> Branches:
        """The branches of one call at `timestep`: a DyDiT's fast branches (its sliced weights at that
        timestep, cached by FastPath), else the static blocks' own."""
        return self.fast.branches(timestep) if self.dynamic else Branches()

    def record(self, i: int, branches: Branches, *, attn: bool = True, mlp: bool = True, tokens: float = 1.0,
               extra: dict | None = None) -> BlockRecord:
        """Block i's activity in a call that used `branches`: `attn` / `mlp` False for a reused branch,
        `tokens` the fraction of tokens the block carried, `extra` named extra MACs."""
        heads = groups = 1.0
        keep = None
        extra = dict(extra or {})
        if isinstance(branches, FastBranches):
            heads = len(branches.plan.heads[i]) / self.num_heads
            groups = len(branches.plan.groups[i]) / self.num_heads
            if mlp and self.sdt:
                keep = branches.keeps[i].float().mean()
                d = self.arch.hidden_size
                extra["token_router"] = flops.mlp_macs(tokens * self._num_tokens, d, max(d // 16, 1), 1)
        act = flops.BlockActivity(heads=heads if attn else 0.0, cross_heads=1.0 if attn else 0.0,
                                  mlp=groups if mlp else 0.0, tokens=tokens, extra=extra)
        return BlockRecord(act, keep)

    def count(self, records: list[BlockRecord], grid: tuple[int, int], kept: Iterator[float] | None = None) -> float:
        """MACs of one forward pass of one sample row from its block records; `kept`: the records' `keep`
        values in order, read from the device beforehand (else each is read here)."""
        blocks = [rec.activity if rec.keep is None else
                  dataclasses.replace(rec.activity, mlp_tokens=rec.activity.tokens *
                                      (next(kept) if kept is not None else float(rec.keep)))
                  for rec in records]
        size = (grid[0] * self.arch.patch_size, grid[1] * self.arch.patch_size)
        return flops.count(self.arch, size, blocks, vae_downsample=1).total

    def set_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """Record the token grid of input x (B, C, H, W); returns it."""
        p = self.arch.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        self._num_tokens = grid[0] * grid[1]
        return grid
