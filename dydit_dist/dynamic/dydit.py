"""DyDiT: timestep-wise dynamic width (TDW) and spatial-wise dynamic tokens (SDT) on DiT and PixArt.

`DyDiT` is the static `DiT` with three routers added to every block (`attn_rate`, `mlp_rate`,
`token_selection`, the official names); the static weights, keys and `DiT.forward` (the full-width
"complete model" of stage-1 training) are unchanged. `model(x, t, y)` runs the masked path and
returns a `DynamicOutput` whose masks are explicit fields; `FastPath(model)` (see `fast.py`) runs the
same math computing only what is on.

Head h of a block is on when its router says so (head 0 always); MLP group g owns hidden channels
[g * 4D/H, (g+1) * 4D/H) of fc1/fc2 (group 0 always on); a token turned off skips the MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dydit_dist.models import Branches, DiT, PixArt, run_blocks
from dydit_dist.models.layers import modulate

from .adopt import adopt
from .blocks import attention_masked, mlp_masked
from .dydit_options import DyDiTOptions
from .routers import TokenRouter, WidthRouter, token_mask, width_mask


@dataclass
class DynamicOutput:
    """out (B, C_out, H, W); head_masks (B, depth, H); mlp_masks (B, depth, H); token_masks (B, depth, N).

    Masks are 0/1 (straight-through in training, so gradients reach the routers through them).
    """

    out: torch.Tensor
    head_masks: torch.Tensor
    mlp_masks: torch.Tensor
    token_masks: torch.Tensor


class MaskedBranches(Branches):
    """The masked (training) path of one forward pass: every head, MLP channel and token is computed,
    then multiplied by its router's mask. Collects the masks of every block, in block order."""

    def __init__(self, model: DynamicModel, t_emb: torch.Tensor, generator: torch.Generator | None):
        self.model, self.t_emb, self.generator = model, t_emb, generator
        self.head_masks: list[torch.Tensor] = []
        self.mlp_masks: list[torch.Tensor] = []
        self.token_masks: list[torch.Tensor] = []

    def attn(self, i, block, tokens, mod):
        heads, groups = self.model.width_masks(block, self.t_emb, self.generator)
        self.head_masks.append(heads)
        self.mlp_masks.append(groups)
        return attention_masked(block.attn, modulate(block.norm1(tokens), mod.shift_msa, mod.scale_msa), heads)

    def mlp_update(self, i, block, tokens, mod):
        o = self.model.router_options
        if o.sdt:
            keep = token_mask(block.token_selection(tokens), self.model.training, o.gumbel_temperature, self.generator)
        else:
            keep = tokens.new_ones(tokens.shape[:2])
        self.token_masks.append(keep)
        h = modulate(block.norm2(tokens), mod.shift_mlp, mod.scale_mlp)
        return tokens + block.drop_path(keep[..., None] * mod.gate_mlp * mlp_masked(block.mlp, h, self.mlp_masks[-1]))


class DynamicModel:
    """DyDiT routers on any model of the block protocol (`DyDiT`, `DyPixArt`), and its masked forward.

    `forward(x, t, *cond, generator=None)` -> `DynamicOutput` (the masked path); `static_forward(x, t,
    *cond)` is the full-width static network on the same weights (stage 1's "complete model").
    """

    def __init__(self, *args, router: DyDiTOptions | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._attach(router=router or DyDiTOptions())

    def _attach(self, router: DyDiTOptions) -> list[nn.Module]:
        """Fresh routers on every block (all units on); returns them."""
        self.router_options = router
        added = []
        for block in self.blocks:
            D = block.attn.proj.weight.shape[0]
            H = block.attn.num_heads
            block.attn_rate = WidthRouter(D, H, router.router_bias_init)
            block.mlp_rate = WidthRouter(D, H, router.router_bias_init)
            block.token_selection = TokenRouter(D, router.token_router_bias_init)
            added += [block.attn_rate, block.mlp_rate, block.token_selection]
        return added

    @classmethod
    def from_static(cls, static: nn.Module, router: DyDiTOptions | None = None):
        """Add routers to a static model, sharing (not copying) its weights."""
        return adopt(cls, static, router=router or DyDiTOptions())

    @property
    def num_groups(self) -> int:
        """MLP channel groups per block (= heads, as in DyDiT)."""
        return self.blocks[0].attn.num_heads

    def width_masks(
        self, block: nn.Module, t_emb: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(head mask, group mask), each (B, H); all ones without TDW."""
        o = self.router_options
        if not o.tdw:
            ones = t_emb.new_ones(t_emb.shape[0], block.attn.num_heads)
            return ones, ones
        heads = width_mask(block.attn_rate(t_emb), self.training, o.gumbel_temperature, generator)
        groups = width_mask(block.mlp_rate(t_emb), self.training, o.gumbel_temperature, generator)
        return heads, groups

    def static_forward(self, x, t, *cond, **kwargs):
        return super().forward(x, t, *cond, **kwargs)

    def forward(self, x, t, *cond, generator: torch.Generator | None = None, **kwargs) -> DynamicOutput:
        # 1. Input
        inp = self.embed(x, t, *cond, **kwargs)
        # 2. Blocks: attention over the active heads, MLP over the active groups and kept tokens
        masked = MaskedBranches(self, inp.t_emb, generator)
        tokens = run_blocks(self.blocks, inp, masked)
        # 3. Output
        return DynamicOutput(
            out=self.head(tokens, inp),
            head_masks=torch.stack(masked.head_masks, dim=1),
            mlp_masks=torch.stack(masked.mlp_masks, dim=1),
            token_masks=torch.stack(masked.token_masks, dim=1),
        )


class DyDiT(DynamicModel, DiT):
    """DiT with DyDiT routers. Same constructor keywords as `DiT` plus `router=DyDiTOptions(...)`.

    forward(x (B, C, H, W), t (B,), y (B,)) -> DynamicOutput (masked path).
    """


class DyPixArt(DynamicModel, PixArt):
    """PixArt-alpha with DyDiT routers on self-attention heads and the MLP; cross-attention stays full.

    forward(x, timestep, y (B, 1, L, C), mask (B, L) | None) -> DynamicOutput. The width routers act
    on the timestep embedding (before `t_block`).
    """
