"""Building blocks shared by DiT and PixArt, with the parameter names of the official code.

Follows facebookresearch/DiT `models.py` (which takes `PatchEmbed`, `Attention` and `Mlp` from timm)
and PixArt-alpha `PixArt_blocks.py`, so that released checkpoints load with `strict=True`.
Shapes: B batch, N image tokens, D hidden size, L caption tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (B, N, D), shift and scale (B, 1, D) -> (B, N, D)."""
    return x * (1 + scale) + shift


def check_dimensions(input_size: int, patch_size: int, hidden_size: int, num_heads: int) -> None:
    """Constructor checks shared by DiT and PixArt; ValueError naming the keyword that does not fit."""
    if input_size % patch_size:
        raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by 4 (2-D sin-cos position table)")


def xavier_init_linears(module: nn.Module) -> None:
    """The official DiT / PixArt basic init, for `model.apply`: xavier-uniform Linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)


def guided_halves(model_out: torch.Tensor, cfg_scale: float, guided_channels: int) -> torch.Tensor:
    """Classifier-free guidance of a doubled batch's output, as the official `forward_with_cfg`.

    model_out (2B, C_out, H, W), conditional rows first: the first `guided_channels` channels become
    uncond + s * (cond - uncond) in both halves; the rest (variance values) are kept per row.
    """
    eps, rest = model_out[:, :guided_channels], model_out[:, guided_channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in GLIDE and DiT.

    t (B,) -> (B, dim): `[cos(t * f_i), sin(t * f_i)]` with `f_i = max_period ** (-i / half)`,
    i = 0 .. half-1 (no "downscale shift", unlike diffusers' `Timesteps(downscale_freq_shift=1)`).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """Timesteps (B,) -> (B, D): sinusoidal features of size 256, then Linear-SiLU-Linear (`mlp.0`, `mlp.2`)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    timestep_embedding = staticmethod(timestep_embedding)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class SizeEmbedder(TimestepEmbedder):
    """PixArtMS size conditioning: s (B, K) -> (B, K * D'), each of the K scalars embedded like a timestep."""

    def forward(self, s: torch.Tensor, batch_size: int) -> torch.Tensor:
        if s.ndim == 1:
            s = s[:, None]
        if s.ndim != 2:
            raise ValueError(f"size condition must be (B,) or (B, K), got shape {tuple(s.shape)}")
        if s.shape[0] != batch_size:
            if batch_size % s.shape[0]:
                raise ValueError(f"size condition has batch {s.shape[0]}, which does not divide {batch_size}")
            s = s.repeat(batch_size // s.shape[0], 1)
        b, k = s.shape
        emb = super().forward(s.reshape(b * k))  # (B*K, D')
        return emb.reshape(b, k * emb.shape[-1])


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D); row `num_classes` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class: at random (prob. `dropout_prob`), or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> tokens (B, H/p * W/p, D) by a strided convolution `proj`.

    With `img_size` set (DiT, PixArt) the input must have that size, because the fixed position table
    was built for it; with `img_size=None` (PixArtMS) any multiple of the patch size is accepted.
    """

    def __init__(
        self, img_size: int | None, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True
    ):
        super().__init__()
        self.img_size = img_size
        self.patch_size = (patch_size, patch_size)
        self.grid_size = None if img_size is None else img_size // patch_size
        self.num_patches = None if img_size is None else self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size[0]
        if self.img_size is not None and (h, w) != (self.img_size, self.img_size):
            raise ValueError(
                f"input is {h}x{w} but the model was built for input_size={self.img_size} "
                "(its position embedding is fixed); build the model with the matching input_size"
            )
        if h % p or w % p:
            raise ValueError(f"input size {h}x{w} is not a multiple of patch_size={p}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention (timm layout): `qkv` Linear D -> 3D, `proj` Linear D -> D. (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, Dh) each
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two-layer MLP `fc1` -> GELU(tanh) -> `fc2`: (..., D_in) -> (..., D_out)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability p (rescaling the rest)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class FinalLayer(nn.Module):
    """DiT output layer: tokens (B, N, D), c (B, D) -> (B, N, p*p*C_out), adaLN shift/scale from c."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=2)  # (B, 1, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, h: int | None = None, w: int | None = None):
    """Tokens (B, h*w, p*p*C) -> image (B, C, h*p, w*p); h = w = sqrt(N) when not given."""
    if h is None or w is None:
        h = w = math.isqrt(x.shape[1])
    if h * w != x.shape[1]:
        raise ValueError(f"{x.shape[1]} tokens do not form a {h}x{w} grid")
    p = patch_size
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)


def get_2d_sincos_pos_embed(
    embed_dim: int,
    grid_size: int | tuple[int, int],
    cls_token: bool = False,
    extra_tokens: int = 0,
    lewei_scale: float = 1.0,
    base_size: int | None = None,
) -> np.ndarray:
    """Fixed 2-D sin-cos position table (MAE/DiT), numpy float64, shape (h*w, D) (+ extra zero rows).

    grid_size is an int (square) or (h, w). Rows are in raster order (row-major over h, w). The first
    D/2 channels encode the column (w) coordinate and the last D/2 the row coordinate, as upstream.
    DiT: `base_size=None`, coordinates 0 .. n-1. PixArt: coordinates `i / (n / base_size) / lewei_scale`,
    so a grid of any size spans the range of the base grid.
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid_h = np.arange(gh, dtype=np.float32)
    grid_w = np.arange(gw, dtype=np.float32)
    if base_size is not None:
        grid_h = grid_h / (gh / base_size) / lewei_scale
        grid_w = grid_w / (gw / base_size) / lewei_scale
    cols, rows = np.meshgrid(grid_w, grid_h)  # each (h, w); w goes first, as upstream
    emb = np.concatenate(
        [_1d_sincos(embed_dim // 2, cols.reshape(-1)), _1d_sincos(embed_dim // 2, rows.reshape(-1))], axis=1
    )
    if cls_token and extra_tokens > 0:
        emb = np.concatenate([np.zeros([extra_tokens, embed_dim]), emb], axis=0)
    return emb


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """Positions (M,) -> (M, embed_dim): [sin(pos * w_i), cos(pos * w_i)], w_i = 10000 ** (-2i / embed_dim)."""
    if embed_dim % 2:
        raise ValueError(
            f"sin-cos position embedding needs a hidden size divisible by 4, got {2 * embed_dim}"
        )
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
