"""Dynamic-width and dynamic-token computation for one transformer block, on the static block's weights.

Two paths with the same math:
- masked: every head, MLP channel and token is computed, then multiplied by its mask (training, and
  the reference the fast path is tested against);
- fast: only the active heads' rows of `qkv` and columns of `proj`, only the active groups' rows of
  `fc1` and columns of `fc2`, and only the kept tokens of the whole batch (a ragged (K, D) list) go
  through the MLP; their output is scattered back.

Blocks are duck-typed: `norm1, attn (qkv, proj, num_heads), norm2, mlp (fc1, act, fc2)`, plus
`cross_attn(x, y, mask)` for PixArt. Modulation tensors are passed in already shaped (B, 1, D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3 * h * hd) -> q, k, v each (B, h, N, hd)."""
    B, N, _ = qkv.shape
    qkv = qkv.reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def attention_masked(attn: nn.Module, h: torch.Tensor, head_mask: torch.Tensor | None) -> torch.Tensor:
    """Full self-attention with each head's output scaled by head_mask (B, H) before `proj`. h: (B, N, D)."""
    B, N, D = h.shape
    q, k, v = _split_heads(attn.qkv(h), attn.num_heads)
    o = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
    if head_mask is not None:
        o = o * head_mask[:, :, None, None].to(o.dtype)
    return attn.proj(o.transpose(1, 2).reshape(B, N, D))


def mlp_masked(mlp: nn.Module, h: torch.Tensor, group_mask: torch.Tensor | None) -> torch.Tensor:
    """MLP with fc1's output scaled per channel group by group_mask (B, G) before the activation."""
    hidden = mlp.fc1(h)  # (B, N, 4D)
    if group_mask is not None:
        B, G = group_mask.shape
        channel_mask = group_mask.repeat_interleave(hidden.shape[-1] // G, dim=1)  # (B, 4D)
        hidden = hidden * channel_mask[:, None, :].to(hidden.dtype)
    return mlp.fc2(mlp.act(hidden))


@dataclass
class SlicedBlock:
    """A block's weights restricted to its active heads and MLP groups (what the fast path multiplies).

    qkv_w (3*h*hd, D), qkv_b (3*h*hd,), proj_w (D, h*hd), proj_b (D,); fc1_w (g*c, D), fc1_b (g*c,),
    fc2_w (D, g*c), fc2_b (D,). `num_heads` is the active head count h. Tensors only: the fast kernels take
    no module, so `torch.compile` makes one graph for every block (torch 2.4 guards on each module passed in,
    one graph per block).
    """

    num_heads: int
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    proj_w: torch.Tensor
    proj_b: torch.Tensor | None
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor | None
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor | None

    @classmethod
    def from_block(cls, block: nn.Module, heads: torch.Tensor, groups: torch.Tensor, num_groups: int) -> SlicedBlock:
        """Copy out the rows and columns of the active `heads` (h,) and `groups` (g,) (sorted indices)."""
        attn, mlp = block.attn, block.mlp
        D = attn.proj.weight.shape[0]
        H = attn.num_heads
        hd = D // H
        head_cols = (heads[:, None] * hd + torch.arange(hd, device=heads.device)).reshape(-1)  # (h*hd,)
        qkv_rows = torch.cat([s * D + head_cols for s in range(3)])
        width = mlp.fc1.weight.shape[0] // num_groups
        group_cols = (groups[:, None] * width + torch.arange(width, device=groups.device)).reshape(-1)
        take = lambda b, idx: None if b is None else b.index_select(0, idx)  # noqa: E731
        return cls(
            num_heads=int(heads.numel()),
            qkv_w=attn.qkv.weight.index_select(0, qkv_rows),
            qkv_b=take(attn.qkv.bias, qkv_rows),
            proj_w=attn.proj.weight.index_select(1, head_cols),
            proj_b=attn.proj.bias,
            fc1_w=mlp.fc1.weight.index_select(0, group_cols),
            fc1_b=take(mlp.fc1.bias, group_cols),
            fc2_w=mlp.fc2.weight.index_select(1, group_cols),
            fc2_b=mlp.fc2.bias,
        )

    def to(self, dtype: torch.dtype) -> SlicedBlock:
        """The weights in `dtype` (what autocast would cast them to on every call: sliced copies are not the
        leaf parameters whose casts autocast caches)."""
        cast = lambda w: None if w is None else w.to(dtype)  # noqa: E731
        return SlicedBlock(self.num_heads, cast(self.qkv_w), cast(self.qkv_b), cast(self.proj_w), cast(self.proj_b),
                           cast(self.fc1_w), cast(self.fc1_b), cast(self.fc2_w), cast(self.fc2_b))


def attention_fast(h: torch.Tensor, w: SlicedBlock) -> torch.Tensor:
    """Self-attention over the active heads only. h: (B, N, D) -> (B, N, D)."""
    B, N, _ = h.shape
    q, k, v = _split_heads(F.linear(h, w.qkv_w, w.qkv_b), w.num_heads)
    o = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, hd)
    return F.linear(o.transpose(1, 2).reshape(B, N, -1), w.proj_w, w.proj_b)


def mlp_fast(h: torch.Tensor, w: SlicedBlock) -> torch.Tensor:
    """MLP over the active channel groups only (the blocks' `Mlp`: GELU, tanh approximation). h: (..., D) -> (..., D)."""
    return F.linear(F.gelu(F.linear(h, w.fc1_w, w.fc1_b), approximate="tanh"), w.fc2_w, w.fc2_b)

