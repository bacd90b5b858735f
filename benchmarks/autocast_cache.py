"""Autocast's weight-cast cache on the sampling network: one network call under bf16 autocast (inside one
autocast region, as a sampling batch runs all its steps), the weights requiring grad (cached: cast once per
region, what `network.sampling_network` returns since stop 34) against not (every weight cast again per call).

    python benchmarks/autocast_cache.py [--model DiT-XL/2] [--batch 1 8] [--calls 5] [--rounds 3] [--device cpu]

Interleaved rounds, median per setting, written to benchmarks/results/autocast_cache.{json,md}. On a CPU the
cast is a large share of a small batch; the ratio says how much of a call the casts took, not a GPU speedup.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from stamp import stamp

from dydit_dist.models import build_model

RESULTS = Path(__file__).resolve().parent / "results"


def time_calls(model, batch: int, calls: int, device: torch.device) -> float:
    """Seconds per network call, after one warm-up call in the same autocast region."""
    size = model.x_embedder.img_size
    x = torch.randn(batch, model.in_channels, size, size, device=device)
    t, y = torch.full((batch,), 500, device=device), torch.zeros(batch, dtype=torch.long, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        model(x, t, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            model(x, t, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--input-size", type=int, default=8, help="latent size (8: a small call, cast-heavy)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS / "autocast_cache"))
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build_model(args.model, input_size=args.input_size, num_classes=1000).to(device).eval()
    rows = []
    for batch in args.batch:
        seconds = {True: [], False: []}
        for _ in range(args.rounds):  # interleaved: the machine's noise falls on both alike
            for grad in (True, False):
                model.requires_grad_(grad)
                seconds[grad].append(time_calls(model, batch, args.calls, device))
        cached, recast = statistics.median(seconds[True]), statistics.median(seconds[False])
        rows.append({"batch": batch, "cached_s": cached, "recast_s": recast, "ratio": recast / cached})
        print(f"batch {batch}: cached {cached:.3f} s, re-cast {recast:.3f} s per call: {recast / cached:.2f}x", flush=True)
    result = {"model": args.model, "input_size": args.input_size, "device": device.type,
              "threads": torch.get_num_threads(), "calls": args.calls, "rounds": args.rounds, "rows": rows, **stamp()}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    lines = [f"# Autocast's weight-cast cache: {args.model} at {args.input_size}x{args.input_size} latents, bf16, "
             f"{device.type} ({torch.get_num_threads()} threads)", "",
             "| batch | weights cached (s/call) | re-cast every call (s/call) | re-cast / cached |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['cached_s']:.3f} | {r['recast_s']:.3f} | {r['ratio']:.2f}x |" for r in rows]
    lines += ["", f"Median of {args.rounds} interleaved rounds of {args.calls} calls; commit {result['commit']}."]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
