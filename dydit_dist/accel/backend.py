"""One per-block interface over a static DiT / PixArt and a DyDiT / DyPixArt run through its fast path.

The training-free methods (caching, token pruning) drive a network block by block and branch by
branch; this is where the four networks look alike. Branch outputs are returned BEFORE their gates
(the gates are always recomputed from the current step's conditioning):

    backend = Backend(model)                        # a DyDiT in eval mode goes through FastPath
    tokens, ctx = backend.embed(x, t, cond)         # (B, N, D), model-specific context
    w = backend.step_weights(timestep)              # DyDiT: that timestep's sliced weights; else None
    for i in range(backend.depth):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = backend.modulation(i, ctx)
        tokens = tokens + gate_msa * backend.attn(i, tokens, shift_msa, scale_msa, w)
        cross = backend.cross(i, tokens, ctx)        # PixArt's ungated cross-attention; None for DiT
        tokens = tokens if cross is None else tokens + cross
        mlp, keep = backend.mlp(i, tokens, shift_mlp, scale_mlp, w)
        tokens = tokens + gate_mlp * mlp
    out = backend.head(tokens, ctx)

For a static model this is exactly `model(x, t, **cond)` (the same operations, bit for bit); for a
DyDiT it is `FastPath(model)(x, t, **cond)`: the same sliced weights (FastPath's own cache) and the
same kernels (`dynamic.blocks`), with the MLP branch of the kept tokens scattered into a zero tensor
so that it can be cached and gated like the static one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dydit_dist import flops
from dydit_dist.dynamic import DyDiT, DyPixArt, FastPath, WidthPlan
from dydit_dist.dynamic.blocks import SlicedBlock, attention_fast, mlp_fast
from dydit_dist.models import DiT, PixArt, PixArtMS


@dataclass
class StepWeights:
    """A DyDiT's width plan at one timestep and every block's sliced weights."""

    plan: WidthPlan
    blocks: list[SlicedBlock]


def flops_arch(model) -> flops.Arch:
    """The FLOPs counter's description of a DiT / PixArt (static or dynamic) instance."""
    kw = model.constructor_kwargs()
    shape = dict(depth=kw["depth"], hidden_size=kw["hidden_size"], patch_size=kw["patch_size"],
                 num_heads=kw["num_heads"], mlp_ratio=kw["mlp_ratio"], in_channels=kw["in_channels"])
    if isinstance(model, PixArt):
        family = "pixart_ms" if isinstance(model, PixArtMS) else "pixart"
        return flops.Arch(family=family, learn_sigma=kw["pred_sigma"], caption_channels=kw["caption_channels"],
                          model_max_length=kw["model_max_length"], **shape)
    return flops.Arch(family="dit", learn_sigma=kw["learn_sigma"], **shape)


