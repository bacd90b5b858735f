"""The one config -> network factory of the static models: a registered name and constructor keywords."""

from __future__ import annotations

import inspect

from torch import nn

from .dit import DiT, DiT_models
from .pixart import PixArt, PixArt_models, PixArtMS
from .registry import arch, family


def build_model(name: str, **kwargs) -> nn.Module:
    """A registered model ("DiT-XL/2", "debug", "PixArt-XL/2", "PixArtMS-XL/2", ...) with constructor keywords
    (input_size, num_classes, learn_sigma / pred_sigma, caption_channels, model_max_length, ...).

    Unknown names or keywords (including the architecture's own: depth, hidden_size, ...) are ValueErrors.
    """
    fixed = arch(name)  # ValueError listing the valid names
    if family(name) == "sdxl":
        raise ValueError(f"model.name={name!r} is an SD-XL UNet (model.family sdxl): it is sampled through diffusers' "
                         "StableDiffusionXLPipeline from model.checkpoint (the sample and evaluate jobs), not built "
                         "or fine-tuned here")
    cls = {"dit": DiT, "pixart": PixArt, "pixart_ms": PixArtMS}[family(name)]
    valid = [n for n in inspect.signature(DiT if cls is DiT else PixArt).parameters if n not in fixed]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown keywords {unknown} for {name!r}; valid: {', '.join(valid)}")
    factories = DiT_models if cls is DiT else PixArt_models
    return factories[name](**kwargs)
