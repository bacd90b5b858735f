"""Static single-device networks (DiT, PixArt-alpha), their registry and checkpoint loading.

Typical use: `model = build_model("DiT-XL/2", input_size=32)`, then `load_into(model, local_path)`
(URLs: `dydit_dist.network.load_weights`).
"""

from __future__ import annotations

import inspect

from torch import nn

from .blocks import STATIC, AdaLNBlock, BlockInputs, Branches, Modulation, block_forward, run_blocks
from .checkpoint import (
    LoadResult,
    load_into,
    load_state_dict_file,
    parse_state_dict,
    read_shapes,
    safetensors_bytes,
)
from .dit import DiT, DiT_models, DiTBlock
from .pixart import PixArt, PixArt_models, PixArtBlock, PixArtMS
from .registry import arch, family

__all__ = [
    "STATIC",
    "AdaLNBlock",
    "BlockInputs",
    "Branches",
    "Modulation",
    "block_forward",
    "run_blocks",
    "DiT",
    "DiTBlock",
    "DiT_models",
    "LoadResult",
    "PixArt",
    "PixArtBlock",
    "PixArtMS",
    "PixArt_models",
    "build_model",
    "load_into",
    "load_state_dict_file",
    "parse_state_dict",
    "read_shapes",
    "safetensors_bytes",
]


def build_model(name: str, **kwargs) -> nn.Module:
    """A registered model ("DiT-XL/2", "debug", "PixArt-XL/2", "PixArtMS-XL/2", ...) with constructor keywords
    (input_size, num_classes, learn_sigma / pred_sigma, caption_channels, model_max_length, ...).

    Unknown names or keywords (including the architecture's own: depth, hidden_size, ...) are ValueErrors.
    """
    fixed = arch(name)  # ValueError listing the valid names
    cls = {"dit": DiT, "pixart": PixArt, "pixart_ms": PixArtMS}[family(name)]
    valid = [n for n in inspect.signature(DiT if cls is DiT else PixArt).parameters if n not in fixed]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown keywords {unknown} for {name!r}; valid: {', '.join(valid)}")
    factories = DiT_models if cls is DiT else PixArt_models
    return factories[name](**kwargs)
