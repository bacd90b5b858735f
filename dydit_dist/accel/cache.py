"""Per-block feature caching: EB-Cache (calibrated schedule + exposure-bias correction) and FORA.

Each block's attention-branch and MLP-branch outputs are cached BEFORE their adaLN gates; the gates
(and the block's modulation) are recomputed from the current step's conditioning every step. The
state of a step (a character of the schedule) says what is recomputed:

    0  both branches computed (and cached)
    1  attention reused, MLP recomputed
    2  both reused
    3  attention recomputed, MLP reused (in the paper, missing from the released code)

PixArt's cross-attention branch follows the self-attention branch (computed and cached with it).
A reused branch is always the one of the last step that computed it. On a DyDiT the computed
branches go through its fast path (active heads, groups and tokens only); a cached MLP branch keeps
the token routing of the step that computed it.

Exposure-bias correction multiplies the predicted noise (the first C output channels; not the
learned variance values) by b(t) at every step, as the released code does with its 1 / 0.965.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dydit_dist.models import Branches, run_blocks

from .backend import Backend
from .base import Runner
from .options import EBCacheOptions, FORAOptions, eps_scale_at, parse_eps_scale

ATTN_FRESH = {0: True, 1: False, 2: False, 3: True}
MLP_FRESH = {0: True, 1: True, 2: False, 3: False}


@dataclass
class BlockCache:
    """One block's ungated branch outputs, each (B, N, D); `cross` is PixArt's cross-attention (else None)."""

    attn: torch.Tensor
    cross: torch.Tensor | None
    mlp: torch.Tensor


class CachingBranches(Branches):
    """One call in a cache state: the fresh branches come from `inner` (static or a DyDiT's fast
    branches) and are cached; the others are read from `cache`. Builds the updated cache in `new`
    (block i's entry is created by its attention branch, then completed by the other two)."""

    def __init__(self, inner: Branches, state: int, cache: list[BlockCache] | None):
        self.inner, self.cache = inner, cache
        self.attn_fresh, self.mlp_fresh = ATTN_FRESH[state], MLP_FRESH[state]
        self.new: list[BlockCache] = []

    def attn(self, i, block, tokens, mod):
        attn = self.inner.attn(i, block, tokens, mod) if self.attn_fresh else self.cache[i].attn
        self.new.append(BlockCache(attn, None, None))
        return attn

    def cross(self, i, block, tokens, inp):
        cross = self.inner.cross(i, block, tokens, inp) if self.attn_fresh else self.cache[i].cross
        self.new[i].cross = cross
        return cross

    def mlp(self, i, block, tokens, mod):
        mlp = self.inner.mlp(i, block, tokens, mod) if self.mlp_fresh else self.cache[i].mlp
        self.new[i].mlp = mlp
        return mlp


def forward_with_cache(backend: Backend, x, t, cond, timestep: float, state: int, cache: list[BlockCache] | None):
    """One model call in cache `state`.

    Returns (output (B, C_out, H, W), the updated cache (a new list; tensors are shared, never
    written in place), per-block `BlockRecord`s for the FLOPs counter). `cache` is not modified, so a
    caller may try several states from the same cache (calibration does).
    """
    if cache is None and not (ATTN_FRESH[state] and MLP_FRESH[state]):
        raise ValueError(f"cache state {state} reuses branches but nothing is cached yet (the first step must be 0)")
    if cache is not None and cache[0].attn.shape[0] != x.shape[0]:
        raise ValueError(f"the cache holds a batch of {cache[0].attn.shape[0]} rows, this call has {x.shape[0]}; "
                         "call runner.begin(num_steps) before every batch")
    model = backend.model
    # 1. Input
    inp = model.embed(x, t, **cond)
    inner = backend.branches(timestep) if ATTN_FRESH[state] or MLP_FRESH[state] else Branches()  # DyDiT slices
    caching = CachingBranches(inner, state, cache)
    # 2. Blocks: computed branches refresh the cache, the others read it
    tokens = run_blocks(model.blocks, inp, caching)
    records = [backend.record(i, inner, attn=caching.attn_fresh, mlp=caching.mlp_fresh) for i in range(backend.depth)]
    # 3. Output
    return model.head(tokens, inp), caching.new, records


def correct_eps(out: torch.Tensor, channels: int, factor: float) -> torch.Tensor:
    """Multiply the predicted noise (the first `channels` channels of out (B, C_out, ...)) by `factor`."""
    if factor == 1.0:
        return out
    return torch.cat([out[:, :channels] * factor, out[:, channels:]], dim=1)


class CachingRunner(Runner):
    """EB-Cache or FORA over any backend (see the module docstring)."""

    needs_steps = True

    def __init__(self, backend: Backend, options: EBCacheOptions | FORAOptions, method: str = "eb_cache",
                 num_train_timesteps: int = 1000):
        super().__init__(backend)
        self.method = method
        self.options = options
        self.eps_knots = parse_eps_scale(options.eps_scale)
        self.num_train_timesteps = num_train_timesteps
        self.schedule: str | None = None
        self._schedules: dict[int, str] = {}  # by step count: a table is read once, not every batch
        self._cache: list[BlockCache] | None = None

    def compile(self, **compile_kwargs) -> None:
        """Compiles DyDiT's fast branches (the only computed branches with a kernel of their own)."""
        if not self.backend.dynamic:
            super().compile(**compile_kwargs)
        self.backend.fast.compile(**compile_kwargs)

    def reset(self) -> None:
        if self.num_steps not in self._schedules:
            self._schedules[self.num_steps] = self.options.schedule_for(self.num_steps)
        self.schedule = self._schedules[self.num_steps]
        self._cache = None

    def eps_factor(self, timestep: float) -> float:
        """b(t), the exposure-bias correction at original timestep t (1.0 without correction)."""
        return eps_scale_at(self.eps_knots, timestep / (self.num_train_timesteps - 1))

    def forward(self, x, t, cond):
        state = int(self.schedule[self.step])
        out, self._cache, records = forward_with_cache(self.backend, x, t, cond, self.timestep, state, self._cache)
        return correct_eps(out.float(), self.backend.in_channels, self.eps_factor(self.timestep)), records

    @property
    def full_steps(self) -> int:
        """Steps of the current schedule that compute both branches."""
        return self.schedule.count("0")
