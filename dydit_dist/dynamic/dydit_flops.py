"""FLOPs of a DyDiT through the foundation's counter: per timestep, per sample, averaged over a schedule.

Router costs are included: the two width routers run once per image and timestep on t_emb
(D x (H-1) each), the token router on every token in every block (D x D/16 + D/16 x 1).
"""

from __future__ import annotations

import torch

from dydit_dist import flops as flops_lib
from dydit_dist.flops import BlockActivity, mlp_macs

from .dydit import DynamicOutput


def static_flops(model) -> float:
    """MACs of the static network (no routers) on one image at the model's input size."""
    a = flops_lib.arch_of(model)
    return flops_lib.count(a, model.constructor_kwargs()["input_size"], vae_downsample=1).total


def block_activity(model, head_frac: float, group_frac: float, token_frac: float) -> BlockActivity:
    """One DyDiT block's activity, router costs included."""
    D = model.blocks[0].attn.proj.weight.shape[0]
    H = model.blocks[0].attn.num_heads
    N = model.x_embedder.num_patches if model.x_embedder.num_patches else model.pos_embed.shape[1]
    extra = {}
    if model.router_options.tdw:
        extra["width_router"] = 2 * mlp_macs(1, D, H - 1)
    if model.router_options.sdt:
        extra["token_router"] = mlp_macs(N, D, max(D // 16, 1), 1)
    return BlockActivity(heads=head_frac, mlp=group_frac, mlp_tokens=token_frac, extra=extra)


def dynamic_flops(model, head_frac, group_frac, token_frac) -> float:
    """MACs of one image given per-block fractions (sequences of length depth)."""
    activity = [block_activity(model, float(h), float(g), float(k))
                for h, g, k in zip(head_frac, group_frac, token_frac, strict=True)]
    a = flops_lib.arch_of(model)
    return flops_lib.count(a, model.constructor_kwargs()["input_size"], activity, vae_downsample=1).total


def flops_of_output(model, result: DynamicOutput) -> torch.Tensor:
    """(B,) MACs per sample of a forward pass, from its masks."""
    heads = result.head_masks.float().mean(-1)
    groups = result.mlp_masks.float().mean(-1)
    tokens = result.token_masks.float().mean(-1)
    return torch.tensor([dynamic_flops(model, heads[b], groups[b], tokens[b]) for b in range(heads.shape[0])])
