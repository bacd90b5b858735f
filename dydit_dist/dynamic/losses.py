"""DyDiT training objective: diffusion loss of the dynamic network, the complete-model loss (stage 1),
and the FLOPs loss `w * (mean_b F_dyn(b) / F_static - lambda_t)^2`, with stratified timesteps.

`dydit_loss_terms(model, diffusion, x0, step, cfg, **cond)` is the one function the trainer calls.
"""

from __future__ import annotations

import torch

from dydit_dist.diffusion import training_losses

from .dydit import DynamicOutput


def lambda_schedule(step: int, target: float, hold_steps: int = 100, warmup_steps: int = 1000) -> float:
    """The FLOPs target of step `step`, as the official DyDiT `train.py` computes it: linear from 1 at
    step 0 to `target` at `warmup_steps`, then `target`; held at 1 for the first `hold_steps` (so it
    jumps to the ramp's value at `hold_steps`, e.g. 0.95 at step 100 for 0.5 over 1000 steps)."""
    if step < hold_steps:
        return 1.0
    if warmup_steps <= 0:
        return target
    return 1.0 - (1.0 - target) * min(step / warmup_steps, 1.0)


def stratified_timesteps(
    batch_size: int, num_timesteps: int = 1000, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Sample i of a batch draws uniformly from quarter `i % 4` of [0, num_timesteps). (B,) long."""
    quarter = num_timesteps // 4
    starts = (torch.arange(batch_size, device=device) % 4) * quarter
    offsets = torch.randint(0, quarter, (batch_size,), generator=generator, device=device)
    return starts + offsets


def block_costs(model, num_tokens: int) -> tuple[float, float]:
    """Static MACs of one block's attention (4ND^2 + 2N^2 D) and MLP (2 * N * D * hidden) at N tokens."""
    D = model.blocks[0].attn.proj.weight.shape[0]
    hidden = model.blocks[0].mlp.fc1.weight.shape[0]
    attn = 4 * num_tokens * D * D + 2 * num_tokens * num_tokens * D
    mlp = 2 * num_tokens * D * hidden
    return float(attn), float(mlp)


def flops_ratio(model, result: DynamicOutput) -> torch.Tensor:
    """Per-sample F_dyn / F_static over the blocks, differentiable through the masks. -> (B,).

    Each block's attention is scaled by its head fraction, its MLP by group fraction x token fraction.
    In fp32 with the costs as shares of a block (the masks come out of fp16 / bf16 autocast, where a
    DiT-XL block's 1.5e9 MACs overflow fp16 and the ratio would be inf).

    The shares are those of the model's own token count: at 256 px the official code's constants
    (`loss.py`, fixed at 256 px whatever the resolution); at 512 px DiT-XL/2's attention share is 0.419
    here against their 0.357, so a lambda target means the FLOPs it says, not the official code's number.
    """
    num_tokens = result.token_masks.shape[-1]
    attn, mlp = block_costs(model, num_tokens)
    head_frac = result.head_masks.float().mean(dim=-1)  # (B, depth)
    group_frac = result.mlp_masks.float().mean(dim=-1)
    token_frac = result.token_masks.float().mean(dim=-1)
    attn_share = attn / (attn + mlp)
    return (attn_share * head_frac + (1.0 - attn_share) * group_frac * token_frac).mean(dim=1)


def dydit_loss_terms(model, diffusion, x0: torch.Tensor, step: int, dyn_cfg, t: torch.Tensor | None = None,
                     noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                     **cond) -> dict[str, torch.Tensor]:
    """Loss terms of one DyDiT training batch (model in train mode).

    x0 (B, C, H, W) latents; cond: y (B,) for DiT, or y (B, 1, L, C) and mask (B, L) for PixArt.
    Returns scalars: loss (the sum to backpropagate), diffusion, complete (stage 1, else 0), flops,
    flops_ratio (batch mean of F_dyn / F_static), lambda_t.
    """
    if t is None:
        t = stratified_timesteps(x0.shape[0], diffusion.num_timesteps, generator, x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    captured: dict[str, DynamicOutput] = {}

    def dynamic_fn(x, tt, **kw):
        # the routers' Gumbel noise from the step's generator too: per rank, and exact on resume
        captured["result"] = model(x, tt, generator=generator, **kw)
        return captured["result"].out

    learn_sigma = model.out_channels == 2 * model.in_channels
    terms = training_losses(dynamic_fn, x0, t, cond, noise, learn_sigma, diffusion=diffusion)
    diffusion_loss = terms["loss"].mean()
    ratio = flops_ratio(model, captured["result"])
    lam = lambda_schedule(step, dyn_cfg.target_lambda, dyn_cfg.lambda_hold_steps, dyn_cfg.lambda_warmup_steps)
    flops_loss = dyn_cfg.flops_loss_weight * (ratio.mean() - lam) ** 2
    if dyn_cfg.stage_at(step) == 1:
        complete = training_losses(model.static_forward, x0, t, cond, noise, learn_sigma, diffusion=diffusion)
        complete_loss = complete["loss"].mean()
    else:
        complete_loss = torch.zeros((), device=x0.device)
    return {
        "loss": diffusion_loss + complete_loss + flops_loss,
        "diffusion": diffusion_loss.detach(),
        "complete": complete_loss.detach(),
        "flops": flops_loss.detach(),
        "flops_ratio": ratio.mean().detach(),
        "lambda_t": torch.tensor(lam),
    }
