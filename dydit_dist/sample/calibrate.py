"""The EB-Cache calibration job: the sample job's network and sampler, a few samples, a table on storage.

`accel.calibrate.calibrate` is the algorithm; this module gives it what a run has (the config's
network and checkpoint, its sampler, step count and guidance) and writes the table where the run's
outputs live (`RunPaths.eb_cache`), for `EBCacheOptions(schedule=URL)` to read.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch

from dydit_dist import pretrained, storage
from dydit_dist.accel import Backend
from dydit_dist.accel.calibrate import calibrate
from dydit_dist.accel.synthetic import randomize_zero_init
from dydit_dist.config import Config
from dydit_dist.diffusion import randn_per_sample
from dydit_dist.models import family
from dydit_dist.network import resolve_checkpoint, sampling_network
from dydit_dist.paths import RunPaths
from dydit_dist.precision import set_tf32

from .generate import conditioner, sampling_autocast

log = logging.getLogger(__name__)


def calibration_inputs(conditioner, n: int, guided: bool, noise: torch.Tensor):
    """The conditions of samples 0..n-1 as the sample job makes them (`conditioner`: their classes, or
    their prompts through the T5 encoder) -> (x_T, model_kwargs); doubled for guidance when `guided`."""
    kwargs = conditioner.model_kwargs(range(n), noise.device)
    return conditioner.doubled(noise, kwargs) if guided else (noise, kwargs)


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
                    allow_random: bool = False, device: str | None = None) -> tuple[dict, str]:
    """Calibrate an EB-Cache schedule for `cfg`'s network and sampler -> (the table, its URL). `device`:
    default the GPU when there is one, as the sample job's actors."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    # where and how the sample job runs the network: its GPU and precision (a CPU fp32 trajectory is
    # not the one a bf16 GPU run samples, and DiT-XL on CPUs is slow)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    s = cfg.sample
    set_tf32(device, s.tf32)
    model = calibration_network(cfg, allow_random, seed, device)
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the draws do not depend on the device
    size = cfg.model.input_size
    noise = randn_per_sample((num_samples, cfg.model.in_channels, size, size), generator).to(device)
    captions = family(cfg.model.name) != "dit"
    if captions:  # the trajectories of the run's captions (the null caption's are unconditional ones)
        pretrained.mirror(cfg, captions=True, vae=False)
    with torch.no_grad():  # the conditions of a PixArt hold its learned null caption (a parameter)
        x, kwargs = calibration_inputs(conditioner(cfg, model, device), num_samples, s.cfg_scale != 1.0, noise)
    with sampling_autocast(s.precision, device):
        table = calibrate(Backend(model), x, kwargs, sampler=s.sampler, steps=s.steps, tolerance=tolerance,
                          tolerance_at_zero=tolerance_at_zero, criterion=criterion, cfg_scale=s.cfg_scale,
                          guidance_channels=s.guidance_channels, generator=generator,
                          eps_scale=s.eb_cache.eps_scale)  # the trajectory the runner will sample
    table.update(model=cfg.model.name, image_size=cfg.model.image_size, method=cfg.model.method,
                 checkpoint=cfg.model.checkpoint, seed=seed, device=device.type, precision=s.precision,
                 conditioning=(f"prompts 0..{num_samples - 1} of {s.prompts}" if captions
                               else f"classes of samples 0..{num_samples - 1} (sample.labels={s.labels})"))
    # the trajectory's and the network's settings in the name: calibrations of one run for other methods,
    # weights or guidance do not overwrite each other
    identity = {k: table[k] for k in ("checkpoint", "cfg_scale", "guidance_channels", "eps_scale_factors",
                                      "tolerance_at_zero", "precision", "image_size", "seed", "num_samples",
                                      "conditioning")}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    name = (f"{cfg.model.name.replace('/', '_')}_{cfg.model.method}_{s.sampler}{s.steps}_{criterion}_tol{tolerance:g}"
            f"_{digest}.json")
    out = out or RunPaths(cfg).eb_cache(name)
    storage.write_json(out, table)
    log.info("schedule %s (%d/%d full steps, %.3fx FLOPs-ideal) -> %s", table["schedule"], table["full_steps"],
             table["num_steps"], table["flops_ideal_speedup"], out)
    return table, out
