"""PixArt-alpha (Chen et al., 2023): text-to-image DiT with adaLN-single and cross-attention to T5.

Parameter names and constructor keywords follow PixArt-alpha `diffusion/model/nets/PixArt.py` and
`PixArtMS.py`, so the released `.pth` checkpoints load with `strict=True`. The official code packs
the captions of a batch into one sequence and uses an xformers block-diagonal mask; here each
sample's padded caption tokens are masked out of SDPA instead, which computes the same attention.
The forward pass follows the block protocol of `blocks.py`, like `DiT`'s:

    inp = model.embed(x, timestep, y, mask)     # tokens (B, N, D), cond = t0 (B, 6D), head_cond = t_emb (B, D),
                                                # caption (B, L, D), caption_mask (B, L)
    tokens = run_blocks(model.blocks, inp)      # self-attention, cross-attention to the caption, MLP
    out = model.head(tokens, inp)               # (B, out_channels, H, W)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import AdaLNBlock, BlockInputs, Modulation, run_blocks
from .layers import (
    Attention,
    DropPath,
    Mlp,
    PatchEmbed,
    SizeEmbedder,
    TimestepEmbedder,
    check_dimensions,
    get_2d_sincos_pos_embed,
    guided_halves,
    modulate,
    unpatchify,
    xavier_init_linears,
)
from .registry import PIXART_ARCHS


class MultiHeadCrossAttention(nn.Module):
    """Image tokens attend to caption tokens: x (B, N, D), cond (B, L, D), mask (B, L) bool -> (B, N, D)."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"hidden size {d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_linear = nn.Linear(d_model, d_model)
        self.kv_linear = nn.Linear(d_model, d_model * 2)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q = self.q_linear(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_linear(cond).view(b, -1, 2, self.num_heads, self.head_dim).unbind(2)
        attn_mask = None if mask is None else mask[:, None, None, :]  # True = attend to this caption token
        out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CaptionEmbedder(nn.Module):
    """T5 features (B, 1, L, C) -> (B, 1, L, D); `y_embedding` (L, C) is the learned null caption."""

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, token_num: int = 120):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def token_drop(self, caption: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace captions by the null caption: at random (prob. `uncond_prob`) or where force_drop_ids == 1."""
        if caption.shape[2:] != self.y_embedding.shape:
            raise ValueError(
                f"caption features {tuple(caption.shape[2:])} must be {tuple(self.y_embedding.shape)} "
                "(model_max_length, caption_channels) to be replaced by the null caption"
            )
        if force_drop_ids is None:
            drop_ids = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids[:, None, None, None], self.y_embedding.to(caption.dtype), caption)

    def forward(self, caption: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        if (train and self.uncond_prob > 0) or force_drop_ids is not None:
            caption = self.token_drop(caption, force_drop_ids)
        return self.y_proj(caption)


class T2IFinalLayer(nn.Module):
    """PixArt output layer: tokens (B, N, D), t_emb (B, D) -> (B, N, p*p*C_out), shift/scale from a table."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).unsqueeze(2).unbind(1)  # (B, 1, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PixArtBlock(AdaLNBlock):
    """Self-attention, cross-attention to the caption, MLP; adaLN-single modulation from inp.cond = t0 (B, 6D)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def modulation(self, inp: BlockInputs) -> Modulation:
        """t0 (B, 6D) -> six (B, 1, D): the shift, scale and gate of the attention and of the MLP branch."""
        t0 = inp.cond
        return Modulation(*(self.scale_shift_table[None] + t0.reshape(t0.shape[0], 6, -1)).unsqueeze(2).unbind(1))

    def cross_attn_branch(self, x: torch.Tensor, inp: BlockInputs) -> torch.Tensor:
        """Cross-attention of the (un-normalized) tokens to the caption: (B, N, D) -> (B, N, D), ungated."""
        return self.cross_attn(x, inp.caption, inp.caption_mask)


class PixArt(nn.Module):
    """PixArt-alpha at a fixed input size: x (B, C, H, W), timestep (B,), y (B, 1, L, C_cap) T5 features,
    mask (B, L) with 1 for real caption tokens -> (B, out_channels, H, W)."""

    _fixed_input_size = True
    # The sin-cos table follows input_size and lewei_scale; a checkpoint's copy is dropped on load, as the
    # official loaders do (PixArt-alpha scripts/inference.py and diffusion/utils/checkpoint.py delete
    # `pos_embed`): a 256 checkpoint fine-tunes at 512, and model.lewei_scale is what the model uses.
    RECOMPUTED_KEYS = ("pos_embed",)

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        pred_sigma: bool = True,
        drop_path: float = 0.0,
        caption_channels: int = 4096,
        lewei_scale: float = 1.0,
        model_max_length: int = 120,
    ):
        super().__init__()
        self._constructor_kwargs = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            pred_sigma=pred_sigma, drop_path=drop_path, caption_channels=caption_channels,
            lewei_scale=lewei_scale, model_max_length=model_max_length,
        )  # fmt: skip
        check_dimensions(input_size, patch_size, hidden_size, num_heads)
        self.pred_sigma = pred_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.lewei_scale = lewei_scale
        self.base_size = input_size // patch_size

        img_size = input_size if self._fixed_input_size else None
        self.x_embedder = PatchEmbed(img_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # Fixed sin-cos table for input_size; a buffer in the state dict, as upstream.
        self.register_buffer("pos_embed", torch.zeros(1, self.base_size**2, hidden_size))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, model_max_length)
        rates = [r.item() for r in torch.linspace(0, drop_path, depth, device="cpu")]
        self.blocks = nn.ModuleList(
            [PixArtBlock(hidden_size, num_heads, mlp_ratio, rates[i]) for i in range(depth)]
        )
        self.final_layer = T2IFinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def constructor_kwargs(self) -> dict:
        """The keywords this model was built with: `type(model)(**model.constructor_kwargs())` rebuilds it."""
        return dict(self._constructor_kwargs)

    def initialize_weights(self) -> None:
        """Official init: xavier Linear layers, N(0, 0.02) embedders, zeroed cross-attn output and final linear."""

        self.apply(xavier_init_linears)
        self.pos_embed.copy_(self._pos_table(self.base_size, self.base_size))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]):
            nn.init.normal_(linear.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.cross_attn.proj.weight, 0)
            nn.init.constant_(block.cross_attn.proj.bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def _pos_table(self, h: int, w: int) -> torch.Tensor:
        """(1, h*w, D) float32 sin-cos table for an h x w token grid (CPU; cached)."""
        return _pos_table(self.pos_embed.shape[-1], h, w, self.lewei_scale, self.base_size)

    def _condition(self, t_emb: torch.Tensor, data_info: dict | None) -> torch.Tensor:
        """The final layer's (B, D) condition; PixArt ignores data_info (as upstream), PixArtMS adds sizes."""
        return t_emb

    def embed(self, x, timestep, y, mask=None, data_info=None) -> BlockInputs:
        """Inputs to the first block (see `BlockInputs`). y may be (B, 1, L, C_cap) or (B, L, C_cap);
        mask (B, L), (B, 1, 1, L) or None, repeated if it covers only a divisor of the batch (CFG)."""
        b = x.shape[0]
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = self.x_embedder(x)
        if self._fixed_input_size:
            tokens = tokens + self.pos_embed
        else:
            tokens = tokens + self._pos_table(*grid).to(device=tokens.device, dtype=tokens.dtype)
        t_emb = self._condition(self.t_embedder(timestep), data_info)
        t0 = self.t_block(t_emb)
        if y.ndim == 3:
            y = y.unsqueeze(1)
        if y.ndim != 4 or y.shape[0] != b or y.shape[1] != 1:
            raise ValueError(
                f"caption features y must be (B={b}, 1, L, C) or (B, L, C), got {tuple(y.shape)}"
            )
        caption = self.y_embedder(y, self.training).squeeze(1)
        return BlockInputs(tokens=tokens, cond=t0, t_emb=t_emb, head_cond=t_emb, grid=grid, caption=caption,
                           caption_mask=_caption_mask(mask, b, caption.shape[1]))

    def head(self, tokens: torch.Tensor, inp: BlockInputs) -> torch.Tensor:
        """Final layer and unpatchify: tokens (B, N, D) -> (B, out_channels, H, W)."""
        return unpatchify(self.final_layer(tokens, inp.head_cond), self.patch_size, self.out_channels, *inp.grid)

    def forward(self, x, timestep, y, mask=None, data_info=None) -> torch.Tensor:
        # 1. Input
        inp = self.embed(x, timestep, y, mask, data_info)
        # 2. Blocks
        tokens = run_blocks(self.blocks, inp)
        # 3. Output
        return self.head(tokens, inp)

    def forward_with_cfg(self, x, timestep, y, cfg_scale, mask=None, data_info=None, guidance_channels=3):
        """Classifier-free guidance in one batch, as upstream: x (2B, ...) of which the first half is used
        twice, y (2B, 1, L, C) captions then null captions. Guides the first 3 channels by default (the
        official quirk); `guidance_channels=None` guides all C noise channels. -> (2B, out_channels, H, W)."""
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch (cond + uncond halves), got {x.shape[0]}")
        g = self.in_channels if guidance_channels is None else guidance_channels
        if not 0 < g <= self.out_channels:
            raise ValueError(f"guidance_channels={guidance_channels} outside 1..{self.out_channels}")
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), timestep, y, mask, data_info)
        return guided_halves(model_out, cfg_scale, g)


