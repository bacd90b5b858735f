"""Static single-device networks (DiT, PixArt-alpha), their registry and checkpoint loading.

Typical use: `model = build_model("DiT-XL/2", input_size=32)`, then `load_into(model, local_path)`
(URLs: `dydit_dist.network.load_weights`). Names load their submodule on first use
(`dydit_dist.lazy_exports`): the config reads the registry without torch.
"""

from __future__ import annotations

from dydit_dist import lazy_exports

_EXPORTS = {
    "STATIC": "blocks",
    "AdaLNBlock": "blocks",
    "BlockInputs": "blocks",
    "Branches": "blocks",
    "Modulation": "blocks",
    "block_forward": "blocks",
    "run_blocks": "blocks",
    "DiT": "dit",
    "DiTBlock": "dit",
    "DiT_models": "dit",
    "CheckpointError": "checkpoint",
    "LoadResult": "checkpoint",
    "PixArt": "pixart",
    "PixArtBlock": "pixart",
    "PixArtMS": "pixart",
    "PixArt_models": "pixart",
    "arch": "registry",
    "build_model": "factory",
    "family": "registry",
    "is_safetensors_file": "checkpoint",
    "load_into": "checkpoint",
    "load_state_dict_file": "checkpoint",
    "parse_state_dict": "checkpoint",
    "read_shapes": "checkpoint",
    "read_metadata": "checkpoint",
    "safetensors_bytes": "checkpoint",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
