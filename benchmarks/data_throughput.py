"""Reader throughput against what a training step consumes: does the data stream keep training fed?

    python benchmarks/data_throughput.py [--samples 4096] [--shard-size 512] [--batch 32] [--workers 2]
        [--seconds 8] [--xl-batch 2] [--xl-steps 2] [--skip-xl] [--skip-s3] [--render]

1. Writes synthetic shards (the prepare job's format) of DiT-XL/2-sized latents (4x32x32 fp16,
   `sample` and `mean_std` storage) and of the `debug` preset's pixels (4x16x16 fp16), to a local
   folder and to an S3 server (moto, in this process, on 127.0.0.1).
2. Streams each with `LatentStream` (1 rank, `--workers` DataLoader workers, batch `--batch`) for
   `--seconds` after the first batch, and reports samples/s.
3. Times a plain training step (forward, epsilon-MSE loss, backward, AdamW) of the `debug` and
   `dit_xl2_256` models on this machine's CPU and reports the samples/s it consumes.

The reader must be at least 10x faster than the step it feeds. Results: benchmarks/results/data_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dydit_dist import config, storage
from dydit_dist.data import LatentStream
from dydit_dist.data.synthetic import write_dataset

RESULTS = Path(__file__).parent / "results"


def make_data(uri: str, shape: tuple[int, ...], n: int, shard_size: int, kind: str) -> None:
    rng = np.random.default_rng(0)
    if kind == "mean_std":
        latents = np.stack([rng.standard_normal((n, *shape)), np.abs(rng.standard_normal((n, *shape)))], axis=1)
        write_dataset(uri, latents.astype(np.float16), labels=rng.integers(0, 1000, n), shard_size=shard_size,
                      latent_storage="mean_std", vae="stabilityai/sd-vae-ft-ema", scale_factor=0.18215,
                      num_classes=1000)
    elif kind == "sample":
        write_dataset(uri, rng.standard_normal((n, *shape)).astype(np.float16), labels=rng.integers(0, 1000, n),
                      shard_size=shard_size, latent_storage="sample", vae="stabilityai/sd-vae-ft-ema",
                      scale_factor=0.18215, num_classes=1000)
    else:
        write_dataset(uri, rng.uniform(-1, 1, (n, *shape)).astype(np.float16), labels=rng.integers(0, 10, n),
                      shard_size=shard_size, num_classes=10)


def reader_rate(uri: str, batch: int, workers: int, seconds: float) -> dict:
    stream = LatentStream(uri, batch_size=batch, num_workers=workers, shuffle_buffer=1000, seed=0)
    batches = iter(stream)
    start = time.perf_counter()
    next(batches)
    first = time.perf_counter() - start
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next(batches)["x"])
    elapsed = time.perf_counter() - start
    del batches
    return {"samples_per_s": count / elapsed, "first_batch_s": first, "samples": count}


def train_rate(preset: str, batch: int, steps: int) -> dict:
    """Samples/s of forward + epsilon-MSE + backward + AdamW on CPU (median step, after one warm-up)."""
    from dydit_dist.models import build_model

    cfg = config.load(preset)
    m = cfg.model
    torch.manual_seed(0)
    model = build_model(m.name, input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes,
                        learn_sigma=m.learn_sigma)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    alphas = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), dim=0)
    x0 = torch.randn(batch, m.in_channels, m.input_size, m.input_size)
    y = torch.randint(0, m.num_classes, (batch,))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        out = model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, y)
        loss = torch.nn.functional.mse_loss(out[:, : m.in_channels], noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    step = statistics.median(times[1:])
    return {"batch": batch, "step_s": step, "samples_per_s": batch / step, "steps": steps,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def start_s3():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    storage.configure(endpoint_url=f"http://127.0.0.1:{port}")
    fs, _ = storage.filesystem("s3://bench")
    fs.mkdir("bench")
    return server


def markdown(results: dict) -> str:
    lines = [
        "# Data throughput",
        "",
        f"{results['machine']}; reader: 1 rank, {results['args']['workers']} DataLoader workers, batch "
        f"{results['args']['batch']}, {results['args']['samples']} samples in shards of {results['args']['shard_size']}, "
        f"{results['args']['seconds']} s per measurement after the first batch. The S3 server is moto, in the "
        "benchmark's own process: a lower bound for a real object store.",
        "",
        "| data | storage | source | reader samples/s | first batch (s) |",
        "|---|---|---|---:|---:|",
    ]
    for r in results["reader"]:
        lines.append(f"| {r['data']} | {r['storage']} | {r['source']} | {r['samples_per_s']:,.0f} | "
                     f"{r['first_batch_s']:.2f} |")
    lines += ["", "| training step (CPU) | batch | step (s) | samples/s consumed | reader local / step | "
              "reader S3 / step | >= 10x |", "|---|---:|---:|---:|---:|---:|:-:|"]
    for t in results["train"]:
        ok = min(t["ratio_local"], t.get("ratio_s3") or t["ratio_local"]) >= 10
        s3 = f"{t['ratio_s3']:,.0f}x" if t.get("ratio_s3") else "-"
        lines.append(f"| {t['preset']} ({t['params_m']:.1f}M params) | {t['batch']} | {t['step_s']:.3f} | "
                     f"{t['samples_per_s']:.3g} | {t['ratio_local']:,.0f}x | {s3} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--debug-batch", type=int, default=4)
    parser.add_argument("--xl-batch", type=int, default=2)
    parser.add_argument("--xl-steps", type=int, default=2)
    parser.add_argument("--skip-xl", action="store_true")
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON")
    args = parser.parse_args()
    if args.render:
        results = json.loads((RESULTS / "data_throughput.json").read_text())
        (RESULTS / "data_throughput.md").write_text(markdown(results))
        print(markdown(results))
        return

    datasets = [("DiT-XL/2 latents 4x32x32 fp16", "sample", (4, 32, 32)),
                ("DiT-XL/2 latents 4x32x32 fp16", "mean_std", (4, 32, 32)),
                ("debug pixels 4x16x16 fp16", "pixels", (4, 16, 16))]
    server = None if args.skip_s3 else start_s3()
    reader = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, shape in datasets:
            roots = [("local", f"{tmp}/{kind}")]
            if server is not None and kind != "mean_std":
                roots.append(("s3 (moto)", f"s3://bench/{kind}"))
            for source, uri in roots:
                make_data(uri, shape, args.samples, args.shard_size, kind)
                rate = reader_rate(uri, args.batch, args.workers, args.seconds)
                reader.append({"data": name, "storage": kind, "source": source, **rate})
                print(reader[-1], flush=True)
    if server is not None:
        server.stop()

    def best(kind: str, source: str) -> float | None:
        rates = [r["samples_per_s"] for r in reader if r["storage"] == kind and r["source"] == source]
        return rates[0] if rates else None

    train = []
    for preset, batch, steps, kind in [("debug", args.debug_batch, 5, "pixels"),
                                       ("dit_xl2_256", args.xl_batch, args.xl_steps, "sample")]:
        if preset == "dit_xl2_256" and args.skip_xl:
            continue
        rate = train_rate(preset, batch, steps)
        s3 = best(kind, "s3 (moto)")
        train.append({"preset": preset, **rate, "ratio_local": best(kind, "local") / rate["samples_per_s"],
                      "ratio_s3": s3 / rate["samples_per_s"] if s3 else None})
        print(train[-1], flush=True)

    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                          f"torch {torch.__version__}, {torch.get_num_threads()} threads",
               "args": vars(args), "reader": reader, "train": train}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_throughput.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "data_throughput.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
