"""Model variants as data: a name maps to the constructor keywords of the official code.

`DiT_models` follows facebookresearch/DiT (`DiT-XL/2` ... `DiT-S/8`) plus a tiny `debug` flavour;
`PixArt_models` follows PixArt-alpha (`PixArt-XL/2`, `PixArtMS-XL/2`) plus `PixArt-debug` and
`PixArtMS-debug`.
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


def arch(name: str) -> dict:
    """Architecture keywords of a registered model name; a clear error for an unknown one."""
    if name in DIT_ARCHS:
        return dict(DIT_ARCHS[name])
    if name in PIXART_ARCHS:
        return dict(PIXART_ARCHS[name])
    valid = ", ".join(list(DIT_ARCHS) + list(PIXART_ARCHS))
    raise ValueError(f"unknown model name {name!r}; valid names: {valid}")


def family(name: str) -> str:
    """'dit' or 'pixart' (or 'pixart_ms') for a registered model name."""
    arch(name)
    if name in DIT_ARCHS:
        return "dit"
    return "pixart_ms" if name.startswith("PixArtMS") else "pixart"
