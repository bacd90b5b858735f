"""AT-EDM on an SD-XL-shaped diffusers UNet against the unpruned UNet, in one run.

    python benchmarks/sdxl_at_edm.py [--model SDXL-small] [--latent 64] [--steps 10] [--batch 2]
        [--cfg-scale 5.0] [--threads 1] [--device cpu] [--smoke] [--tag T]

A randomly initialized UNet of the registry (`accel.sdxl_synthetic.random_unet`: SD-XL's layout, no
attention in stage 0, 1 / 2 / 4 transformer layers below, so every attention block is a DSAP segment
as on the released UNet), deterministic DDIM sampling with classifier-free guidance (2 x batch rows per
UNet call: the unconditional rows first, as diffusers' pipeline) on random text features. Every method
wraps its own copy of the same weights (`accel.at_edm_unet.UNetPruner`), starts from the same noise and
advances in LOCKSTEP: at each step every method makes its UNet call in turn (rotating the order), so the
load of a shared machine hits all of them alike. Per method: UNet-call time, measured speedup over the
unpruned UNet, FLOPs per call (multiply-accumulates, as for DiT: torch's FlopCounterMode halved; averaged
over the steps' plans), FLOPs
saved, the FLOPs-ideal speedup, their ratio, and the relative L2 distance of the final latents from the
unpruned run's.

Writes benchmarks/results/sdxl_at_edm[_TAG].{json,md} (`--smoke`: tiny shapes, nothing written).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch
from stamp import stamp

from dydit_dist.accel import ATEDMOptions
from dydit_dist.accel.at_edm_unet import UNetPruner, unet_inputs, unet_macs
from dydit_dist.accel.sdxl_synthetic import random_unet

RESULTS = Path(__file__).parent / "results"

# name, options (None: the unpruned UNet)
ROWS = [
    ("static (unpruned UNet)", None),
    ("AT-EDM per-layer ratio 0.3", ATEDMOptions(ratio=0.3)),
    ("AT-EDM per-layer ratio 0.5", ATEDMOptions(ratio=0.5)),
    ("AT-EDM per-layer ratio 0.646 (the SD-XL preset's)", ATEDMOptions(ratio=0.646, dsap_layers=0.34)),
    ("AT-EDM single ratio 0.5", ATEDMOptions(ratio=0.5, variant="single")),
]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def scheduler(steps: int):
    """DDIM (eta 0) on SD-XL's noise schedule (scaled linear 0.00085 .. 0.012, leading spacing, offset 1)."""
    from diffusers import DDIMScheduler

    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
                      steps_offset=1, clip_sample=False)
    s.set_timesteps(steps)
    return s


def lockstep(unets: dict, pruners: dict, noise: torch.Tensor, cond: dict, steps: int, cfg_scale: float,
             device: str) -> dict:
    """DDIM-sample with every UNet from `noise` (B, C, h, w) in lockstep; cond: the 2B-row UNet inputs
    besides sample / timestep. -> {name: {"x": final latents (B, C, h, w), "time": seconds in UNet calls}}."""
    sched = scheduler(steps)
    state = {n: {"x": noise.clone(), "time": 0.0} for n in unets}
    for pruner in pruners.values():
        pruner.begin(steps)
    names = list(unets)
    for i, t in enumerate(sched.timesteps):
        for name in names[i % len(names):] + names[: i % len(names)]:
            s = state[name]
            if name in pruners:
                pruners[name].step = i
            _sync(device)
            start = time.perf_counter()
            out = unets[name](torch.cat([s["x"]] * 2), t, **cond).sample
            _sync(device)
            s["time"] += time.perf_counter() - start
            uncond, text = out.float().chunk(2)
            s["x"] = sched.step(uncond + cfg_scale * (text - uncond), t, s["x"]).prev_sample
    return state


