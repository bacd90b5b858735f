"""Fine-tuning throughput: the bare PyTorch loop against the Ray Train + DeepSpeed job, side by side.

    python benchmarks/train_throughput.py compare [--micro-batch 32] [--steps 60] [--log-every 10]
    python benchmarks/train_throughput.py step --model DiT-XL/2 --micro-batch 32 --precision bf16 --stages 1 2 3

`compare` (CPU, one run): samples/s of the `debug` DyDiT (stage 1: dynamic + complete-model + FLOPs
losses) in
  1. a bare single-process loop: the same objective, torch AdamW, batches already in memory, 1 thread;
  2. `jobs.finetune` with 1 worker, ZeRO-0 (Ray Train + DeepSpeed + the shard reader + EMA + metrics);
  3. `jobs.finetune` with 2 workers, ZeRO-2 (gloo all-reduce / reduce-scatter between them).
Each worker has 1 CPU (1 torch thread), like the bare loop; the job's throughput is read back from its
TensorBoard event files (median over log windows, the first one dropped as warm-up). Runs are
interleaved (bare, job 1, bare, job 2, bare): each job is compared with the mean of the bare runs on
either side. On a shared machine wall-clock throughput mostly measures the neighbours, so the
overhead is computed on samples per CPU-second of the process (the job reports its CPU seconds per
step): overhead = 1 - job samples per CPU-s per worker / bare samples per CPU-s; `overhead_wall` is
the same on wall-clock samples/s.

`step` (any device, one process, world size 1): the training step of a model at a micro-batch under
each ZeRO stage: samples/s and peak device memory. On a GPU this is the DiT-XL/2 DyDiT measurement.

Results: benchmarks/results/train_throughput[_step].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dydit_dist import config as config_lib
from dydit_dist.train.network import build_network
from dydit_dist.train.step import DiffusionObjective, draw_inputs, step_generator

RESULTS = Path(__file__).parent / "results"


def bare_loop(cfg, steps: int, warmup: int = 5) -> dict:
    """samples/s and samples per CPU-second of the plain PyTorch loop: objective, backward, AdamW step,
    in-memory batches."""
    torch.manual_seed(0)
    network = build_network(cfg.model)
    objective = DiffusionObjective(network, cfg)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=cfg.train.lr)
    b, m = cfg.train.micro_batch_size, cfg.model
    batches = [{"x": torch.randn(b, m.in_channels, m.input_size, m.input_size),
                "y": torch.randint(0, m.num_classes, (b,))} for _ in range(8)]
    start = cpu = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start, cpu = time.perf_counter(), time.process_time()
        g = step_generator(0, 0, step, 0, "cpu")
        terms = objective(**draw_inputs(batches[step % 8], network, cfg, g, "cpu"), step=step, generator=g)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.train.grad_clip)
        optimizer.step()
    return {"samples_per_s": steps * b / (time.perf_counter() - start),
            "samples_per_cpu_s": steps * b / (time.process_time() - cpu)}


def job_throughput(root: str, run: str, workers: int, stage: int, micro: int, steps: int, log_every: int) -> dict:
    """Run jobs.finetune and read its per-window samples/s and CPU s/step back from TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from jobs import finetune

    argv = ["--config", "debug", "model.method=dydit", f"ray.num_workers={workers}", "ray.cpus_per_worker=1",
            f"train.micro_batch_size={micro}", f"train.global_batch_size={micro * workers}",
            f"train.max_steps={steps}", f"train.log_every={log_every}", f"train.checkpoint_every={steps}",
            f"deepspeed.zero_stage={stage}", "data.num_workers=0", f"data.uri={root}/data",
            f"storage.root={root}", f"storage.run={run}"]
    start = time.perf_counter()
    finetune.run(argv)
    wall = time.perf_counter() - start
    values, cpu = [], []
    for name in sorted(os.listdir(f"{root}/runs/{run}/tensorboard")):
        acc = EventAccumulator(f"{root}/runs/{run}/tensorboard/{name}")
        acc.Reload()
        if "samples_per_s" in acc.Tags()["scalars"]:  # a restarted run that had nothing left to do logs none
            values += [e.value for e in acc.Scalars("samples_per_s")]
            cpu += [e.value for e in acc.Scalars("cpu_s_per_step")]
    total = statistics.median(values[1:] or values)
    return {"samples_per_s": total, "per_worker": total / workers,
            "per_worker_per_cpu_s": micro / statistics.median(cpu[1:] or cpu),
            "windows": values, "cpu_s_per_step": cpu, "job_wall_s": wall}


