"""Random weights that make a network's output depend on its blocks (tests and benchmarks only).

A freshly initialized DiT zeroes its adaLN layers and final layer (adaLN-Zero), so every block is the
identity and the output is 0: caching or pruning would look free. `randomize_zero_init` gives those
layers random values instead: block gates of a chosen size, a unit-scale noise prediction and
variance values of 0 (the middle of the learned range, so DDPM sampling stays tame).
`randomize_routers` switches part of a DyDiT's heads, MLP groups and tokens off.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dydit_dist.models import DiT, PixArt


@torch.no_grad()
def randomize_zero_init(model, generator: torch.Generator, modulation_std: float = 0.3) -> None:
    """Re-randomize the zero-initialized layers of a DiT / PixArt (static or DyDiT) in place.

    DiT: adaLN weights such that the modulation (shift, scale, gate) has about `modulation_std`;
    PixArt: the cross-attention output projections (its adaLN-single is not zero-initialized).
    Both: the final linear layer maps to a noise prediction of about unit scale, variance values 0.
    """
    def normal_(tensor, std):
        tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * std)

    d = model.blocks[0].attn.proj.weight.shape[0]
    if isinstance(model, PixArt):
        for block in model.blocks:
            normal_(block.cross_attn.proj.weight, 1 / math.sqrt(d))
        final = model.final_layer
    elif isinstance(model, DiT):
        t = torch.tensor([0, 500, 999], device=final_device(model))
        c = model.t_embedder(t) + model.y_embedder.embedding_table.weight[:3]
        c = nn.functional.silu(c)
        std = modulation_std / (c.pow(2).mean().sqrt().item() * math.sqrt(d))
        for layer in [b.adaLN_modulation[-1] for b in model.blocks] + [model.final_layer.adaLN_modulation[-1]]:
            normal_(layer.weight, std)
        final = model.final_layer
    else:
        raise ValueError(f"expected a DiT or PixArt model, got {type(model).__name__}")
    normal_(final.linear.weight, 1 / math.sqrt(d))
    out = model.out_channels
    sigma_rows = (torch.arange(final.linear.weight.shape[0], device=final.linear.weight.device) % out) >= model.in_channels
    final.linear.weight[sigma_rows] = 0.0  # variance values 0: mid-range, DDPM stays stable


def final_device(model) -> torch.device:
    """Where the model's weights are (a model on a GPU takes its timesteps there)."""
    return next(model.parameters()).device


@torch.no_grad()
def randomize_routers(model, generator: torch.Generator, width_std: float = 2.0, token_bias: float = 0.5) -> None:
    """Random DyDiT routers: about half of the heads and MLP groups on (logits of about `width_std`,
    varying with the timestep) and most tokens through the MLP (a larger `token_bias` keeps more)."""
    t_emb = model.t_embedder(torch.linspace(0, 999, 16, device=final_device(model)))  # the model's device
    scale = width_std / (t_emb.pow(2).mean().sqrt().item() * math.sqrt(t_emb.shape[1]))
    for block in model.blocks:
        for router in (block.attn_rate.router, block.mlp_rate.router):
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * scale)
            router.bias.zero_()
        head = block.token_selection.mlp_head
        head[2].weight.copy_(torch.randn(head[2].weight.shape, generator=generator))
        head[2].bias.fill_(token_bias)
