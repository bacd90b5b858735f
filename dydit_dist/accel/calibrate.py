"""EB-Cache calibration (the paper's Algorithm 1): pick each step's cache state on a few samples.

Sampling runs on a handful of samples (8 is enough per the paper) along the calibrated trajectory.
At step i (after the first, which computes everything) the guided noise prediction is computed with
no cache (state 0) and with every cached state (1 attention reused, 2 both reused, 3 MLP reused)
from the cache built so far; the error of a state is

    norm: mean over samples of | ||eps_s|| - ||eps_0|| | / ||eps_0||   (the norm the paper compares)
    l2:   mean over samples of ||eps_s - eps_0|| / ||eps_0||

and the cheapest state (fewest MACs, by the FLOPs counter) whose error is within the tolerance
tol(t) = tolerance_at_zero + (tolerance - tolerance_at_zero) * t / (T - 1), which grows linearly
with the timestep t, is taken; sampling continues with that state's output and cache, corrected for
exposure bias as the runner corrects it (`eps_scale`, `cache.correct_eps`): the trajectory calibrated is
the one the runner samples. (The errors do not depend on it: one step's factor scales both outputs.
The official repository ships its table without the code that made it, so this is this repo's choice.)

    python -m jobs.calibrate --config dit_xl2_256 --tolerance 0.05 [--out URL] [key=value ...]

writes a JSON table (`schedule` plus the per-step errors and FLOPs; format `options.TABLE_FORMAT`)
that `EBCacheOptions(schedule=URL)` reads. The sampler, step count and guidance scale come from the
config's `sample` section.
"""

from __future__ import annotations

from typing import Literal

import torch
from tqdm import tqdm

from dydit_dist.diffusion import cfg_model_fn, sample

from .backend import Backend
from .cache import correct_eps, forward_with_cache
from .options import CRITERIA, TABLE_FORMAT, eps_scale_at, parse_eps_scale


def state_error(eps: torch.Tensor, ref: torch.Tensor, criterion: str) -> float:
    """Mean over rows of the relative error of eps (B, C, ...) against ref under `criterion`."""
    eps, ref = eps.flatten(1).double(), ref.flatten(1).double()
    ref_norm = ref.norm(dim=1)
    gap = (eps.norm(dim=1) - ref_norm).abs() if criterion == "norm" else (eps - ref).norm(dim=1)
    return float((gap / ref_norm.clamp_min(1e-12)).mean())


@torch.no_grad()
def calibrate(
    backend: Backend,
    noise: torch.Tensor,
    model_kwargs: dict,
    *,
    sampler: str = "ddpm",
    steps: int = 50,
    tolerance: float = 0.05,
    tolerance_at_zero: float = 0.0,
    criterion: Literal["norm", "l2"] = "norm",
    cfg_scale: float = 1.0,
    guidance_channels: int | None = 3,
    generator: torch.Generator | list | None = None,
    num_train_timesteps: int = 1000,
    eps_scale: str = "released",
) -> dict:
    """Run Algorithm 1 from `noise` (the sampler's x_T; doubled batch when cfg_scale != 1) -> the table dict."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if not 0.0 <= tolerance_at_zero <= tolerance:
        raise ValueError(f"need 0 <= tolerance_at_zero <= tolerance, got {tolerance_at_zero}, {tolerance}")
    channels = backend.in_channels
    knots = parse_eps_scale(eps_scale)
    run = {"step": None, "timestep": None, "cache": None}
    rows: list[dict] = []

    def step_callback(i, t):
        run["step"], run["timestep"] = i, t

    def try_state(state, x, t, cond):
        """Guided output, new cache and MACs per row of one call in `state` from the current cache."""
        held = {}

        def net(xx, tt, **cc):
            out, held["cache"], acts = forward_with_cache(backend, xx, tt, cc, run["timestep"], state, run["cache"])
            held["macs"] = backend.count(acts, grid)
            return out.float()  # as the runner returns it (`Runner.__call__`): guidance and correction in fp32

        fn = cfg_model_fn(net, cfg_scale, guidance_channels) if cfg_scale != 1.0 else net
        return fn(x, t, **cond), held["cache"], held["macs"]

    def model_fn(x, t, **cond):
        timestep = run["timestep"]
        tried = {0: try_state(0, x, t, cond)}
        errors = {}
        if run["cache"] is not None:
            for state in (1, 2, 3):
                tried[state] = try_state(state, x, t, cond)
                errors[state] = state_error(tried[state][0][:, :channels], tried[0][0][:, :channels], criterion)
        tol = tolerance_at_zero + (tolerance - tolerance_at_zero) * timestep / (num_train_timesteps - 1)
        within = [s for s in errors if errors[s] <= tol]
        chosen = min(within, key=lambda s: (tried[s][2], s)) if within else 0
        out, run["cache"], macs = tried[chosen]
        rows.append({"step": run["step"], "timestep": timestep, "tolerance": tol, "state": chosen,
                     "errors": {str(s): e for s, e in errors.items()}, "macs": macs, "full_macs": tried[0][2]})
        bar.set_postfix_str("".join(str(r["state"]) for r in rows)[-20:], refresh=False)  # the schedule so far
        bar.update(1)
        return correct_eps(out, channels, eps_scale_at(knots, timestep / (num_train_timesteps - 1)))

    grid = backend.set_grid(noise)
    with tqdm(total=steps, desc="calibrate", unit="step", mininterval=1.0) as bar:
        sample(model_fn, noise.shape, sampler, steps, generator, noise=noise, model_kwargs=model_kwargs,
               step_callback=step_callback, num_train_timesteps=num_train_timesteps)
    schedule = "".join(str(r["state"]) for r in rows)
    full, used = sum(r["full_macs"] for r in rows), sum(r["macs"] for r in rows)
    return {
        "format": TABLE_FORMAT, "schedule": schedule, "num_steps": len(rows), "full_steps": schedule.count("0"),
        "flops_ideal_speedup": full / used, "sampler": sampler, "tolerance": tolerance,
        "tolerance_at_zero": tolerance_at_zero, "criterion": criterion, "cfg_scale": cfg_scale,
        "guidance_channels": guidance_channels, "eps_scale": eps_scale,
        "eps_scale_factors": [list(k) for k in knots],  # what the name meant (`paper` was read the other way once)
        "num_samples": noise.shape[0] // (2 if cfg_scale != 1.0 else 1), "steps": rows,
    }
