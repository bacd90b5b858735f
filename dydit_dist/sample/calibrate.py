"""The EB-Cache calibration job: the sample job's network and sampler, a few samples, a table on storage.

`accel.calibrate.calibrate` is the algorithm; this module gives it what a run has (the config's
network and checkpoint, its sampler, step count and guidance) and writes the table where the run's
outputs live (`RunPaths.eb_cache`), for `EBCacheOptions(schedule=URL)` to read.
"""

from __future__ import annotations

import logging

import torch

from dydit_dist import pretrained, storage
from dydit_dist.accel import Backend
from dydit_dist.accel.calibrate import calibrate
from dydit_dist.accel.synthetic import randomize_zero_init
from dydit_dist.config import Config
from dydit_dist.diffusion import cfg_caption_batch, cfg_class_batch, randn_per_sample
from dydit_dist.models import PixArt
from dydit_dist.network import resolve_checkpoint, sampling_network
from dydit_dist.paths import RunPaths

from .generate import caption_conditioner, sampling_autocast, set_tf32

log = logging.getLogger(__name__)


def calibration_inputs(model, n: int, generator: torch.Generator, guided: bool, noise: torch.Tensor,
                       conditioner=None):
    """Random class labels (DiT), or for PixArt the run's first n prompts through its T5 encoder (the
    sample job's `conditioner`: samples 0..n-1 take prompts 0..n-1 mod P), null captions without one,
    -> (x_T, model_kwargs); doubled for classifier-free guidance when `guided`."""
    if conditioner is not None:
        kwargs = conditioner.model_kwargs(range(n), noise.device)
        return conditioner.doubled(noise, kwargs) if guided else (noise, kwargs)
    if isinstance(model, PixArt):
        null = model.y_embedder.y_embedding
        caption = null.expand(n, 1, *null.shape).clone()
        if not guided:
            return noise, {"y": caption}
        x, y, _ = cfg_caption_batch(noise, caption, null)
        return x, {"y": y}
    labels = torch.randint(0, model.num_classes, (n,), generator=generator).to(noise.device)
    if not guided:
        return noise, {"y": labels}
    x, y = cfg_class_batch(noise, labels, model.num_classes)
    return x, {"y": y}


def calibration_network(cfg: Config, allow_random: bool, seed: int, device: torch.device | str = "cpu"):
    """The sample job's network for `cfg` (static or DyDiT, checkpoint loaded, eval mode) on `device`."""
    if not cfg.model.checkpoint and not allow_random:
        raise ValueError("model.checkpoint is not set: calibrating random weights gives a meaningless table "
                         "(pass --random-init to do it anyway)")
    model = sampling_network(resolve_checkpoint(cfg))
    if not cfg.model.checkpoint:  # adaLN-Zero init makes every block the identity: give them random work
        randomize_zero_init(model, torch.Generator().manual_seed(seed))
    return model.to(device)


def run_calibration(cfg: Config, *, tolerance: float = 0.05, tolerance_at_zero: float = 0.0,
                    criterion: str = "norm", num_samples: int = 8, seed: int = 0, out: str | None = None,
                    allow_random: bool = False) -> tuple[dict, str]:
    """Calibrate an EB-Cache schedule for `cfg`'s network and sampler -> (the table, its URL)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    # where and how the sample job runs the network: its GPU and precision (a CPU fp32 trajectory is
    # not the one a bf16 GPU run samples, and DiT-XL on CPUs is slow)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = cfg.sample
    set_tf32(device, s.tf32)
    model = calibration_network(cfg, allow_random, seed, device)
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the draws do not depend on the device
    size = cfg.model.input_size
    noise = randn_per_sample((num_samples, cfg.model.in_channels, size, size), generator).to(device)
    prompts = isinstance(model, PixArt) and bool(s.prompts)
    if prompts:  # the trajectories of the run's captions, not of the null caption (unconditional ones)
        pretrained.mirror(cfg, captions=True)
    conditioner = caption_conditioner(cfg, model, noise.device) if prompts else None
    x, kwargs = calibration_inputs(model, num_samples, generator, s.cfg_scale != 1.0, noise, conditioner)
    with sampling_autocast(s.precision, device):
        table = calibrate(Backend(model), x, kwargs, sampler=s.sampler, steps=s.steps, tolerance=tolerance,
                          tolerance_at_zero=tolerance_at_zero, criterion=criterion, cfg_scale=s.cfg_scale,
                          guidance_channels=s.guidance_channels, generator=generator,
                          eps_scale=s.eb_cache.eps_scale)  # the trajectory the runner will sample
    table.update(model=cfg.model.name, image_size=cfg.model.image_size, method=cfg.model.method,
                 checkpoint=cfg.model.checkpoint, seed=seed, device=device.type, precision=s.precision,
                 conditioning=(f"prompts 0..{num_samples - 1} of {s.prompts}" if prompts
                               else "null captions" if isinstance(model, PixArt) else "random classes"))
    name = f"{cfg.model.name.replace('/', '_')}_{s.sampler}{s.steps}_{criterion}_tol{tolerance:g}.json"
    out = out or RunPaths(cfg).eb_cache(name)
    storage.write_json(out, table)
    log.info("schedule %s (%d/%d full steps, %.3fx FLOPs-ideal) -> %s", table["schedule"], table["full_steps"],
             table["num_steps"], table["flops_ideal_speedup"], out)
    return table, out
