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

from dydit_dist.models.dit import DiT
from dydit_dist.models.pixart import PixArt

from .blocks import attention_masked, mlp_masked
from .routers import TokenRouter, WidthRouter, token_mask, width_mask


@dataclass(frozen=True)
class RouterOptions:
    tdw: bool = True
    sdt: bool = True
    gumbel_temperature: float = 5.0
    router_bias_init: float = 15.0
    token_router_bias_init: float = 35.0

    @classmethod
    def from_config(cls, dyn) -> RouterOptions:
        """From a `config.DynamicConfig`."""
        return cls(dyn.tdw, dyn.sdt, dyn.gumbel_temperature, dyn.router_bias_init, dyn.token_router_bias_init)


@dataclass
class DynamicOutput:
    """out (B, C_out, H, W); head_masks (B, depth, H); mlp_masks (B, depth, H); token_masks (B, depth, N).

    Masks are 0/1 (straight-through in training, so gradients reach the routers through them).
    """

    out: torch.Tensor
    head_masks: torch.Tensor
    mlp_masks: torch.Tensor
    token_masks: torch.Tensor


ROUTER_KEY_PATTERNS = ("blocks.*.attn_rate.*", "blocks.*.mlp_rate.*", "blocks.*.token_selection.*")  # fnmatch


class _DynamicMixin:
    """Router attachment and the masked forward, shared by DyDiT and DyPixArt.

    Subclasses provide `_embed(x, t, **cond) -> (tokens, ctx, t_emb)`, `_mods(block, ctx)` -> six
    (B, 1, D) modulation tensors, `_between(block, tokens, ctx)` (PixArt's cross-attention) and
    `_head(tokens, ctx)`.
    """

    def _attach_routers(self, options: RouterOptions) -> None:
        self.router_options = options
        for block in self.blocks:
            D = block.attn.proj.weight.shape[0]
            H = block.attn.num_heads
            block.attn_rate = WidthRouter(D, H, options.router_bias_init)
            block.mlp_rate = WidthRouter(D, H, options.router_bias_init)
            block.token_selection = TokenRouter(D, options.token_router_bias_init)

    @property
    def num_groups(self) -> int:
        """MLP channel groups per block (= heads, as in DyDiT)."""
        return self.blocks[0].attn.num_heads

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if any(k in n for k in ("attn_rate", "mlp_rate", "token_sel"))]

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

    def _dynamic_forward(self, x, t, generator=None, **cond) -> DynamicOutput:
        # 1. Input
        tokens, ctx, t_emb = self._embed(x, t, **cond)
        o = self.router_options
        head_masks, mlp_masks, token_masks = [], [], []
        # 2. Blocks: attention over the active heads, MLP over the active groups and kept tokens
        for block in self.blocks:
            heads, groups = self.width_masks(block, t_emb, generator)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._mods(block, ctx)
            h = block.norm1(tokens) * (1 + scale_msa) + shift_msa
            tokens = tokens + gate_msa * attention_masked(block.attn, h, heads)
            tokens = self._between(block, tokens, ctx)
            if o.sdt:
                keep = token_mask(block.token_selection(tokens), self.training, o.gumbel_temperature, generator)
            else:
                keep = tokens.new_ones(tokens.shape[:2])
            h = block.norm2(tokens) * (1 + scale_mlp) + shift_mlp
            tokens = tokens + keep[..., None] * gate_mlp * mlp_masked(block.mlp, h, groups)
            head_masks.append(heads)
            mlp_masks.append(groups)
            token_masks.append(keep)
        # 3. Output
        return DynamicOutput(
            out=self._head(tokens, ctx),
            head_masks=torch.stack(head_masks, dim=1),
            mlp_masks=torch.stack(mlp_masks, dim=1),
            token_masks=torch.stack(token_masks, dim=1),
        )


class DyDiT(_DynamicMixin, DiT):
    """DiT with DyDiT routers. Same constructor keywords as `DiT` plus `router=RouterOptions(...)`.

    forward(x (B, C, H, W), t (B,), y (B,)) -> DynamicOutput (masked path);
    `static_forward(x, t, y)` is the full-width network (DiT.forward on the same weights).
    """

    def __init__(self, *args, router: RouterOptions | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._attach_routers(router or RouterOptions())

    @classmethod
    def from_static(cls, static: DiT, router: RouterOptions | None = None) -> DyDiT:
        """Add routers to a static DiT, sharing (not copying) its weights."""
        return _adopt(cls, static, router)

    def static_forward(self, x, t, y):
        return DiT.forward(self, x, t, y)

    def forward(self, x, t, y, generator: torch.Generator | None = None) -> DynamicOutput:
        return self._dynamic_forward(x, t, generator, y=y)

    def _embed(self, x, t, y):
        return self.embed(x, t, y)

    def _mods(self, block, c):
        return tuple(m.unsqueeze(1) for m in block.modulation(c))

    def _between(self, block, tokens, c):
        return tokens

    def _head(self, tokens, c):
        return self.head(tokens, c)


class DyPixArt(_DynamicMixin, PixArt):
    """PixArt-alpha with DyDiT routers on self-attention heads and the MLP; cross-attention stays full.

    forward(x, timestep, y (B, 1, L, C), mask (B, L) | None) -> DynamicOutput. The width routers act
    on `t_embedder(timestep)` (before `t_block`).
    """

    def __init__(self, *args, router: RouterOptions | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._attach_routers(router or RouterOptions())

    @classmethod
    def from_static(cls, static: PixArt, router: RouterOptions | None = None) -> DyPixArt:
        return _adopt(cls, static, router)

    def static_forward(self, x, timestep, y, mask=None):
        return PixArt.forward(self, x, timestep, y, mask)

    def forward(self, x, timestep, y, mask=None, generator: torch.Generator | None = None) -> DynamicOutput:
        return self._dynamic_forward(x, timestep, generator, y=y, mask=mask)

    def _embed(self, x, t, y, mask=None):
        inp = self.embed(x, t, y, mask)
        return inp.tokens, inp, inp.t_emb

    def _mods(self, block, inp):
        return tuple(m.unsqueeze(1) for m in block.modulation(inp.t0))

    def _between(self, block, tokens, inp):
        return tokens + block.cross_attn_branch(tokens, inp.cond, inp.cond_mask)

    def _head(self, tokens, inp):
        return self.head(tokens, inp.t_emb, inp.grid)


def _adopt(cls, static: nn.Module, router: RouterOptions | None):
    """Build `cls` on the meta device, then give it the static model's own parameters (shared, not copied)."""
    options = router or RouterOptions()
    with torch.device("meta"):
        model = cls(**static.constructor_kwargs(), router=options)
    _, unexpected = model.load_state_dict(static.state_dict(keep_vars=True), strict=False, assign=True)
    if unexpected:
        raise ValueError(f"static model has keys the dynamic one lacks: {unexpected[:5]}")
    reference = next(static.parameters())
    model._attach_routers(options)  # fresh routers, built off the meta device
    for block in model.blocks:
        for name in ("attn_rate", "mlp_rate", "token_selection"):
            getattr(block, name).to(reference.device, reference.dtype)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    still_meta += [n for n, b in model.named_buffers() if b.is_meta]
    if still_meta:
        raise ValueError(f"keys not provided by the static model: {still_meta[:5]}")
    return model.train(static.training)