def mean_flops(unet, pruner: UNetPruner | None, inputs: dict, steps: int) -> float:
    """FLOPs of one UNet call averaged over the steps (one count per distinct plan step)."""
    if pruner is None:
        return unet_macs(unet, **inputs)
    rates, counted = pruner.plan(steps), {}
    pruner.begin(steps)
    for i, rate in enumerate(rates):
        if repr(rate) not in counted:
            pruner.step = i
            counted[repr(rate)] = unet_macs(unet, **inputs)
    return sum(counted[repr(r)] for r in rates) / steps


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    base = random_unet(args.model, args.seed).to(args.device)
    g = torch.Generator().manual_seed(args.seed)
    inputs = unet_inputs(base, args.latent, batch=2 * args.batch, generator=g, device=args.device)
    noise = inputs.pop("sample")[: args.batch]
    inputs.pop("timestep")
    unets, pruners = {}, {}
    for name, options in ROWS:
        unet = copy.deepcopy(base)
        if options is not None:
            pruners[name] = UNetPruner(unet, options, args.latent)
        unets[name] = unet
    with torch.no_grad():
        for name, unet in unets.items():  # warm-up: one call each (allocators, kernels)
            if name in pruners:
                pruners[name].begin(args.steps)
            unet(torch.cat([noise] * 2), 999, **inputs)
        flops = {name: mean_flops(unets[name], pruners.get(name), {"sample": torch.cat([noise] * 2),
                                                                   "timestep": 999, **inputs}, args.steps)
                 for name in unets}
        load_before = os.getloadavg()
        wall = time.perf_counter()
        state = lockstep(unets, pruners, noise, inputs, args.steps, args.cfg_scale, args.device)
        wall = time.perf_counter() - wall
    static = ROWS[0][0]
    ref = state[static]["x"]
    rows = []
    for name, options in ROWS:
        s = state[name]
        measured, ideal = state[static]["time"] / s["time"], flops[static] / flops[name]
        rows.append({"name": name, "ratio_option": options.ratio if options else 0.0,
                     "variant": options.variant if options else None, "unet_time_s": s["time"],
                     "gflops_per_call": flops[name] / 1e9, "flops_saved": 1 - flops[name] / flops[static],
                     "measured_speedup": measured, "flops_ideal_speedup": ideal, "ratio": measured / ideal,
                     "rel_l2": float((s["x"] - ref).norm() / ref.norm())})
    return {"rows": rows, "wall_s": wall, "load_before": load_before, "load_after": os.getloadavg()}


def markdown(result: dict, args) -> str:
    lines = [f"## {args.model} UNet (random weights), {args.latent}x{args.latent} latents, {args.steps} DDIM steps, "
             f"batch {args.batch} x2 (cfg {args.cfg_scale}), {args.device} fp32, {args.threads} threads", "",
             "| method | UNet time s | FLOPs saved | measured speedup | FLOPs-ideal speedup | ratio | GFLOPs/call "
             "| rel. L2 vs static |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['unet_time_s']:.1f} | {100 * r['flops_saved']:.1f}% | "
                     f"{r['measured_speedup']:.2f}x | {r['flops_ideal_speedup']:.2f}x | {r['ratio']:.2f} | "
                     f"{r['gflops_per_call']:.2f} | {r['rel_l2']:.5f} |")
    lo, hi = result["load_before"][0], result["load_after"][0]
    lines += ["", f"Wall time {result['wall_s']:.0f} s; load average {lo:.1f} before, {hi:.1f} after "
                  f"(on {os.cpu_count()} CPUs). FLOPs: multiply-accumulates (torch.utils.flop_counter.FlopCounterMode / 2) per UNet call "
                  "(matmuls, convolutions, attention on the math backend; G-WPR and the recovery similarity "
                  "included), averaged over the steps' DSAP plans."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="SDXL-small")
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--cfg-scale", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="SDXL-debug, 16 x 16 latents, 3 steps; nothing written")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.latent, args.steps, args.batch = "SDXL-debug", 16, 3, 1
    result = run(args)
    result["args"] = vars(args)
    result["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count(),
                         "threads": torch.get_num_threads()}
    result["source"] = stamp()
    text = markdown(result, args)
    print(text)
    if not args.smoke:
        stem = RESULTS / f"sdxl_at_edm{'_' + args.tag if args.tag else ''}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        stem.with_suffix(".md").write_text(text)
    return result


if __name__ == "__main__":
    main()
