"""Inspect a DyDiT checkpoint over a sampler's schedule: active heads and MLP groups per block per
timestep, the average FLOPs, and a plot of width against timestep.

    python -m dydit_dist.dynamic.inspect --model DiT-XL/2 --checkpoint new_dydit0.5.pt \
        --sampler ddpm --steps 250 --image-size 256 [--tokens 4] [--out outputs/dydit_width]

Width depends on the timestep only and is read from the routers directly. Token skipping depends on
the input: with `--tokens K`, K class-conditional samples are drawn through the masked path and the
kept-token fraction of every block at every step is measured (without it, all tokens count as kept).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dydit_dist import storage
from dydit_dist.diffusion import (
    SAMPLERS,
    ContinuousVPSchedule,
    create_diffusion,
    dpm_solver_scheduler,
    linear_betas,
    sample,
)
from dydit_dist.models import load_into, parse_state_dict
from dydit_dist.models.registry import arch, family

from .dydit import DyDiT, DyPixArt
from .dydit_flops import dynamic_flops, static_flops
from .fast import FastPath


def schedule_timesteps(sampler: str, steps: int) -> list[float]:
    """The original timesteps a sampler passes to the model, first (noisiest) to last (the authors'
    DPM-Solver passes fractional ones, 949.05, ..: the width plan reads them as they are)."""
    if sampler == "dpm-solver":
        schedule = ContinuousVPSchedule(linear_betas(1000))
        return [float(schedule.model_timestep(t)) for t in schedule.times(steps)[:-1]]  # as the sampler calls the model
    if sampler == "dpm-solver++":

        scheduler = dpm_solver_scheduler()
        scheduler.set_timesteps(steps)
        return [int(t) for t in scheduler.timesteps]
    respacing = f"ddim{steps}" if sampler == "ddim" else str(steps)
    diffusion = create_diffusion(respacing)
    return [int(diffusion.timestep_map[i]) for i in range(diffusion.num_timesteps - 1, -1, -1)]


def width_table(model, timesteps: list[float]) -> dict:
    """Per timestep: active head and group counts per block (from the routers alone)."""
    fast = FastPath(model)
    table = {}
    for t in timesteps:
        plan = fast.plan(t)
        table[t] = {"heads": [len(h) for h in plan.heads], "groups": [len(g) for g in plan.groups]}
    return table


def token_fractions(model, timesteps, num_samples: int, seed: int = 0, sampler: str = "ddpm") -> dict[float, list[float]]:
    """Measured kept-token fraction per block at each timestep, over `num_samples` DiT samples drawn with
    `sampler` (the one `timesteps` come from, in its order: `schedule_timesteps`)."""
    recorded: dict[float, list[float]] = {}

    def model_fn(x, t, y):
        result = model(x, t, y)
        # a fractional timestep reaches the model in float32: matched to the listed one it rounds
        value = t[0].item()
        key = next((s for s in timesteps if abs(s - value) < 1e-3), value)
        recorded[key] = result.token_masks.float().mean(dim=(0, 2)).tolist()
        return result.out

    kw = model.constructor_kwargs()
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, kw["num_classes"], (num_samples,), generator=g)
    shape = (num_samples, kw["in_channels"], kw["input_size"], kw["input_size"])
    sample(model_fn, shape, sampler, steps=len(timesteps), generator=g, model_kwargs={"y": y})
    return recorded


def summarize(model, table: dict, tokens: dict[float, list[float]] | None) -> dict:
    H = model.blocks[0].attn.num_heads
    depth = len(model.blocks)
    per_t = {}
    missing = sorted(set(table) - set(tokens)) if tokens is not None else []
    if missing:  # counting those as all kept would overstate the FLOPs
        raise ValueError(f"no token fractions measured at timesteps {missing[:5]}: measured with another sampler "
                         "or step count than the width table")
    for t, row in table.items():
        keep = (tokens or {}).get(t, [1.0] * depth)
        per_t[t] = dynamic_flops(model, [h / H for h in row["heads"]], [g / H for g in row["groups"]], keep)
    f_static = static_flops(model)
    mean = float(np.mean(list(per_t.values())))
    return {"static_gflops": f_static / 1e9, "mean_dynamic_gflops": mean / 1e9, "ratio": mean / f_static,
            "per_timestep_gflops": {t: f / 1e9 for t, f in per_t.items()}}


def plot(table: dict, num_heads: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = sorted(table)
    heads = np.array([table[t]["heads"] for t in ts]).T / num_heads  # (depth, T)
    groups = np.array([table[t]["groups"] for t in ts]).T / num_heads
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [2, 2, 1.4]})
    for ax, data, title in ((axes[0], heads, "active heads"), (axes[1], groups, "active MLP groups")):
        im = ax.imshow(data, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis",
                       extent=[ts[0], ts[-1], -0.5, data.shape[0] - 0.5])
        ax.set(xlabel="timestep t", ylabel="block", title=f"{title} (fraction)")
    fig.colorbar(im, ax=axes[:2].tolist())
    axes[2].plot(ts, heads.mean(0), label="heads")
    axes[2].plot(ts, groups.mean(0), label="MLP groups")
    axes[2].set(xlabel="timestep t", ylabel="mean width", ylim=(0, 1.05), title="width vs timestep")
    axes[2].legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def build(model_name: str, image_size: int, checkpoint: str | None, vae_downsample: int = 8, **kw):
    cls = DyDiT if family(model_name) == "dit" else DyPixArt
    model = cls(input_size=image_size // vae_downsample, **arch(model_name), **kw)
    if checkpoint:
        load_into(model, parse_state_dict(storage.read_bytes(checkpoint), checkpoint), source=checkpoint)
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Active width per timestep and average FLOPs of a DyDiT")
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--checkpoint", default=None, help="DyDiT checkpoint (official or exported EMA)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--vae-downsample", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--sampler", default="ddpm", choices=list(SAMPLERS))
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--tokens", type=int, default=0, help="samples to measure token skipping on")
    parser.add_argument("--out", default="outputs/dydit_width")
    args = parser.parse_args(argv)
    extra = {"num_classes": args.num_classes} if family(args.model) == "dit" else {}
    model = build(args.model, args.image_size, args.checkpoint, args.vae_downsample, **extra)
    timesteps = schedule_timesteps(args.sampler, args.steps)
    table = width_table(model, timesteps)
    tokens = (token_fractions(model, timesteps, args.tokens, sampler=args.sampler)
              if args.tokens and family(args.model) == "dit" else None)
    summary = summarize(model, table, tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(table, model.blocks[0].attn.num_heads, out / "width_vs_timestep.png")
    (out / "width.json").write_text(json.dumps({"table": table, **summary}, indent=1))
    print("timestep | heads per block | groups per block")
    for t in timesteps:
        print(f"{t:8g} | {' '.join(map(str, table[t]['heads']))} | {' '.join(map(str, table[t]['groups']))}")
    print(f"static {summary['static_gflops']:.2f} GFLOPs; dynamic mean over {len(timesteps)} {args.sampler} "
          f"steps {summary['mean_dynamic_gflops']:.2f} GFLOPs ({summary['ratio']:.3f} of static)"
          + ("" if tokens else "; tokens counted as all kept (use --tokens K to measure)"))
    print(f"wrote {out / 'width_vs_timestep.png'} and {out / 'width.json'}")
    return summary


if __name__ == "__main__":
    main()