class Backend:
    """Block-by-block access to a DiT, PixArt, DyDiT or DyPixArt (see the module docstring)."""

    def __init__(self, model, fast: FastPath | None = None):
        if not isinstance(model, DiT | PixArt):
            raise ValueError(f"expected a DiT or PixArt model (static or DyDiT), got {type(model).__name__}")
        self.model = model
        self.dynamic = isinstance(model, DyDiT | DyPixArt)
        if self.dynamic:
            fast = fast if fast is not None else FastPath(model)  # refuses a model in training mode
            if fast.model is not model:
                raise ValueError("the FastPath given wraps another model")
        self.fast = fast
        self.pixart = isinstance(model, PixArt)
        self.arch = flops_arch(model)
        self.depth = len(model.blocks)
        self.in_channels = model.in_channels
        self.num_heads = model.num_heads
        self.sdt = self.dynamic and model.router_options.sdt

    # 1. Input and output --------------------------------------------------------------------------

    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> tuple[torch.Tensor, object]:
        """-> tokens (B, N, D) and the context the blocks and head need (DiT: c; PixArt: PixArtInputs)."""
        if self.pixart:
            inp = self.model.embed(x, t, **cond)
            return inp.tokens, inp
        tokens, c, _ = self.model.embed(x, t, **cond)
        return tokens, c

    def head(self, tokens: torch.Tensor, ctx) -> torch.Tensor:
        if self.pixart:
            return self.model.head(tokens, ctx.t_emb, ctx.grid)
        return self.model.head(tokens, ctx)

    def step_weights(self, timestep: int) -> StepWeights | None:
        """DyDiT: the active heads and groups at `timestep` and their sliced weights (cached by FastPath)."""
        if not self.dynamic:
            return None
        plan = self.fast.plan(timestep)
        blocks = [self.fast.sliced(i, plan) for i in range(self.depth)]
        return StepWeights(plan, blocks)

    # 2. Block pieces ------------------------------------------------------------------------------

    def modulation(self, i: int, ctx) -> tuple[torch.Tensor, ...]:
        """Block i's (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each (B, 1, D)."""
        block = self.model.blocks[i]
        mods = block.modulation(ctx.t0 if self.pixart else ctx)
        return tuple(m.unsqueeze(1) for m in mods)

    def attn(self, i: int, tokens, shift, scale, w: StepWeights | None) -> torch.Tensor:
        """Ungated self-attention branch of block i: (B, N, D) -> (B, N, D)."""
        block = self.model.blocks[i]
        h = block.norm1(tokens) * (1 + scale) + shift
        if w is None:
            return block.attn(h)
        return attention_fast(block.attn, h, w.blocks[i])

    def attn_with_map(self, i: int, tokens, shift, scale, w: StepWeights | None):
        """Block i's attention branch computed head by head with an explicit softmax.

        -> (branch (B, N, D), attention map averaged over the (active) heads (B, N, N), rows = queries).
        Only one head's (B, N, N) probabilities live at a time besides the running mean.
        """
        block = self.model.blocks[i]
        attn = block.attn
        h = block.norm1(tokens) * (1 + scale) + shift
        if w is None:
            qkv_w, qkv_b, proj_w, heads = attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.num_heads
        else:
            s = w.blocks[i]
            qkv_w, qkv_b, proj_w, heads = s.qkv_w, s.qkv_b, s.proj_w, s.num_heads
        B, N, _ = h.shape
        q, k, v = F.linear(h, qkv_w, qkv_b).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
        scale_qk = 1.0 / math.sqrt(q.shape[-1])
        outs, mean = [], None
        for head in range(heads):
            probs = torch.softmax((q[:, head] @ k[:, head].transpose(1, 2)) * scale_qk, dim=-1)  # (B, N, N)
            outs.append(probs @ v[:, head])
            mean = probs if mean is None else mean + probs
        out = torch.stack(outs, dim=2).reshape(B, N, -1)  # (B, N, heads * hd), heads in order
        return F.linear(out, proj_w, attn.proj.bias), mean / heads

    def cross(self, i: int, tokens, ctx) -> torch.Tensor | None:
        """PixArt's (ungated) cross-attention branch of block i; None for a DiT."""
        if not self.pixart:
            return None
        return self.model.blocks[i].cross_attn_branch(tokens, ctx.cond, ctx.cond_mask)

    def mlp(self, i: int, tokens, shift, scale, w: StepWeights | None):
        """Ungated MLP branch of block i -> ((B, N, D), fraction of tokens kept (0-d tensor) or None).

        A DyDiT with token routing computes the MLP on its kept tokens only; the others get 0.
        """
        block = self.model.blocks[i]
        if w is None:
            return block.mlp(block.norm2(tokens) * (1 + scale) + shift), None
        sliced = w.blocks[i]
        if not self.sdt:
            return mlp_fast(block.mlp, block.norm2(tokens) * (1 + scale) + shift, sliced), None
        keep = block.token_selection(tokens) > 0  # (B, N)
        b_idx, n_idx = keep.nonzero(as_tuple=True)  # the kept tokens of the whole batch, (K,) each
        h = block.norm2(tokens[b_idx, n_idx]) * (1 + scale[b_idx, 0]) + shift[b_idx, 0]
        out = torch.zeros_like(tokens).index_put_((b_idx, n_idx), mlp_fast(block.mlp, h, sliced))
        return out, keep.float().mean()

    def block(self, i: int, tokens, ctx, w: StepWeights | None):
        """Block i with every branch computed: (B, N, D) -> ((B, N, D), kept fraction or None)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(i, ctx)
        tokens = tokens + gate_msa * self.attn(i, tokens, shift_msa, scale_msa, w)
        cross = self.cross(i, tokens, ctx)
        if cross is not None:
            tokens = tokens + cross
        mlp, keep = self.mlp(i, tokens, shift_mlp, scale_mlp, w)
        return tokens + gate_mlp * mlp, keep

    # 3. What a block computed, for the FLOPs counter ----------------------------------------------

    def activity(self, i: int, w: StepWeights | None, *, attn: bool = True, mlp: bool = True,
                 tokens: float = 1.0, keep=None, extra: dict | None = None) -> dict:
        """Keywords of block i's `flops.BlockActivity`; `keep` (a 0-d tensor) stays lazy until counted."""
        heads = groups = 1.0
        if w is not None:
            heads = len(w.plan.heads[i]) / self.num_heads
            groups = len(w.plan.groups[i]) / self.num_heads
        act = dict(heads=heads if attn else 0.0, cross_heads=1.0 if attn else 0.0,
                   mlp=groups if mlp else 0.0, tokens=tokens, extra=dict(extra or {}))
        if mlp and self.sdt:
            n = tokens * self._num_tokens
            d = self.arch.hidden_size
            act["extra"]["token_router"] = flops.mlp_macs(n, d, max(d // 16, 1), 1)
            act["keep"] = keep  # fraction of this block's tokens kept; mlp_tokens = tokens * keep when counted
        return act

    def count(self, activities: list[dict], grid: tuple[int, int]) -> float:
        """MACs of one forward pass of one sample for per-block activity keywords (see `activity`)."""
        blocks = []
        for act in activities:
            act = dict(act)
            if "keep" in act:
                keep = act.pop("keep")
                act["mlp_tokens"] = act["tokens"] * (1.0 if keep is None else float(keep))
            blocks.append(flops.BlockActivity(**act))
        size = (grid[0] * self.arch.patch_size, grid[1] * self.arch.patch_size)
        return flops.count(self.arch, size, blocks, vae_downsample=1).total

    def set_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """Record the token grid of input x (B, C, H, W); returns it."""
        p = self.arch.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        self._num_tokens = grid[0] * grid[1]
        return grid
