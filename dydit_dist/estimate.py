"""The plan's cost estimate: analytic FLOPs of a job's work (`dydit_dist.flops`, 2 FLOPs per
multiply-accumulate) at an assumed sustained `SUSTAINED_FLOPS` per GPU, as in the README's cost table;
an estimate, not a measurement (`benchmarks/gpu_check.py` measures)."""

from __future__ import annotations

import functools

import torch

from dydit_dist import flops
from dydit_dist.models import family
from dydit_dist.models.registry import arch

SUSTAINED_FLOPS = 400e12  # FLOP/s assumed sustained on one GPU (40% of an H100's dense bf16 peak)
INCEPTION_FLOP = 6e9  # per image: Inception-v3 at 299 x 299


def training_flop(model_cfg) -> float:
    """FLOPs of one training image: forward + backward (3 x) of the network's MACs x 2. A DyDiT trains its
    masked network, which computes every head, group and token before masking: the static cost, not lambda
    of it (DyDiT stage 1 runs the complete model once more: twice this)."""
    return 3 * network_macs(model_cfg) * 2


def network_macs(model_cfg) -> float:
    """Analytic MACs of one forward pass of the static network of a `ModelConfig` on one image (an SD-XL
    UNet: counted by FlopCounterMode on the meta device, `sdxl_macs`)."""
    m = model_cfg
    if family(m.name) == "sdxl":
        return sdxl_macs(m.name, m.input_size)
    return static_count(m).total


def routed_share(model_cfg) -> float:
    """The share of a static forward's MACs in the layers DyDiT's width and token routers scale (the blocks'
    self-attention and MLP), to which its lambda (`dynamic.losses.flops_ratio`) refers: ~all of a DiT's,
    ~79% of PixArt-XL/2's at 256 px (cross-attention, the caption projection and adaLN stay whole)."""
    parts = static_count(model_cfg).by_component
    return (parts["attn"] + parts["mlp"]) / sum(parts.values())


def static_count(m) -> flops.FlopsReport:
    kwargs = dict(in_channels=m.in_channels, learn_sigma=m.learn_sigma)
    if family(m.name) != "dit":
        kwargs.update(caption_channels=m.caption_channels, model_max_length=m.model_max_length)
    return flops.count(m.name, m.image_size, vae_downsample=m.vae_downsample, **kwargs)


@functools.lru_cache(maxsize=8)
def sdxl_macs(name: str, latent_size: int) -> float:
    """MACs of one forward of the registry's SD-XL UNet `name` on one latent of `latent_size` (77 text
    tokens), counted by torch's FlopCounterMode on the meta device (no weights, a few seconds)."""
    from diffusers import UNet2DConditionModel

    from dydit_dist.accel.at_edm_unet import unet_inputs, unet_macs

    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch(name))
    return unet_macs(unet, **unet_inputs(unet, latent_size, device="meta"))


def format_macs(macs: float) -> str:
    return f"{macs / 1e9:.2f} GMAC" if macs >= 1e8 else f"{macs / 1e6:.2f} MMAC"


def format_flop(flop: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flop >= scale:
            return f"{flop / scale:,.1f} {unit}"
    return f"{flop / 1e6:,.1f} MFLOP"