def compare(args) -> None:
    import ray

    from dydit_dist.data.synthetic import random_dataset

    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="tt", dir="/tmp")
    cfg = config_lib.load("debug", ["model.method=dydit", "ray.num_workers=1", f"train.micro_batch_size={args.micro_batch}",
                                    f"train.global_batch_size={args.micro_batch}"])
    random_dataset(f"{root}/data", cfg, num_samples=2048, shard_size=512)
    ray.init(address="local", num_cpus=2, _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
             include_dashboard=False, logging_level=logging.WARNING)
    # Interleaved (bare, job, bare, job, bare): each job is compared with the bare runs on either side.
    bare = [bare_loop(cfg, args.steps)]
    one = job_throughput(root, "one", 1, 0, args.micro_batch, args.steps, args.log_every)
    bare.append(bare_loop(cfg, args.steps))
    two = job_throughput(root, "two", 2, 2, args.micro_batch, args.steps, args.log_every)
    bare.append(bare_loop(cfg, args.steps))
    ray.shutdown()
    ref_one = {k: (bare[0][k] + bare[1][k]) / 2 for k in bare[0]}
    ref_two = {k: (bare[1][k] + bare[2][k]) / 2 for k in bare[0]}
    mean = {k: statistics.mean(r[k] for r in bare) for k in bare[0]}
    rows = [
        {"setup": "bare PyTorch loop, 1 process, 1 thread", "workers": 1, "zero": "-",
         "samples_per_s": mean["samples_per_s"], "per_worker": mean["samples_per_s"], "overhead_wall": 0.0,
         "per_worker_per_cpu_s": mean["samples_per_cpu_s"], "overhead": 0.0, "detail": {"runs": bare}},
        {"setup": "jobs.finetune, 1 worker", "workers": 1, "zero": 0, **_summary(one, ref_one)},
        {"setup": "jobs.finetune, 2 workers", "workers": 2, "zero": 2, **_summary(two, ref_two)},
    ]
    header = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; debug DyDiT stage 1 (fp32), "
              f"micro-batch {args.micro_batch} per worker, {args.steps} steps, samples/s = median of "
              f"{args.log_every}-step windows after the first; 1 CPU and 1 thread per worker. overhead = 1 - "
              "per-worker samples per CPU-second of the worker process / the bare loop's (CPU time does not "
              "count waiting for a core on a shared machine); overhead_wall is the same on wall-clock samples/s.")
    _write("train_throughput", rows, header, ["setup", "workers", "zero", "samples_per_s", "per_worker",
                                              "overhead_wall", "per_worker_per_cpu_s", "overhead"])


def _summary(job: dict, bare: dict) -> dict:
    return {"samples_per_s": job["samples_per_s"], "per_worker": job["per_worker"],
            "overhead_wall": 1 - job["per_worker"] / bare["samples_per_s"],
            "per_worker_per_cpu_s": job["per_worker_per_cpu_s"],
            "overhead": 1 - job["per_worker_per_cpu_s"] / bare["samples_per_cpu_s"],
            "detail": {**job, "bare_reference": bare}}


def step(args) -> None:
    """Each ZeRO stage on one device (world size 1): samples/s and peak memory of the training step."""
    from dydit_dist.train.deepspeed_setup import init_single_process, initialize

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    init_single_process()
    rows = []
    for stage in args.stages:
        size = 256 if args.model.startswith("DiT-XL") else 16
        cfg = config_lib.load("dit_xl2_256" if size == 256 else "debug", [
            f"model.name={args.model}", "model.method=dydit", "ray.num_workers=1", f"deepspeed.zero_stage={stage}",
            f"train.micro_batch_size={args.micro_batch}", f"train.global_batch_size={args.micro_batch}",
            f"train.precision={args.precision}", "model.checkpoint=null"])
        network = build_network(cfg.model).to(device)
        engine = initialize(DiffusionObjective(network, cfg), cfg, world_size=1)
        m = cfg.model
        batch = {"x": torch.randn(args.micro_batch, m.in_channels, m.input_size, m.input_size, device=device),
                 "y": torch.randint(0, m.num_classes, (args.micro_batch,), device=device)}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                _sync(device)
                start = time.perf_counter()
            g = step_generator(0, 0, i, 0, device)
            terms = engine(**draw_inputs(batch, network, cfg, g, device), step=i, generator=g)
            engine.backward(terms["loss"])
            engine.step()
        _sync(device)
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        rows.append({"model": args.model, "zero": stage, "precision": args.precision, "micro_batch": args.micro_batch,
                     "samples_per_s": args.steps * args.micro_batch / elapsed, "peak_gib": peak,
                     "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
        print(rows[-1], flush=True)
        del engine, network
    _write(f"train_throughput_step{args.tag}", rows, f"torch {torch.__version__}; DyDiT stage 1 training step, "
           f"world size 1, {args.steps} timed steps after {args.warmup}",
           ["model", "device", "zero", "precision", "micro_batch", "samples_per_s", "peak_gib"])


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _write(stem: str, rows: list[dict], header: str, columns: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    def fmt(column: str, v) -> str:
        if column.startswith("overhead"):
            return f"{v:.1%}"
        return f"{v:,.2f}" if isinstance(v, float) else str(v)

    lines = [f"# {stem.replace('_', ' ')}", "", header, "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(c, r[c]) for c in columns) + " |" for r in rows]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="bare loop vs the job with 1 worker (ZeRO-0) and 2 workers (ZeRO-2)")
    c.add_argument("--micro-batch", type=int, default=32)
    c.add_argument("--steps", type=int, default=60)
    c.add_argument("--log-every", type=int, default=10)
    s = sub.add_parser("step", help="one device: the training step under each ZeRO stage")
    s.add_argument("--model", default="DiT-XL/2")
    s.add_argument("--micro-batch", type=int, default=32)
    s.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    s.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--tag", default="")
    args = parser.parse_args()
    compare(args) if args.command == "compare" else step(args)


if __name__ == "__main__":
    main()
