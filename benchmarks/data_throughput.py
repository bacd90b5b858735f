"""Reader throughput against what one GPU's training step consumes: does the data stream keep training fed?

    python benchmarks/data_throughput.py [--samples 4096] [--shard-size 512] [--batch 32] [--workers 2]
        [--seconds 8] [--skip-s3] [--render]

1. Writes synthetic shards (the prepare job's format) of DiT-XL/2-sized latents (4x32x32 fp16,
   `sample` and `mean_std` storage) and of the `debug` preset's pixels (4x16x16 fp16), to a local
   folder and to an S3 server (moto, in this process, on 127.0.0.1).
2. Streams each with `LatentStream` (1 rank, `--workers` DataLoader workers, batch `--batch`) for
   `--seconds` after the first batch, and reports samples/s.
3. Compares each training preset's reader (its own `data.latent_storage`) with the images/s one GPU's
   training step consumes, ESTIMATED as the README's cost table does: 3 x 2 x the network's analytic
   MACs per image (forward + backward; DyDiT trains its masked network, the static cost, and stage 1
   runs the complete model once more: twice) at 400 TFLOP/s sustained
   (`estimate.SUSTAINED_FLOPS`, 40% of an H100's dense bf16 peak). A CPU training step is no yardstick:
   it consumes ~10^4 times less than a GPU. `benchmarks/gpu_check.py` measures the GPU step itself.

The reader should deliver at least 2x what the GPU consumes per the workers it runs with (it runs ahead
of the step in DataLoader workers; a GPU node has 8-24 cores per GPU, this machine 2 in all).
Results: benchmarks/results/data_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from stamp import stamp

from dydit_dist import config, storage
from dydit_dist.data import LatentStream
from dydit_dist.data.synthetic import write_dataset

RESULTS = Path(__file__).parent / "results"
T5_TOKENS = 120  # PixArt's model_max_length: the largest T5 payload per sample (240 kB x 4 = 0.98 MB in fp16)


def make_data(uri: str, shape: tuple[int, ...], n: int, shard_size: int, kind: str) -> None:
    rng = np.random.default_rng(0)
    if kind == "caption":  # PixArt: latent mean and std, and T5-XXL features of a caption at the 120-token maximum
        latents = np.stack([rng.standard_normal((n, *shape)), np.abs(rng.standard_normal((n, *shape)))], axis=1)
        t5 = [rng.standard_normal((T5_TOKENS, 4096)).astype(np.float16) for _ in range(n)]
        write_dataset(uri, latents.astype(np.float16), t5=t5, t5_masks=np.ones((n, T5_TOKENS), np.int64),
                      shard_size=shard_size, latent_storage="mean_std", vae="stabilityai/sd-vae-ft-ema",
                      scale_factor=0.18215, text_encoder="DeepFloyd/t5-v1_1-xxl")
    elif kind == "mean_std":
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


PRESETS = [("dit_xl2_256", "static fine-tune; DyDiT stage 2 costs the same", 1),
           ("dydit_xl2_256_lambda0.5", "DyDiT stage 1: the complete model's pass too", 2),
           ("pixart_xl2_256", "PixArt-alpha, 120-token captions", 1)]


def gpu_rows(reader: list[dict]) -> list[dict]:
    """Per preset: the images/s one GPU's training step consumes, estimated from analytic FLOPs as the cost
    table (`estimate.training_flop`: DyDiT trains its masked network, the static cost; stage 1 twice), against
    the measured reader of the preset's own storage."""
    from dydit_dist.estimate import SUSTAINED_FLOPS, training_flop

    def rate(kind: str, source: str) -> float | None:
        rates = [r["samples_per_s"] for r in reader if r["storage"] == kind and r["source"] == source]
        return rates[0] if rates else None

    rows = []
    for preset, what, passes in PRESETS:
        cfg = config.load(preset)
        flop = passes * training_flop(cfg.model)
        kind = "caption" if cfg.data.source_format == "captions" else cfg.data.latent_storage
        gpu = SUSTAINED_FLOPS / flop
        local, s3 = rate(kind, "local"), rate(kind, "s3 (moto)")
        rows.append({"preset": preset, "what": what, "storage": kind, "gflop_per_image": flop / 1e9,
                     "gpu_images_per_s": gpu, "ratio_local": local / gpu if local else None,
                     "ratio_s3": s3 / gpu if s3 else None})
    return rows


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
        f"{results['machine']}; commit {(results.get('source') or {}).get('commit', '?')[:7]}; reader: 1 rank, {results['args']['workers']} DataLoader workers, batch "
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
    workers = results["args"]["workers"]
    lines += ["", f"One GPU's training step (estimated: analytic FLOPs at 400 TFLOP/s, the cost table's assumption) "
              f"against the reader of the preset's own storage, {workers} DataLoader workers:", "",
              "| preset | storage | GFLOP per image | GPU images/s (est.) | reader local / GPU | reader S3 / GPU | "
              ">= 2x |", "|---|---|---:|---:|---:|---:|:-:|"]
    for t in results["gpu"]:
        ratios = [r for r in (t["ratio_local"], t.get("ratio_s3")) if r is not None]
        s3 = f"{t['ratio_s3']:.1f}x" if t.get("ratio_s3") is not None else "-"
        lines.append(f"| {t['preset']} ({t['what']}) | {t['storage']} | {t['gflop_per_image']:,.0f} | "
                     f"{t['gpu_images_per_s']:,.0f} | {t['ratio_local']:.1f}x | {s3} | "
                     f"{'yes' if min(ratios) >= 2 else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON")
    args = parser.parse_args()
    if args.render:  # the GPU rows recomputed from the measured readers (their estimate is arithmetic)
        results = json.loads((RESULTS / "data_throughput.json").read_text())
        results["gpu"] = gpu_rows(results["reader"])
        results["gpu_rows_rendered_at"] = stamp()
        (RESULTS / "data_throughput.json").write_text(json.dumps(results, indent=2))
        (RESULTS / "data_throughput.md").write_text(markdown(results))
        print(markdown(results))
        return

    datasets = [("DiT-XL/2 latents 4x32x32 fp16", "sample", (4, 32, 32)),
                ("DiT-XL/2 latents 4x32x32 fp16", "mean_std", (4, 32, 32)),
                ("debug pixels 4x16x16 fp16", "pixels", (4, 16, 16)),
                (f"PixArt 256 latents + T5 features {T5_TOKENS}x4096 fp16", "caption", (4, 32, 32))]
    server = None if args.skip_s3 else start_s3()
    reader = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, shape in datasets:
            roots = [("local", f"{tmp}/{kind}")]
            if server is not None:
                roots.append(("s3 (moto)", f"s3://bench/{kind}"))
            for source, uri in roots:
                # ~1 MB per caption sample: fewer of them, in smaller shards
                small = kind == "caption"
                make_data(uri, shape, args.samples // 8 if small else args.samples,
                          args.shard_size // 8 if small else args.shard_size, kind)
                rate = reader_rate(uri, args.batch, args.workers, args.seconds)
                reader.append({"data": name, "storage": kind, "source": source, **rate})
                print(reader[-1], flush=True)
    if server is not None:
        server.stop()

    gpu = gpu_rows(reader)
    for row in gpu:
        print(row, flush=True)

    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                          f"torch {torch.__version__}, {torch.get_num_threads()} threads",
               "source": stamp(), "args": vars(args), "reader": reader, "gpu": gpu}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_throughput.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "data_throughput.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
