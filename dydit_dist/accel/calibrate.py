"""EB-Cache calibration (the paper's Algorithm 1): pick each step's cache state on a few samples.

Sampling runs on a handful of samples (8 is enough per the paper) along the calibrated trajectory.
At step i (after the first, which computes everything) the guided noise prediction is computed with
no cache (state 0) and with every cached state (1 attention reused, 2 both reused, 3 MLP reused)
from the cache built so far; the error of a state is

    norm: mean over samples of | ||eps_s|| - ||eps_0|| | / ||eps_0||   (the norm the paper compares)
    l2:   mean over samples of ||eps_s - eps_0|| / ||eps_0||

and the cheapest state (fewest MACs, by the FLOPs counter) whose error is within the tolerance
tol(t) = tolerance_at_zero + (tolerance - tolerance_at_zero) * t / (T - 1), which grows linearly
with the timestep t, is taken; sampling continues with that state's output and cache.

    python -m dydit_dist.accel.calibrate --config dit_xl2_256 --tolerance 0.05 [--out URL] [key=value ...]

writes a JSON table (`schedule` plus the per-step errors and FLOPs) that `EBCacheOptions(schedule=URL)`
reads. The sampler, step count and guidance scale come from the config's `sample` section.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from dydit_dist import storage
from dydit_dist.diffusion import cfg_caption_batch, cfg_class_batch, cfg_model_fn, randn_per_sample, sample

from .backend import Backend
from .cache import forward_with_cache

log = logging.getLogger(__name__)
TABLE_FORMAT = "dydit_dist.eb_cache_table/1"
CRITERIA = ("norm", "l2")


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
) -> dict:
    """Run Algorithm 1 from `noise` (the sampler's x_T; doubled batch when cfg_scale != 1) -> the table dict."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if not 0.0 <= tolerance_at_zero <= tolerance:
        raise ValueError(f"need 0 <= tolerance_at_zero <= tolerance, got {tolerance_at_zero}, {tolerance}")
    channels = backend.in_channels
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
            return out

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
        return out

    grid = backend.set_grid(noise)
    sample(model_fn, noise.shape, sampler, steps, generator, noise=noise, model_kwargs=model_kwargs,
           step_callback=step_callback, num_train_timesteps=num_train_timesteps)
    schedule = "".join(str(r["state"]) for r in rows)
    full, used = sum(r["full_macs"] for r in rows), sum(r["macs"] for r in rows)
    return {
        "format": TABLE_FORMAT, "schedule": schedule, "num_steps": len(rows), "full_steps": schedule.count("0"),
        "flops_ideal_speedup": full / used, "sampler": sampler, "tolerance": tolerance,
        "tolerance_at_zero": tolerance_at_zero, "criterion": criterion, "cfg_scale": cfg_scale,
        "num_samples": noise.shape[0] // (2 if cfg_scale != 1.0 else 1), "steps": rows,
    }


def load_table(url: str) -> dict:
    """Read a calibration table written by this module; a clear error for anything else."""
    table = storage.read_json(url)
    if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT or "schedule" not in table:
        raise ValueError(f"{url} is not an EB-Cache calibration table (format {TABLE_FORMAT!r})")
    return table


def _conditioning(model, n: int, generator: torch.Generator, guided: bool, noise: torch.Tensor):
    """Random class labels (DiT) or null captions (PixArt) for n samples -> (x_T, model_kwargs)."""
    from dydit_dist.models import PixArt

    if isinstance(model, PixArt):
        null = model.y_embedder.y_embedding
        caption = null.expand(n, 1, *null.shape).clone()
        if not guided:
            return noise, {"y": caption}
        x, y, _ = cfg_caption_batch(noise, caption, null)
        return x, {"y": y}
    labels = torch.randint(0, model.num_classes, (n,), generator=generator)
    if not guided:
        return noise, {"y": labels}
    x, y = cfg_class_batch(noise, labels, model.num_classes)
    return x, {"y": y}


def _network(cfg, allow_random: bool, seed: int):
    """The sample job's network for `cfg` (static or DyDiT, checkpoint loaded, eval mode)."""
    from dydit_dist.sample.network import build_network, resolve_checkpoint

    from .synthetic import randomize_zero_init

    if not cfg.model.checkpoint and not allow_random:
        raise ValueError("model.checkpoint is not set: calibrating random weights gives a meaningless table "
                         "(pass --random-init to do it anyway)")
    model = build_network(resolve_checkpoint(cfg))
    if not cfg.model.checkpoint:  # adaLN-Zero init makes every block the identity: give them random work
        randomize_zero_init(model, torch.Generator().manual_seed(seed))
    return model


def main(argv: list[str] | None = None) -> dict:
    from dydit_dist import cli

    parser = cli.job_parser(__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=0.05, help="tolerance at the noisiest timestep")
    parser.add_argument("--tolerance-at-zero", type=float, default=0.0, help="tolerance at t = 0")
    parser.add_argument("--criterion", choices=CRITERIA, default="norm")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="table URL (default: the run folder's eb_cache/)")
    parser.add_argument("--random-init", action="store_true",
                        help="allow a model without checkpoint: random weights, with the zero-initialized "
                             "adaLN / output layers randomized too (tests and benchmarks only)")
    cfg, args = cli.parse_args(parser, argv)
    if args.num_samples < 1:
        parser.error("--num-samples must be >= 1")
    model = _network(cfg, args.random_init, args.seed)
    s = cfg.sample
    generator = torch.Generator().manual_seed(args.seed)
    size = cfg.model.input_size
    noise = randn_per_sample((args.num_samples, cfg.model.in_channels, size, size), generator)
    guided = s.cfg_scale != 1.0
    x, kwargs = _conditioning(model, args.num_samples, generator, guided, noise)
    table = calibrate(Backend(model), x, kwargs, sampler=s.sampler, steps=s.steps, tolerance=args.tolerance,
                      tolerance_at_zero=args.tolerance_at_zero, criterion=args.criterion, cfg_scale=s.cfg_scale,
                      guidance_channels=s.guidance_channels, generator=generator)
    table.update(model=cfg.model.name, image_size=cfg.model.image_size, method=cfg.model.method,
                 checkpoint=cfg.model.checkpoint, seed=args.seed)
    name = f"{cfg.model.name.replace('/', '_')}_{s.sampler}{s.steps}_{args.criterion}_tol{args.tolerance:g}.json"
    out = args.out or cli.run_url(cfg, "eb_cache", name)
    storage.write_json(out, table)
    log.info("schedule %s (%d/%d full steps, %.3fx FLOPs-ideal) -> %s", table["schedule"], table["full_steps"],
             table["num_steps"], table["flops_ideal_speedup"], out)
    return table


if __name__ == "__main__":
    main()
