"""The DyDiT inference path that computes only what the routers keep.

Head and MLP-group masks depend on the timestep alone, so for each distinct timestep a `WidthPlan`
(the active head and group indices of every block) is computed once and cached here, outside the
model's forward. The sliced weights of a block are cached by the set of units they keep (consecutive
sampling steps usually share it). Tokens are handled per batch: the kept tokens of every sample are
gathered into one ragged list, run through the sliced MLP, and scattered back.

    fast = FastPath(dydit.eval())
    eps = fast(x, t, y=y)                   # same values as dydit(x, t, y).out, less compute
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dydit_dist.models import Branches, run_blocks
from dydit_dist.models.layers import modulate
from dydit_dist.precision import exact_fp32

from .blocks import SlicedBlock, attention_fast, mlp_fast
from .routers import hard_mask


@dataclass(frozen=True)
class WidthPlan:
    """Active units per block at one timestep: heads[i] and groups[i] are sorted index tuples."""

    timestep: float  # the original timestep the network embeds: an int, fractional under dpm-solver
    heads: tuple[tuple[int, ...], ...]
    groups: tuple[tuple[int, ...], ...]

    def active_fractions(self, num_heads: int) -> list[tuple[float, float]]:
        return [(len(h) / num_heads, len(g) / num_heads) for h, g in zip(self.heads, self.groups, strict=True)]



def _index(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An index tensor on `device`; on a GPU copied from pinned memory without blocking the host (a copy
    from ordinary memory waits for the device: a sync per block and new plan)."""
    index = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return index.to(device)
    return index.pin_memory().to(device, non_blocking=True)

def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on `device`'s kind; None when autocast is off there."""
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


class FastPath:
    """Callable like the static network: (x, t, **cond) -> output tensor, for a DyDiT/DyPixArt in eval mode."""

    def __init__(self, model, slices_per_block: int = 4):
        if model.training:
            raise ValueError("FastPath needs the model in eval mode (inference routing: logit > 0)")
        self.model = model
        self.slices_per_block = slices_per_block
        self._plans: dict[float, WidthPlan] = {}
        self._slices: list[OrderedDict] = [OrderedDict() for _ in model.blocks]
        self.ops = FastOps()

    def compile(self, token_bucket: int | None = None, **compile_kwargs) -> None:
        """Run the branches through `torch.compile`d attention and MLP kernels. With SDT, the ragged
        list of kept tokens is padded up to a multiple of `token_bucket` rows (default: an eighth of
        the tokens of one sample), so a batch size sees a handful of token counts, not one per step."""
        tokens = self.model.x_embedder.num_patches or 256  # PixArtMS: no fixed grid
        bucket = token_bucket or max(1, tokens // 8)
        self.ops = FastOps(torch.compile(attention_fast, **compile_kwargs),
                           torch.compile(mlp_fast, **compile_kwargs), bucket)

    @torch.no_grad()
    def plan(self, timestep: float) -> WidthPlan:
        """The active heads and groups of every block at `timestep` (cached), the value the network embeds:
        a fractional one (dpm-solver: 949.05) is planned as it is, not rounded (the routers may differ).

        A new timestep reads its masks from the device once, all blocks together: the plan decides
        the shapes of the sliced weights, so this read is inherent (once per timestep, never per block).
        """
        if timestep not in self._plans:
            model = self.model
            ref = next(model.parameters())
            H = model.blocks[0].attn.num_heads
            if model.router_options.tdw:
                # fp32 whatever the sampling autocast or TF32: the discrete plan must not change with precision
                # (a logit within ~1e-3 of 0 flips under TF32's 10-bit mantissa).
                with torch.autocast(ref.device.type, enabled=False), exact_fp32(ref.device):
                    t_emb = model.t_embedder(torch.full((1,), timestep, device=ref.device))  # no host copy
                    one = t_emb.new_ones(1, 1)
                    masks = [torch.cat([one, hard_mask(rate(t_emb))], dim=1)[0]
                             for block in model.blocks for rate in (block.attn_rate, block.mlp_rate)]
                rows = (torch.stack(masks) > 0).tolist()  # (2 * depth, H): the one host read
            else:
                rows = [[True] * H] * (2 * len(model.blocks))
            active = [tuple(i for i, on in enumerate(row) if on) for row in rows]
            self._plans[timestep] = WidthPlan(timestep, tuple(active[0::2]), tuple(active[1::2]))
        return self._plans[timestep]

    def sliced(self, index: int, plan: WidthPlan) -> SlicedBlock:
        """Block `index`'s weights restricted to the plan's active heads and groups (an LRU per block), in
        the autocast dtype when autocast is on: copied out once, not cast again by autocast on every call
        as the static path's leaf parameters are not (autocast caches their casts)."""
        heads, groups = plan.heads[index], plan.groups[index]
        cache = self._slices[index]
        block = self.model.blocks[index]
        device = block.attn.qkv.weight.device
        dtype = autocast_dtype(device)
        key = (heads, groups, dtype)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        sliced = SlicedBlock.from_block(block, _index(heads, device), _index(groups, device), self.model.num_groups)
        if dtype is not None and dtype != sliced.qkv_w.dtype:
            sliced = sliced.to(dtype)
        cache[key] = sliced
        while len(cache) > self.slices_per_block:
            cache.popitem(last=False)
        return sliced

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, *, timestep: float | None = None, **cond) -> torch.Tensor:
        """x (B, C, H, W), t (B,) original timesteps, cond: y (and mask for PixArt) -> (B, C_out, H, W).

        Samples are grouped by timestep. A sampler that knows the batch shares one timestep passes it as
        `timestep` (every t must equal it): that skips `t.unique()`, a host sync on a GPU.
        """
        if timestep is not None:
            return self._forward_one_timestep(x, t, timestep, **cond)
        values = t.unique()
        if values.numel() == 1:
            return self._forward_one_timestep(x, t, values.item(), **cond)
        out = None
        for value in values.tolist():
            idx = (t == value).nonzero().flatten()
            part = self._forward_one_timestep(x[idx], t[idx], value, **_take(cond, idx))
            if out is None:
                out = part.new_empty((x.shape[0],) + part.shape[1:])
            out[idx] = part
        return out

    def _forward_one_timestep(self, x, t, timestep: float, **cond) -> torch.Tensor:
        model = self.model
        # 1. Input
        inp = model.embed(x, t, **cond)
        # 2. Blocks on the active heads, groups and tokens only
        tokens = run_blocks(model.blocks, inp, self.branches(timestep))
        # 3. Output
        return model.head(tokens, inp)

    def branches(self, timestep: float) -> FastBranches:
        """The fast branches of every block at `timestep` (its plan's sliced weights)."""
        plan = self.plan(timestep)
        return FastBranches(plan, [self.sliced(i, plan) for i in range(len(self.model.blocks))],
                            self.model.router_options.sdt, self.ops)


