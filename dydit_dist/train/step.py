"""One training step's math: random draws, conditioning dropout and the loss terms.

    objective = DiffusionObjective(network, cfg)          # the module DeepSpeed wraps
    g = step_generator(cfg.train.seed, rank, step, micro, device)
    inputs = draw_inputs(batch, objective, cfg, g, device)
    terms = engine(**inputs, step=step, generator=g)      # or objective(...) without DeepSpeed
    engine.backward(terms["loss"])

Every random draw of a step (timesteps, noise, label / caption dropout, the routers' Gumbel noise)
comes from one generator seeded by `SeedSequence((seed, rank, step, micro))`, the one per-rank
seed formula: a step resumed from a checkpoint draws exactly what the lost run drew, and the
dynamic and complete-model passes of DyDiT stage 1 see the same dropped labels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dydit_dist.diffusion import create_diffusion, training_losses
from dydit_dist.dynamic import dydit_loss_terms, stratified_timesteps
from dydit_dist.models import family


def step_generator(seed: int, rank: int, step: int, micro: int, device: torch.device | str) -> torch.Generator:
    """The generator of micro-batch `micro` of optimizer step `step` on `rank`."""
    state = np.random.SeedSequence([seed, rank, step, micro]).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device=device)
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


class DiffusionObjective(nn.Module):
    """The network plus its training loss, as one module (what DeepSpeed wraps).

    forward(x0 (B, C, H, W), t (B,), noise (B, C, H, W), step, generator, **cond) -> dict of scalars:
    "loss" (to backpropagate) plus, for DyDiT, "diffusion", "complete", "flops", "flops_ratio",
    "lambda_t"; for a static network "mse" and "vb". cond: y (B,) labels for DiT; y (B, 1, L, C)
    T5 features and mask (B, L) for PixArt.

    Conditioning dropout is drawn by `draw_inputs`; the network's own embedders never drop (they are
    built that way by `dydit_dist.network.build_network`; the null class / null caption stays in the
    weights for guidance).
    """

    def __init__(self, network: nn.Module, cfg):
        super().__init__()
        self.network = network
        self.method = cfg.model.method
        self.dynamic = cfg.model.dynamic
        self.diffusion = create_diffusion(num_timesteps=cfg.diffusion.num_timesteps)
        self.learn_sigma = network.out_channels == 2 * network.in_channels
        self.last_step: int | None = None  # the optimizer step of the last forward (DyDiT's stage-1 update)

    def forward(self, x0, t, noise, step: int, generator: torch.Generator | None = None, **cond):
        self.last_step = step
        if self.method == "dydit":
            return dydit_loss_terms(self.network, self.diffusion, x0, step, self.dynamic, t=t, noise=noise,
                                    generator=generator, **cond)
        terms = training_losses(self.network, x0, t, cond, noise, self.learn_sigma, diffusion=self.diffusion)
        out = {"loss": terms["loss"].mean(), "mse": terms["mse"].mean().detach(), "vb": terms["vb"].mean().detach()}
        if self.method == "flexdit":  # mean sparse tokens M = g*g of the batch
            out["sparse_tokens"] = (self.network.grids_for(t) ** 2).float().mean().to(x0.device)
        return out


def null_condition(network: nn.Module) -> torch.Tensor:
    """The null class index (DiT, a 0-d long tensor) or the learned null caption (PixArt, (L, C))."""
    embedder = network.y_embedder
    if hasattr(embedder, "num_classes"):
        if embedder.embedding_table.num_embeddings <= embedder.num_classes:
            raise ValueError("the network has no null class (model.class_dropout_prob = 0): no label dropout possible")
        return torch.tensor(embedder.num_classes)
    return embedder.y_embedding


def draw_inputs(batch: dict, network: nn.Module, cfg, generator: torch.Generator, device,
                t_range: tuple[int, int] | None = None) -> dict:
    """Model inputs of one micro-batch: x0, t, noise and the conditioning after dropout.

    batch: {"x": (B, C, H, W), "y": (B,)} or {"x", "t5": (B, 1, L, C), "t5_mask": (B, L)}.
    Timesteps are stratified over the four quarters of [0, T) for DyDiT (and with
    `diffusion.timestep_sampling: stratified`), else uniform. Labels are replaced by the null class
    with probability `model.class_dropout_prob`; captions by the null caption with probability
    `train.caption_dropout` (their mask is kept, as PixArt-alpha does).
    """
    x0 = batch["x"].to(device=device, dtype=torch.float32, non_blocking=True)
    b, num_timesteps = x0.shape[0], cfg.diffusion.num_timesteps
    if t_range is not None:  # FlexDiT: this rank's own interval, so that the batch shares one sparse grid
        t = torch.randint(t_range[0], t_range[1], (b,), generator=generator, device=device)
    elif cfg.model.method == "dydit" or cfg.diffusion.timestep_sampling == "stratified":
        t = stratified_timesteps(b, num_timesteps, generator, device)
    else:
        t = torch.randint(0, num_timesteps, (b,), generator=generator, device=device)
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    p_drop = cfg.train.caption_dropout if hasattr(network.y_embedder, "y_embedding") else cfg.model.class_dropout_prob
    drop = torch.rand(b, generator=generator, device=device) < p_drop
    null = null_condition(network) if p_drop > 0 else None
    if family(cfg.model.name) == "dit":
        y = batch["y"].to(device)
        if null is not None:
            y = torch.where(drop, null.to(device), y)
        return {"x0": x0, "t": t, "noise": noise, "y": y}
    y = batch["t5"].to(device=device, dtype=torch.float32)
    if null is not None:
        y = torch.where(drop[:, None, None, None], null.to(device=device, dtype=y.dtype), y)
    return {"x0": x0, "t": t, "noise": noise, "y": y, "mask": batch["t5_mask"].to(device)}

