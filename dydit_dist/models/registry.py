"""Model variants as data: a name maps to the constructor keywords of the official code.

`DiT_models` follows facebookresearch/DiT (`DiT-XL/2` ... `DiT-S/8`) plus a tiny `debug` flavour;
`PixArt_models` follows PixArt-alpha (`PixArt-XL/2`, `PixArtMS-XL/2`) plus `PixArt-debug` and
`PixArtMS-debug`; `SDXL_ARCHS` holds diffusers `UNet2DConditionModel` configs (family "sdxl": the
released Stable Diffusion XL base UNet, sampled through diffusers' `StableDiffusionXLPipeline`, plus the
SD-XL-shaped `SDXL-small` of the CPU benchmark and the tiny `SDXL-debug` of the tests).
The entries are architecture only; `input_size`, `num_classes`, `learn_sigma` and friends are
given by the caller (the config), with the official defaults.
"""

from __future__ import annotations

DIT_ARCHS: dict[str, dict] = {
    "DiT-XL/2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
    "DiT-XL/4": dict(depth=28, hidden_size=1152, patch_size=4, num_heads=16),
    "DiT-XL/8": dict(depth=28, hidden_size=1152, patch_size=8, num_heads=16),
    "DiT-L/2": dict(depth=24, hidden_size=1024, patch_size=2, num_heads=16),
    "DiT-L/4": dict(depth=24, hidden_size=1024, patch_size=4, num_heads=16),
    "DiT-L/8": dict(depth=24, hidden_size=1024, patch_size=8, num_heads=16),
    "DiT-B/2": dict(depth=12, hidden_size=768, patch_size=2, num_heads=12),
    "DiT-B/4": dict(depth=12, hidden_size=768, patch_size=4, num_heads=12),
    "DiT-B/8": dict(depth=12, hidden_size=768, patch_size=8, num_heads=12),
    "DiT-S/2": dict(depth=12, hidden_size=384, patch_size=2, num_heads=6),
    "DiT-S/4": dict(depth=12, hidden_size=384, patch_size=4, num_heads=6),
    "DiT-S/8": dict(depth=12, hidden_size=384, patch_size=8, num_heads=6),
    # Runs in well under a second on CPU; 4 heads so dynamic width has something to switch off.
    "debug": dict(depth=4, hidden_size=64, patch_size=2, num_heads=4),
}

PIXART_ARCHS: dict[str, dict] = {
    "PixArt-XL/2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
    "PixArtMS-XL/2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
    "PixArt-debug": dict(depth=4, hidden_size=64, patch_size=2, num_heads=4),
    # PixArtMS splits D into three size embeddings, so its hidden size must be divisible by 3.
    "PixArtMS-debug": dict(depth=4, hidden_size=96, patch_size=2, num_heads=4),
}

# The UNet2DConditionModel keywords of stabilityai/stable-diffusion-xl-base-1.0 (unet/config.json; the
# keys left at diffusers' defaults omitted): 3 stages, attention in the last two, 1 / 2 / 10 transformer
# layers per attention block, cross-attention on the two text encoders' 768 + 1280 features, and the
# "text_time" added conditioning (pooled 1280 + 6 x 256 size / crop embeddings = 2816).
_SDXL_COMMON = dict(
    in_channels=4, out_channels=4, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn", addition_embed_type="text_time", use_linear_projection=True,
)
SDXL_ARCHS: dict[str, dict] = {
    "SDXL-base-1.0": dict(
        _SDXL_COMMON, sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2,
        transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
    ),
    # The CPU benchmark's UNet: SD-XL's shape (no attention in stage 0, deeper blocks below) at a width
    # where a 64 x 64 latent forward of 4 rows takes a few seconds on one CPU thread.
    "SDXL-small": dict(
        _SDXL_COMMON, sample_size=64, block_out_channels=[64, 128, 256], layers_per_block=2,
        transformer_layers_per_block=[1, 2, 4], attention_head_dim=[2, 4, 8], cross_attention_dim=64,
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, norm_num_groups=32,
    ),
    # The tests' UNet: two stages (attention in the second, 2 layers deep, so that pruning has a layer
    # to act on), text features 32 + 32, pooled 32 + 6 x 8 = 80.
    "SDXL-debug": dict(
        _SDXL_COMMON, sample_size=16, block_out_channels=[32, 64], layers_per_block=1,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 2], attention_head_dim=[2, 4], cross_attention_dim=64,
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, norm_num_groups=8,
    ),
}


def arch(name: str) -> dict:
    """Architecture keywords of a registered model name; a clear error for an unknown one."""
    if name in DIT_ARCHS:
        return dict(DIT_ARCHS[name])
    if name in PIXART_ARCHS:
        return dict(PIXART_ARCHS[name])
    if name in SDXL_ARCHS:
        return dict(SDXL_ARCHS[name])
    valid = ", ".join(list(DIT_ARCHS) + list(PIXART_ARCHS) + list(SDXL_ARCHS))
    raise ValueError(f"unknown model name {name!r}; valid names: {valid}")


def family(name: str) -> str:
    """'dit', 'pixart' (or 'pixart_ms') or 'sdxl' for a registered model name."""
    arch(name)
    if name in DIT_ARCHS:
        return "dit"
    if name in SDXL_ARCHS:
        return "sdxl"
    return "pixart_ms" if name.startswith("PixArtMS") else "pixart"


# What must agree between an SD-XL registry entry and a pipeline folder's unet/config.json (the layout
# the pruning plan and the FLOPs estimate are computed for).
SDXL_CHECKED_KEYS = ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
                     "transformer_layers_per_block", "cross_attention_dim", "in_channels")


def sdxl_mismatches(name: str, unet_config: dict) -> list[str]:
    """`key: folder value != registry value` for each `SDXL_CHECKED_KEYS` entry where a UNet config
    (unet/config.json of a pipeline folder) differs from the registry's `name`."""
    expected = arch(name)
    out = []
    for key in SDXL_CHECKED_KEYS:
        have, want = unet_config.get(key), expected.get(key)
        if (list(have) if isinstance(have, list | tuple) else have) != want:
            out.append(f"{key}: {have!r} != {want!r}")
    return out