class PixArtMS(PixArt):
    """Multi-scale PixArt (the 1024px checkpoints): any input size and aspect ratio, conditioned on them.

    `data_info` must hold `img_hw` (B, 2) (or (1, 2)), the image height and width in pixels, and
    `aspect_ratio` (B,) or (B, 1), height / width. Their embeddings (`csize_embedder`, `ar_embedder`,
    D/3 per scalar) are added to the timestep embedding. The position table is computed for the actual
    token grid, scaled so that it spans the base grid (`input_size / patch_size`) divided by `lewei_scale`.
    """

    _fixed_input_size = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        hidden_size = self.pos_embed.shape[-1]
        if hidden_size % 3:
            raise ValueError(
                f"PixArtMS needs hidden_size divisible by 3 (size embeddings), got {hidden_size}"
            )
        self.csize_embedder = SizeEmbedder(hidden_size // 3)
        self.ar_embedder = SizeEmbedder(hidden_size // 3)
        for embedder in (self.csize_embedder, self.ar_embedder):
            for linear in (embedder.mlp[0], embedder.mlp[2]):
                nn.init.normal_(linear.weight, std=0.02)
                nn.init.constant_(linear.bias, 0)

    def _condition(self, t_emb: torch.Tensor, data_info: dict | None) -> torch.Tensor:
        if not data_info or "img_hw" not in data_info or "aspect_ratio" not in data_info:
            raise ValueError("PixArtMS needs data_info={'img_hw': (B, 2) pixels, 'aspect_ratio': (B, 1)}")
        b = t_emb.shape[0]
        csize = self.csize_embedder(data_info["img_hw"].to(t_emb), b)  # (B, 2D/3)
        ar = self.ar_embedder(data_info["aspect_ratio"].to(t_emb), b)  # (B, D/3)
        return t_emb + torch.cat([csize, ar], dim=1)


def _caption_mask(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """Normalize a caption mask to (B, L) bool; every sample must keep at least one token."""
    if mask is None:
        return None
    mask = mask.reshape(mask.shape[0], -1)
    if mask.shape[1] != length:
        raise ValueError(f"caption mask has {mask.shape[1]} tokens, captions have {length}")
    if mask.shape[0] != batch:
        if batch % mask.shape[0]:
            raise ValueError(f"caption mask batch {mask.shape[0]} does not divide the batch {batch}")
        mask = mask.repeat(batch // mask.shape[0], 1)
    mask = mask != 0
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every caption needs at least one unmasked token (mask row of all zeros)")
    return mask


@functools.lru_cache(maxsize=32)
def _pos_table(dim: int, h: int, w: int, lewei_scale: float, base_size: int) -> torch.Tensor:
    table = get_2d_sincos_pos_embed(dim, (h, w), lewei_scale=lewei_scale, base_size=base_size)
    return torch.from_numpy(table).float().unsqueeze(0)


def _factory(name: str):
    arch = PIXART_ARCHS[name]
    cls = PixArtMS if name.startswith("PixArtMS") else PixArt

    def build(**kwargs) -> PixArt:
        fixed = sorted(set(arch) & set(kwargs))
        if fixed:
            raise ValueError(f"{fixed} are fixed by the architecture {name!r} ({arch}); pass other keywords")
        return cls(**arch, **kwargs)

    build.__name__ = name.replace("-", "_").replace("/", "_")
    build.__doc__ = f"{name}: {cls.__name__}({', '.join(f'{k}={v}' for k, v in arch.items())}, **kwargs)."
    return build


PixArt_models = {name: _factory(name) for name in PIXART_ARCHS}
