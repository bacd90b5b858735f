"""FlexDiT speed: the static DiT and FlexDiT forward side by side, against the FLOPs-ideal speedup.

    python benchmarks/flexdit_speed.py [--model DiT-B/2] [--sizes 256 512] [--batch 4] [--repeats 3]
        [--device cpu|cuda] [--dtype fp32|bf16] [--threads N] [--no-warmup]

For each image size the FlexDiT (default layout for the depth, default grid schedule) is timed on every
sparse grid of its schedule, and the static network on the same input; one round runs them all once,
in an order rotated each round, so a noisy machine slows all alike. The schedule's speed is the
static time over the time-share-weighted FlexDiT time (each grid covers a share of the timesteps);
the ideal is the same ratio of FLOPs (as implemented). Median and best-of (noise on a shared machine
only adds time) are both reported. Results: benchmarks/results/flexdit_speed.{json,md}, with the
FLOPs comparison against the paper and the released logs (`dydit_dist.dynamic.flexdit_flops.paper_comparison`:
each published number against our count in its convention, the ideal speedups from the analytic count of
what runs) and the commit measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from stamp import stamp

from dydit_dist.dynamic.flexdit import FlexDiT, FlexOptions
from dydit_dist.dynamic.flexdit_flops import comparison_table, model_flops, paper_comparison
from dydit_dist.flops import count
from dydit_dist.models import DiT_models

RESULTS = Path(__file__).parent / "results"


def _timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_size(name: str, size: int, batch: int, repeats: int, device: str, dtype: torch.dtype,
               warmup: bool = True) -> dict:
    torch.manual_seed(0)
    static = DiT_models[name](input_size=size // 8, num_classes=1000).to(device)
    flex = FlexDiT.from_static(static, FlexOptions()).eval().to(dtype)
    static = static.eval().to(dtype)
    intervals = flex.schedule.intervals()
    x = torch.randn(batch, 4, size // 8, size // 8, device=device, dtype=dtype)
    y = torch.randint(0, 1000, (batch,), device=device)
    runs = {"static": lambda: static(x, torch.full((batch,), 500, device=device), y)}
    for lo, hi, g in intervals:
        t = torch.full((batch,), (lo + hi) // 2, device=device)
        runs[f"grid{g}"] = lambda t=t, g=g: flex(x, t, y, grid=g)
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    with torch.inference_mode():
        for fn in runs.values() if warmup else ():
            fn()
        for r in range(repeats):
            for k in names[r % len(names):] + names[:r % len(names)]:
                times[k].append(_timed(runs[k], device))
    total = flex.schedule.num_timesteps
    share = {g: (hi - lo) / total for lo, hi, g in intervals}
    f_static = count(name, size).total
    f_grid = {g: model_flops(flex, g) for g in share}
    f_flex = sum(share[g] * f_grid[g] for g in share)
    out = {"model": name, "image_size": size, "tokens": flex.schedule.num_tokens, "layout": flex.layout,
           "batch": batch, "device": device, "dtype": str(dtype).removeprefix("torch."), "repeats": repeats, "warmup": warmup,
           "gflops_static": f_static / 1e9, "gflops_flexdit": f_flex / 1e9, "ideal_speedup": f_static / f_flex,
           "grids": [{"grid": g, "t": [lo, hi], "share": share[g], "gflops": f_grid[g] / 1e9,
                      "median_s": statistics.median(times[f"grid{g}"]), "best_s": min(times[f"grid{g}"]),
                      "ideal_speedup": f_static / f_grid[g]} for lo, hi, g in intervals]}
    for stat, fn in (("median", statistics.median), ("best", min)):
        t_static = fn(times["static"])
        t_flex = sum(share[g] * fn(times[f"grid{g}"]) for g in share)
        out[f"static_{stat}_s"], out[f"flexdit_{stat}_s"] = t_static, t_flex
        out[f"speedup_{stat}"] = t_static / t_flex
        out[f"fraction_of_ideal_{stat}"] = t_static / t_flex / out["ideal_speedup"]
        for row in out["grids"]:
            row[f"speedup_{stat}"] = t_static / row[f"{stat}_s"]
    out["times_s"] = times
    return out


def to_markdown(rows: list[dict], flops_rows: list[dict], meta: dict) -> str:
    r0 = rows[0]
    lines = ["## Speed (forward of one batch; FlexDiT averaged over its schedule's grids)", "",
             f"`python benchmarks/flexdit_speed.py`: torch {meta['torch']}, {meta['threads']} threads, commit "
             f"{meta['source']['commit']}{' with uncommitted changes' if meta['source']['dirty'] else ''}, "
             f"{r0['repeats']} interleaved rounds{'' if r0['warmup'] else ' (no warm-up)'}; speedup = static time / "
             "time-share-weighted FlexDiT time over the grids 10x10 .. 6x6; ideal = the same ratio of FLOPs.", "",
             "| model | px | device | batch | GFLOPs static / FlexDiT | static ms | FlexDiT ms | speedup | ideal | "
             "of ideal | best-of speedup | best-of of ideal |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['image_size']} | {r['device']} {r['dtype']} | {r['batch']} | "
            f"{r['gflops_static']:.2f} / {r['gflops_flexdit']:.2f} | {1e3 * r['static_median_s']:.0f} | "
            f"{1e3 * r['flexdit_median_s']:.0f} | {r['speedup_median']:.2f}x | {r['ideal_speedup']:.2f}x | "
            f"{r['fraction_of_ideal_median']:.2f} | {r['speedup_best']:.2f}x | {r['fraction_of_ideal_best']:.2f} |")
    lines += ["", "Per grid (median speedup / best-of speedup / ideal):", ""]
    for r in rows:
        cells = ", ".join(f"{g['grid']}x{g['grid']}: {g['speedup_median']:.2f}x / {g['speedup_best']:.2f}x / "
                          f"{g['ideal_speedup']:.2f}x" for g in r["grids"])
        lines.append(f"- {r['model']} {r['image_size']}px (layout {r['layout']}): {cells}")
    lines += ["", "## FLOPs against the paper (GFLOPs per image; FlexDiT: mean over the 250 respaced DDPM steps)", "",
              "analytic: every multiply-accumulate, attention scores included, as the static baselines and the "
              "paper's table count; fvcore: as fvcore counts the released code (fused attention scores uncounted), "
              "as the released logs count (`dydit_dist.dynamic.flexdit_flops`).", "", comparison_table(flops_rows)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-B/2")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed first pass (slow CPUs)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--tag", default="", help="suffix of the result files (e.g. h100)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    rows = [bench_size(args.model, s, args.batch, args.repeats, args.device, dtype, not args.no_warmup) for s in args.sizes]
    flops_rows = paper_comparison()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "flexdit_speed" + (f"_{args.tag}" if args.tag else "")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor(),
            "source": stamp()}
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "speed": rows, "flops": flops_rows}, indent=2))
    table = to_markdown(rows, flops_rows, meta)
    (RESULTS / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
