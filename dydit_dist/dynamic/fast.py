"""The DyDiT inference path that computes only what the routers keep.

Head and MLP-group masks depend on the timestep alone, so for each distinct timestep a `WidthPlan`
(the active head and group indices of every block) is computed once and cached here, outside the
model's forward. The sliced weights of a block are cached by the set of units they keep (consecutive
sampling steps usually share it). Tokens are handled per batch: the kept tokens of every sample are
gathered into one ragged list, run through the sliced MLP, and scattered back.

    fast = FastPath(dydit.eval())
    eps = fast(x, t, y)                     # same values as dydit(x, t, y).out, less compute
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from dydit_dist.models import Branches, run_blocks
from dydit_dist.models.layers import modulate

from .blocks import SlicedBlock, attention_fast, mlp_fast, mlp_on_kept_tokens
from .routers import hard_mask


@dataclass(frozen=True)
class WidthPlan:
    """Active units per block at one timestep: heads[i] and groups[i] are sorted index tuples."""

    timestep: int
    heads: tuple[tuple[int, ...], ...]
    groups: tuple[tuple[int, ...], ...]

    def active_fractions(self, num_heads: int) -> list[tuple[float, float]]:
        return [(len(h) / num_heads, len(g) / num_heads) for h, g in zip(self.heads, self.groups, strict=True)]


class FastPath:
    """Callable like the static network: (x, t, **cond) -> output tensor, for a DyDiT/DyPixArt in eval mode."""

    def __init__(self, model, slices_per_block: int = 4):
        if model.training:
            raise ValueError("FastPath needs the model in eval mode (inference routing: logit > 0)")
        self.model = model
        self.slices_per_block = slices_per_block
        self._plans: dict[int, WidthPlan] = {}
        self._slices: list[OrderedDict] = [OrderedDict() for _ in model.blocks]

    @torch.no_grad()
    def plan(self, timestep: int) -> WidthPlan:
        """The active heads and groups of every block at `timestep` (cached)."""
        if timestep not in self._plans:
            model = self.model
            ref = next(model.parameters())
            t = torch.tensor([timestep], device=ref.device)
            t_emb = model.t_embedder(t)
            heads, groups = [], []
            for block in model.blocks:
                H = block.attn.num_heads
                if model.router_options.tdw:
                    hm = torch.cat([t_emb.new_ones(1, 1), hard_mask(block.attn_rate(t_emb))], dim=1)[0]
                    gm = torch.cat([t_emb.new_ones(1, 1), hard_mask(block.mlp_rate(t_emb))], dim=1)[0]
                    heads.append(tuple(hm.nonzero().flatten().tolist()))
                    groups.append(tuple(gm.nonzero().flatten().tolist()))
                else:
                    heads.append(tuple(range(H)))
                    groups.append(tuple(range(H)))
            self._plans[timestep] = WidthPlan(timestep, tuple(heads), tuple(groups))
        return self._plans[timestep]

    def sliced(self, index: int, plan: WidthPlan) -> SlicedBlock:
        """Block `index`'s weights restricted to the plan's active heads and groups (an LRU per block)."""
        heads, groups = plan.heads[index], plan.groups[index]
        cache = self._slices[index]
        key = (heads, groups)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        block = self.model.blocks[index]
        device = block.attn.qkv.weight.device
        sliced = SlicedBlock.from_block(
            block,
            torch.tensor(heads, device=device),
            torch.tensor(groups, device=device),
            self.model.num_groups,
        )
        cache[key] = sliced
        while len(cache) > self.slices_per_block:
            cache.popitem(last=False)
        return sliced

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, timestep: int | None = None, **cond) -> torch.Tensor:
        """x (B, C, H, W), t (B,) original timesteps, cond: y (and mask for PixArt) -> (B, C_out, H, W).

        Samples are grouped by timestep. A sampler that knows the batch shares one timestep passes it as
        `timestep` (every t must equal it): that skips `t.unique()`, a host sync on a GPU.
        """
        if timestep is not None:
            return self._forward_one_timestep(x, t, int(timestep), **cond)
        values = t.unique()
        if values.numel() == 1:
            return self._forward_one_timestep(x, t, int(values.item()), **cond)
        out = None
        for value in values.tolist():
            idx = (t == value).nonzero().flatten()
            part = self._forward_one_timestep(x[idx], t[idx], int(value), **_take(cond, idx))
            if out is None:
                out = part.new_empty((x.shape[0],) + part.shape[1:])
            out[idx] = part
        return out

    def _forward_one_timestep(self, x, t, timestep: int, **cond) -> torch.Tensor:
        model = self.model
        # 1. Input
        inp = model.embed(x, t, **cond)
        # 2. Blocks on the active heads, groups and tokens only
        tokens = run_blocks(model.blocks, inp, self.branches(timestep))
        # 3. Output
        return model.head(tokens, inp)

    def branches(self, timestep: int) -> FastBranches:
        """The fast branches of every block at `timestep` (its plan's sliced weights)."""
        plan = self.plan(timestep)
        return FastBranches(plan, [self.sliced(i, plan) for i in range(len(self.model.blocks))],
                            self.model.router_options.sdt)


class FastBranches(Branches):
    """A DyDiT's branches at one timestep: attention over the plan's active heads, the MLP over its
    active groups and (with SDT) the kept tokens only. `keeps[i]` is block i's token mask (B, N) bool."""

    def __init__(self, plan: WidthPlan, slices: list[SlicedBlock], sdt: bool):
        self.plan, self.slices, self.sdt = plan, slices, sdt
        self.keeps: dict[int, torch.Tensor] = {}

    def attn(self, i, block, tokens, mod):
        return attention_fast(block.attn, modulate(block.norm1(tokens), mod.shift_msa, mod.scale_msa), self.slices[i])

    def _keep(self, i, block, tokens) -> torch.Tensor | None:
        if not self.sdt:
            return None
        keep = block.token_selection(tokens) > 0  # (B, N)
        self.keeps[i] = keep
        return keep

    def mlp(self, i, block, tokens, mod):
        """The ungated branch as a full (B, N, D) tensor, 0 on the skipped tokens (what a cache holds)."""
        keep = self._keep(i, block, tokens)
        if keep is None:
            return mlp_fast(block.mlp, modulate(block.norm2(tokens), mod.shift_mlp, mod.scale_mlp), self.slices[i])
        b_idx, n_idx = keep.nonzero(as_tuple=True)  # the kept tokens of the whole batch, (K,) each
        h = block.norm2(tokens[b_idx, n_idx]) * (1 + mod.scale_mlp[b_idx, 0]) + mod.shift_mlp[b_idx, 0]
        return torch.zeros_like(tokens).index_put_((b_idx, n_idx), mlp_fast(block.mlp, h, self.slices[i]))

    def mlp_update(self, i, block, tokens, mod):
        keep = self._keep(i, block, tokens)
        return mlp_on_kept_tokens(block, tokens, keep, mod.shift_mlp, mod.scale_mlp, mod.gate_mlp, self.slices[i])


def _take(cond: dict, idx: torch.Tensor) -> dict:
    return {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}
