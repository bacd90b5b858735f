"""A randomly initialised SD-XL-shaped UNet for tests and benchmarks, where every path moves the output."""

from __future__ import annotations

import torch

from dydit_dist.models.registry import arch


def random_unet(name: str = "SDXL-debug", seed: int = 0):
    """The registry's SD-XL UNet `name` (a diffusers UNet2DConditionModel) with random weights, in eval mode.
    diffusers zero-initialises the output convolution and some projections; those get N(0, 0.02) weights,
    so pruning any attention block changes the prediction."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**arch(name))
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and not module.weight.abs().sum():
                torch.nn.init.normal_(module.weight, std=0.02)
    return unet.eval().requires_grad_(False)
