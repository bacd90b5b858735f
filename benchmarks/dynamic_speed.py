"""DyDiT speed: static vs masked vs fast path, side by side in one run, against the FLOPs-ideal speedup.

    python benchmarks/dynamic_speed.py [--models DiT-S/2 DiT-B/2] [--batch 8] [--repeats 5] [--device cpu]
        [--dtype fp32|bf16]

Routers are set (seeded) to keep about half the FLOPs: half the heads, ~60% of the MLP groups and
~80% of the tokens in every block, varying per block. Each forward is a classifier-free-guided call
(2 x batch images). Timings are interleaved round-robin (static, masked, fast, static, ...) so a noisy
machine affects all three alike; the median is reported. Results: benchmarks/results/dynamic_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from stamp import stamp

from dydit_dist.diffusion import cfg_class_batch, cfg_model_fn
from dydit_dist.dynamic import DyDiT, FastPath
from dydit_dist.dynamic.dydit_flops import flops_of_output, static_flops
from dydit_dist.models.registry import arch

RESULTS = Path(__file__).parent / "results"


def set_routers(model: DyDiT, heads_keep=0.5, groups_keep=0.6, tokens_keep=0.8, seed=0) -> None:
    """Width routers that keep a fixed random subset per block; token routers keeping ~tokens_keep."""
    g = torch.Generator().manual_seed(seed)
    H = model.blocks[0].attn.num_heads
    with torch.no_grad():
        for block in model.blocks:
            for router, keep in ((block.attn_rate.router, heads_keep), (block.mlp_rate.router, groups_keep)):
                n_on = max(round(keep * H) - 1, 0)  # unit 0 is always on
                on = torch.randperm(H - 1, generator=g)[:n_on]
                bias = torch.full((H - 1,), -10.0)
                bias[on] = 10.0
                router.weight.zero_()
                router.bias.copy_(bias)
            head = block.token_selection.mlp_head
            head[0].weight.copy_(torch.randn(head[0].weight.shape, generator=g) * 0.05)
            head[0].bias.zero_()
            head[2].weight.copy_(torch.randn(head[2].weight.shape, generator=g))
            head[2].bias.zero_()


def calibrate_token_bias(model, x, t, y, keep: float) -> None:
    """Shift each block's token-router bias so that about `keep` of the tokens pass at this input."""
    with torch.no_grad():
        for block in model.blocks:  # in order: block i's logits depend on the calibrated blocks before it
            captured: list[torch.Tensor] = []
            hook = block.token_selection.register_forward_hook(lambda m, a, o, out=captured: out.append(o))
            model(x, t, y)
            hook.remove()
            block.token_selection.mlp_head[2].bias -= torch.quantile(captured[0].flatten(), 1 - keep)


def randomize_weights(model, seed=0) -> None:
    """Non-trivial static weights (official init zeroes adaLN and the output layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not any(k in name for k in ("attn_rate", "mlp_rate", "token_selection")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def bench_model(name: str, batch: int, repeats: int, device: str, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    model = DyDiT(input_size=32, num_classes=1000, **arch(name))
    randomize_weights(model)
    set_routers(model)
    model = model.to(device).eval()
    x = torch.randn(batch, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    x2, y2 = cfg_class_batch(x, y, 1000)
    t2 = torch.full((2 * batch,), 500, device=device)
    calibrate_token_bias(model, x2, t2, y2, keep=0.8)
    model = model.to(dtype)
    x2 = x2.to(dtype)

    fast = FastPath(model)
    paths = {
        "static": cfg_model_fn(model.static_forward, 1.5),
        "masked": cfg_model_fn(lambda a, b, **kw: model(a, b, **kw).out, 1.5),
        "fast": cfg_model_fn(lambda a, b, **kw: fast(a, b, timestep=500, **kw), 1.5),  # as the samplers call it
    }
    with torch.inference_mode():
        outs = {k: fn(x2, t2, y=y2) for k, fn in paths.items()}  # warm-up (and plan/slice caches)
        err = float((outs["fast"].float() - outs["masked"].float()).abs().max())
        result = model(x2, t2, y2)
        f_dyn = float(flops_of_output(model, result).mean())
        times = {k: [] for k in paths}
        for _ in range(repeats):
            for k, fn in paths.items():
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn(x2, t2, y=y2)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - start)
    f_static = static_flops(model)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}  # noise on a shared machine only adds time
    ideal = f_static / f_dyn
    measured = med["static"] / med["fast"]
    return {
        "model": name, "batch": batch, "images_per_forward": 2 * batch, "device": device, "dtype": str(dtype),
        "static_s": med["static"], "masked_s": med["masked"], "fast_s": med["fast"],
        "gflops_static": f_static / 1e9, "gflops_dynamic": f_dyn / 1e9,
        "flops_ratio": f_dyn / f_static,
        "heads_on": float(result.head_masks.float().mean()), "groups_on": float(result.mlp_masks.float().mean()),
        "tokens_on": float(result.token_masks.float().mean()),
        "ideal_speedup": ideal, "measured_speedup": measured, "masked_speedup": med["static"] / med["masked"],
        "fraction_of_ideal": measured / ideal, "max_abs_fast_vs_masked": err,
        "measured_speedup_best": best["static"] / best["fast"],
        "fraction_of_ideal_best": best["static"] / best["fast"] / ideal,
    }


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| model | device | batch (x2 cfg) | GFLOPs static | GFLOPs dyn | heads/groups/tokens on | static ms | "
        "masked ms | fast ms | masked speedup | fast speedup | ideal | fast/ideal | fast/ideal (best-of) |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['device']} {r['dtype'].removeprefix('torch.')} | {r['batch']} | "
            f"{r['gflops_static']:.2f} | {r['gflops_dynamic']:.2f} | "
            f"{r['heads_on']:.2f}/{r['groups_on']:.2f}/{r['tokens_on']:.2f} | {1e3 * r['static_s']:.1f} | "
            f"{1e3 * r['masked_s']:.1f} | {1e3 * r['fast_s']:.1f} | {r['masked_speedup']:.2f}x | "
            f"{r['measured_speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['fraction_of_ideal']:.2f} | "
            f"{r['fraction_of_ideal_best']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-B/2"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--tag", default="")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    rows = [bench_model(m, args.batch, args.repeats, args.device, dtype) for m in args.models]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "dynamic_speed" + (f"_{args.tag}" if args.tag else "")
    source = stamp()
    source["threads"] = torch.get_num_threads()
    (RESULTS / f"{stem}.json").write_text(json.dumps({"source": source, "rows": rows}, indent=2))
    table = (f"Measured at commit {source['commit']}{' with uncommitted changes' if source['dirty'] else ''}.\n\n"
             + to_markdown(rows))
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
