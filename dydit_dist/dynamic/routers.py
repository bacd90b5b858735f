"""DyDiT routers and their straight-through Gumbel-sigmoid estimator.

Parameter names follow the official release (alibaba-damo-academy/DyDiT) so its checkpoints load:
`blocks.{i}.attn_rate.router`, `blocks.{i}.mlp_rate.router` (Linear D -> H-1) and
`blocks.{i}.token_selection.mlp_head.{0,2}` (Linear D -> D/16, ReLU, Linear D/16 -> 1).
"""

from __future__ import annotations

import torch
from torch import nn


def gumbel_sigmoid_st(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training estimator: `sigmoid((logit + g1 - g2) / tau)` hardened at 0.5, straight-through gradient.

    The forward value is exactly 0 or 1; the gradient is that of the soft sigmoid.
    """
    u1 = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    u2 = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    g1, g2 = _gumbel(u1), _gumbel(u2)
    soft = torch.sigmoid((logits + g1 - g2) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


def _gumbel(u: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from uniform u, kept finite at u = 0 and u = 1."""
    tiny = torch.finfo(u.dtype).tiny
    return -torch.log((-torch.log(u.clamp_min(tiny))).clamp_min(tiny))


def hard_mask(logits: torch.Tensor) -> torch.Tensor:
    """Inference rule: a unit is on exactly when its logit is above 0."""
    return (logits > 0).to(logits.dtype)


class WidthRouter(nn.Module):
    """Timestep-wise router over `num_units` heads or MLP groups; unit 0 is always on.

    forward(t_emb (B, D)) -> logits (B, num_units - 1); `mask(...)` -> (B, num_units).
    """

    def __init__(self, hidden_size: int, num_units: int, bias_init: float = 15.0):
        super().__init__()
        self.num_units = num_units
        self.router = nn.Linear(hidden_size, num_units - 1)
        # As the official `initialize_weights` (DyDiT models.py): xavier-uniform weights, then a large bias,
        # so the logits start near +bias_init and every unit on, but already depend on t.
        nn.init.xavier_uniform_(self.router.weight)
        nn.init.constant_(self.router.bias, bias_init)

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        return self.router(t_emb)


class TokenRouter(nn.Module):
    """Spatial-wise token router: forward(x (B, N, D)) -> logits (B, N); a token turned off skips the MLP."""

    def __init__(self, hidden_size: int, bias_init: float = 35.0):
        super().__init__()
        hidden = max(hidden_size // 16, 1)
        self.mlp_head = nn.Sequential(nn.Linear(hidden_size, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        # As the official `initialize_weights`: xavier-uniform weights and zero biases for both layers,
        # then the output bias at bias_init (every token starts on; the logits already depend on it).
        for linear in (self.mlp_head[0], self.mlp_head[2]):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        nn.init.constant_(self.mlp_head[2].bias, bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(x).squeeze(-1)


def width_mask(
    logits: torch.Tensor, training: bool, tau: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, U-1) logits -> (B, U) mask with unit 0 always on."""
    rest = gumbel_sigmoid_st(logits, tau, generator) if training else hard_mask(logits)
    return torch.cat([torch.ones_like(rest[:, :1]), rest], dim=1)


def token_mask(
    logits: torch.Tensor, training: bool, tau: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, N) logits -> (B, N) mask."""
    return gumbel_sigmoid_st(logits, tau, generator) if training else hard_mask(logits)
