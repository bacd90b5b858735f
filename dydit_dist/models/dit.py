"""DiT (Peebles & Xie, 2023): class-conditional latent diffusion transformer with adaLN-Zero blocks.

Parameter names and constructor keywords follow facebookresearch/DiT `models.py`, so its released
checkpoints (`DiT-XL-2-256x256.pt`) load with `strict=True`. The forward pass follows the block
protocol of `blocks.py`, which dynamic, caching and pruning methods drive without copying the model:

    inp = model.embed(x, t, y)                  # BlockInputs: tokens (B, N, D), cond = head_cond = c (B, D)
    tokens = run_blocks(model.blocks, inp)      # each block: modulation(inp), attention and MLP branches
    out = model.head(tokens, inp)               # (B, out_channels, H, W)
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import AdaLNBlock, BlockInputs, Modulation, run_blocks
from .layers import (
    Attention,
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    check_dimensions,
    get_2d_sincos_pos_embed,
    guided_halves,
    unpatchify,
    xavier_init_linears,
)
from .registry import DIT_ARCHS


class DiTBlock(AdaLNBlock):
    """Transformer block with adaLN-Zero conditioning: x (B, N, D), inp.cond = c (B, D) -> (B, N, D)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.drop_path = nn.Identity()

    def modulation(self, inp: BlockInputs) -> Modulation:
        """c (B, D) -> six (B, 1, D): the shift, scale and gate of the attention and of the MLP branch."""
        return Modulation(*self.adaLN_modulation(inp.cond).unsqueeze(1).chunk(6, dim=2))


class DiT(nn.Module):
    """Diffusion transformer on latents: x (B, C, H, W), t (B,), y (B,) -> (B, out_channels, H, W).

    `out_channels` is 2*C with `learn_sigma` (noise prediction, then the variance interpolation
    values), else C. Label `num_classes` is the null class (exists when class_dropout_prob > 0).
    """

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
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        self._constructor_kwargs = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma,
        )  # fmt: skip
        check_dimensions(input_size, patch_size, hidden_size, num_heads)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos table; a non-trainable parameter (not a buffer) so the official key is kept.
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def constructor_kwargs(self) -> dict:
        """The keywords this model was built with: `type(model)(**model.constructor_kwargs())` rebuilds it."""
        return dict(self._constructor_kwargs)

    def initialize_weights(self) -> None:
        """Official init: xavier Linear layers, N(0, 0.02) embedders, zeroed adaLN and output layers."""

        self.apply(xavier_init_linears)
        grid = self.input_size // self.patch_size
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        # Patch embedding initialized like a Linear layer (not like a Conv2d).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> BlockInputs:
        """Inputs to the first block.

        x (B, C, H, W), t (B,), y (B,) -> tokens (B, N, D) (patches + position table), cond = head_cond
        = c (B, D) = t_emb + label embedding (the adaLN condition), t_emb (B, D) = t_embedder(t) alone.
        Labels are dropped at random in training mode (classifier-free guidance training).
        """
        tokens = self.x_embedder(x) + self.pos_embed
        t_emb = self.t_embedder(t)
        c = t_emb + self.y_embedder(y, self.training)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        return BlockInputs(tokens=tokens, cond=c, t_emb=t_emb, head_cond=c, grid=grid)

    def head(self, tokens: torch.Tensor, inp: BlockInputs) -> torch.Tensor:
        """Final adaLN layer and unpatchify: tokens (B, N, D) -> (B, out_channels, H, W)."""
        return unpatchify(self.final_layer(tokens, inp.head_cond), self.patch_size, self.out_channels, *inp.grid)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # 1. Input
        inp = self.embed(x, t, y)
        # 2. Blocks
        tokens = run_blocks(self.blocks, inp)
        # 3. Output
        return self.head(tokens, inp)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guidance_channels: int | None = 3,
    ) -> torch.Tensor:
        """Classifier-free guidance in one batch: first half conditional, second half unconditional.

        x (2B, C, H, W) whose second half is ignored (the first half is used twice), y (2B,) with the
        null class in the second half. Returns (2B, out_channels, H, W) with the guided prediction in
        both halves. Like the official code, only the first `guidance_channels=3` channels are guided
        by default (the released FIDs were computed that way); `None` guides all C noise channels.
        """
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch (cond + uncond halves), got {x.shape[0]}")
        g = self.in_channels if guidance_channels is None else guidance_channels
        if not 0 < g <= self.out_channels:
            raise ValueError(f"guidance_channels={guidance_channels} outside 1..{self.out_channels}")
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        return guided_halves(model_out, cfg_scale, g)


def _factory(name: str):
    arch = DIT_ARCHS[name]

    def build(**kwargs) -> DiT:
        fixed = sorted(set(arch) & set(kwargs))
        if fixed:
            raise ValueError(f"{fixed} are fixed by the architecture {name!r} ({arch}); pass other keywords")
        return DiT(**arch, **kwargs)

    build.__name__ = "DiT_" + name.removeprefix("DiT-").replace("/", "_")
    build.__doc__ = f"{name}: DiT({', '.join(f'{k}={v}' for k, v in arch.items())}, **kwargs)."
    return build


DiT_models = {name: _factory(name) for name in DIT_ARCHS}
