"""The block protocol every model family implements, and the one adaLN block recurrence.

A model family provides `embed(x, t, **cond) -> BlockInputs`, blocks that are `AdaLNBlock`s (their
`modulation`, and a `cross_attn_branch` where they attend to a caption), and `head(tokens, inp)`:

    inp = model.embed(x, t, y)                           # BlockInputs: tokens (B, N, D), conditions
    tokens = run_blocks(model.blocks, inp)               # the static branches
    out = model.head(tokens, inp)                        # (B, out_channels, H, W)

`block_forward` is the only place that spells out a block. What a method changes is the branch it
changes: a `Branches` subclass overrides `attn`, `cross`, `mlp` or `mlp_update` (DyDiT's masked and
fast paths, feature caching, AT-EDM's scoring layer), or `enter` (FlexDiT's pooling and merging of
the tokens a block works on). `i` is the block's index in the model, for branches that keep per-block
state (slices, caches, masks).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .layers import modulate


class BlockInputs(NamedTuple):
    """What `embed` returns: the first block's tokens and the conditions of every block and the head."""

    tokens: torch.Tensor  # (B, N, D) patches + position table
    cond: torch.Tensor  # adaLN input of every block: DiT c = t_emb + label (B, D); PixArt t0 (B, 6D)
    t_emb: torch.Tensor  # (B, D) timestep embedding alone (DyDiT's width routers read it)
    head_cond: torch.Tensor  # (B, D) condition of the final layer: DiT c; PixArt t_emb (+ sizes)
    grid: tuple[int, int]  # (H/p, W/p) token grid
    caption: torch.Tensor | None = None  # (B, L, D) projected caption tokens (PixArt)
    caption_mask: torch.Tensor | None = None  # (B, L) bool, True = real caption token; None = all real


class Modulation(NamedTuple):
    """A block's adaLN shifts, scales and gates, each (B, 1, D) (broadcast over the tokens)."""

    shift_msa: torch.Tensor
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor
    shift_mlp: torch.Tensor
    scale_mlp: torch.Tensor
    gate_mlp: torch.Tensor


class AdaLNBlock(nn.Module):
    """A transformer block with adaLN modulation: `norm1`, `attn`, `norm2`, `mlp`, `drop_path`.

    Subclasses set those modules (with the official parameter names) and implement `modulation`;
    a block that attends to a caption overrides `cross_attn_branch`.
    """

    drop_path: nn.Module

    def modulation(self, inp: BlockInputs) -> Modulation:
        raise NotImplementedError

    def attn_branch(self, x: torch.Tensor, mod: Modulation) -> torch.Tensor:
        """Self-attention on the modulated, normalized tokens, before gating: (B, N, D) -> (B, N, D)."""
        return self.attn(modulate(self.norm1(x), mod.shift_msa, mod.scale_msa))

    def cross_attn_branch(self, x: torch.Tensor, inp: BlockInputs) -> torch.Tensor | None:
        """Ungated cross-attention to the caption, (B, N, D) -> (B, N, D); None for a block without one."""
        return None

    def mlp_branch(self, x: torch.Tensor, mod: Modulation) -> torch.Tensor:
        """MLP on the modulated, normalized tokens, before gating: (B, N, D) -> (B, N, D)."""
        return self.mlp(modulate(self.norm2(x), mod.shift_mlp, mod.scale_mlp))

    def forward(self, x: torch.Tensor, inp: BlockInputs) -> torch.Tensor:
        return block_forward(self, 0, x, inp, STATIC)


class Branches:
    """How the branches of a block are computed; this base class computes the static block's own."""

    def enter(self, i: int, block: AdaLNBlock, tokens: torch.Tensor, mod: Modulation) -> torch.Tensor:
        """The tokens block i works on (its residual stream): the incoming ones."""
        return tokens

    def attn(self, i: int, block: AdaLNBlock, tokens: torch.Tensor, mod: Modulation) -> torch.Tensor:
        """Ungated self-attention branch of block i: (B, N, D) -> (B, N, D) (or (B, 1, D), broadcast)."""
        return block.attn_branch(tokens, mod)

    def cross(self, i: int, block: AdaLNBlock, tokens: torch.Tensor, inp: BlockInputs) -> torch.Tensor | None:
        """Ungated cross-attention branch of block i, or None (no caption)."""
        return block.cross_attn_branch(tokens, inp)

    def mlp(self, i: int, block: AdaLNBlock, tokens: torch.Tensor, mod: Modulation) -> torch.Tensor:
        """Ungated MLP branch of block i: (B, N, D) -> (B, N, D)."""
        return block.mlp_branch(tokens, mod)

    def mlp_update(self, i: int, block: AdaLNBlock, tokens: torch.Tensor, mod: Modulation) -> torch.Tensor:
        """tokens + gated MLP branch; overridden where the update is cheaper than the whole branch."""
        return tokens + block.drop_path(mod.gate_mlp * self.mlp(i, block, tokens, mod))


STATIC = Branches()


def block_forward(
    block: AdaLNBlock, i: int, tokens: torch.Tensor, inp: BlockInputs, branches: Branches = STATIC
) -> torch.Tensor:
    """Block i of a model: (B, N, D) -> (B, N', D) (N' = N unless `branches.enter` changes the tokens)."""
    mod = block.modulation(inp)
    tokens = branches.enter(i, block, tokens, mod)
    tokens = tokens + block.drop_path(mod.gate_msa * branches.attn(i, block, tokens, mod))
    cross = branches.cross(i, block, tokens, inp)
    if cross is not None:
        tokens = tokens + cross
    return branches.mlp_update(i, block, tokens, mod)


def run_blocks(
    blocks: nn.ModuleList, inp: BlockInputs, branches: Branches = STATIC, tokens: torch.Tensor | None = None,
    start: int = 0, stop: int | None = None,
) -> torch.Tensor:
    """Blocks start .. stop-1 on `tokens` (default: `inp.tokens`) -> the last block's tokens."""
    tokens = inp.tokens if tokens is None else tokens
    for i in range(start, len(blocks) if stop is None else stop):
        tokens = block_forward(blocks[i], i, tokens, inp, branches)
    return tokens