@dataclass(frozen=True)
class FastOps:
    """The kernels of the fast branches: eager, or compiled with the kept-token count padded up to a
    multiple of `token_bucket` rows (0: no padding)."""

    attention: Callable = attention_fast
    mlp: Callable = mlp_fast
    token_bucket: int = 0

    def mlp_rows(self, h: torch.Tensor, w: SlicedBlock) -> torch.Tensor:
        """The sliced MLP on a ragged list of rows h (K, D) -> (K, D); padded to the bucket, then cut."""
        k = h.shape[0]
        pad = -k % self.token_bucket if self.token_bucket else 0
        if pad:
            h = torch.cat([h, h.new_zeros(pad, h.shape[1])])
        return self.mlp(h, w)[:k]


class FastBranches(Branches):
    """A DyDiT's branches at one timestep: attention over the plan's active heads, the MLP over its
    active groups and (with SDT) the kept tokens only. `keeps[i]` is block i's token mask (B, N) bool.

    With SDT each block reads its kept-token count from the device once (`nonzero`): the count is
    decided by the block's own router on its input and sets the shape of the MLP's work, so this
    read is inherent to computing only the kept tokens. Nothing else in a call reads the device.
    """

    def __init__(self, plan: WidthPlan, slices: list[SlicedBlock], sdt: bool, ops: FastOps | None = None):
        self.plan, self.slices, self.sdt = plan, slices, sdt
        self.ops = ops or FastOps()
        self.keeps: dict[int, torch.Tensor] = {}

    def attn(self, i, block, tokens, mod):
        h = modulate(block.norm1(tokens), mod.shift_msa, mod.scale_msa)
        return self.ops.attention(h, self.slices[i])

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
            return self.ops.mlp(modulate(block.norm2(tokens), mod.shift_mlp, mod.scale_mlp), self.slices[i])
        b_idx, n_idx = keep.nonzero(as_tuple=True)  # the kept tokens of the whole batch, (K,) each (inherent read)
        h = block.norm2(tokens[b_idx, n_idx]) * (1 + mod.scale_mlp[b_idx, 0]) + mod.shift_mlp[b_idx, 0]
        rows = self.ops.mlp_rows(h, self.slices[i])
        return torch.zeros_like(tokens, dtype=rows.dtype).index_put_((b_idx, n_idx), rows)

    def mlp_update(self, i, block, tokens, mod):
        """tokens + gate * MLP(modulate(norm2(tokens))) on the kept tokens only, the others unchanged: the kept
        tokens of the whole batch form one ragged (K, D) list, each with its own sample's gate (through
        `self.ops`: compiled and bucketed when asked; the result keeps tokens' dtype under autocast)."""
        keep = self._keep(i, block, tokens)
        h = block.norm2(tokens) * (1 + mod.scale_mlp) + mod.shift_mlp  # (B, N, D): cheaper than 3 gathers
        if keep is None:
            return tokens + mod.gate_mlp * self.ops.mlp(h, self.slices[i])
        B, N, D = tokens.shape
        flat = keep.reshape(-1).nonzero().squeeze(1)  # (K,) kept tokens of the batch (the inherent read)
        delta = mod.gate_mlp[:, 0].index_select(0, flat // N) * self.ops.mlp_rows(
            h.reshape(B * N, D).index_select(0, flat), self.slices[i])
        return tokens.reshape(B * N, D).index_add(0, flat, delta.to(tokens.dtype)).reshape(B, N, D)


def _take(cond: dict, idx: torch.Tensor) -> dict:
    return {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}
