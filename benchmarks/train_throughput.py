"""Fine-tuning throughput: the bare PyTorch loop against the Ray Train + DeepSpeed job, side by side.

    python benchmarks/train_throughput.py compare [--micro-batch 32] [--steps 60] [--log-every 10]
    python benchmarks/train_throughput.py step --model DiT-XL/2 --micro-batch 32 --precision bf16 --stages 1 2 3

`compare` (CPU, one run): samples/s of the `debug` DyDiT (stage 1: dynamic + complete-model + FLOPs
losses) in
  1. a bare single-process loop: the same objective, torch AdamW, batches already in memory, 1 thread;
  2. `jobs.finetune` with 1 worker, ZeRO-0 (Ray Train + DeepSpeed + the shard reader + EMA + metrics);
  3. `jobs.finetune` with 2 workers, ZeRO-2 (gloo all-reduce / reduce-scatter between them).
Each worker has 1 CPU (1 torch thread), like the bare loop; the job's throughput is read back from its
TensorBoard event files (median over log windows, the first one dropped as warm-up). The runs are
interleaved in `--rounds` rounds of (bare, bare pair, job 1, job 2), closed by a last (bare, bare pair):
each job run is compared with the mean of the references on either side of its round, and the table
gives the median round with the range, because on a shared 2-core machine one run's wall clock can
move by 10%.

  overhead_wall = 1 - job samples/s per worker / bare samples/s          (the criterion: < 15%)
  overhead_cpu  = the same on samples per CPU-second of the worker process (the job reports its CPU
                  seconds per step): the job's own work, without the time it waits for a core.

While each job trains, a sampler reads every process's CPU time from /proc once a second; over the
training window (first to last TensorBoard window) it splits the machine's CPU between the training
workers, Ray's other processes (controller, raylet, GCS, idle actors, the driver) and everything else,
and counts the workers' minor page faults and kernel CPU share (the bare loop's come from getrusage).
With 2 workers on 2 cores there is no idle core left for Ray's processes, so their share comes out of
the workers' wall clock; it is reported beside the overheads. Two busy processes also slow each other
down on a small VM (shared caches, memory bandwidth, the hypervisor): each round also times two bare
loops at once in two processes ("bare pair"), and `overhead_vs_pair` compares the 2-worker job with
that, so the machine's own cost of having both cores busy is told apart from the job's.

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
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

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
    usage = None
    for step in range(warmup + steps):
        if step == warmup:
            start, cpu, usage = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
        g = step_generator(0, 0, step, 0, "cpu")
        terms = objective(**draw_inputs(batches[step % 8], network, cfg, g, "cpu"), step=step, generator=g)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.train.grad_clip)
        optimizer.step()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    end = resource.getrusage(resource.RUSAGE_SELF)
    return {"samples_per_s": steps * b / wall, "samples_per_cpu_s": steps * b / cpu,
            "faults_per_s": (end.ru_minflt - usage.ru_minflt) / wall,
            "system_share": (end.ru_stime - usage.ru_stime) / cpu}


def job_throughput(root: str, run: str, workers: int, stage: int, micro: int, steps: int, log_every: int) -> dict:
    """Run jobs.finetune and read its per-window samples/s and CPU s/step back from TensorBoard; the
    machine's CPU split over the training window (see `ProcessSampler`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from jobs import finetune

    argv = ["--config", "debug", "model.method=dydit", f"ray.num_workers={workers}", "ray.cpus_per_worker=1",
            f"train.micro_batch_size={micro}", f"train.global_batch_size={micro * workers}",
            f"train.max_steps={steps}", f"train.log_every={log_every}", f"train.checkpoint_every={steps}",
            f"deepspeed.zero_stage={stage}", "data.num_workers=0", f"data.uri={root}/data",
            f"storage.root={root}", f"storage.run={run}"]
    start = time.perf_counter()
    with ProcessSampler() as sampler:
        finetune.run(argv)
    wall = time.perf_counter() - start
    _wait_for_exit(("ray::TrainController", "ray::RayTrainWorker", "ray::PlacementGroupCleaner",
                    "ray::SynchronizationActor", "ray::DatasetManager", "ray::PreemptionWatcher"))
    events = []
    for name in sorted(os.listdir(f"{root}/runs/{run}/tensorboard")):
        acc = EventAccumulator(f"{root}/runs/{run}/tensorboard/{name}")
        acc.Reload()
        if "samples_per_s" in acc.Tags()["scalars"]:  # a restarted run that had nothing left to do logs none
            events += list(zip(acc.Scalars("samples_per_s"), acc.Scalars("cpu_s_per_step"), strict=True))
    values, cpu = [e.value for e, _ in events], [c.value for _, c in events]
    total = statistics.median(values[1:] or values)
    # The training window: from the end of the first (warm-up) log window to the last one.
    window = (events[0][0].wall_time, events[-1][0].wall_time) if len(events) > 1 else None
    return {"samples_per_s": total, "per_worker": total / workers,
            "per_worker_per_cpu_s": micro / statistics.median(cpu[1:] or cpu),
            "windows": values, "cpu_s_per_step": cpu, "job_wall_s": wall,
            "machine": sampler.split(window, worker_prefix="ray::RayTrainWorker") if window else None}


class Proc(NamedTuple):
    cmd: str
    cpu: float  # user + system seconds
    system: float  # system seconds
    faults: int  # minor page faults


def read_processes() -> dict[int, Proc]:
    """Every process's command line, CPU seconds and minor page faults, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # the process ended between listdir and open
            continue
        user, system = int(fields[11]) / tick, int(fields[12]) / tick
        out[int(pid)] = Proc(cmd, user + system, system, int(fields[7]))
    return out


def _wait_for_exit(prefixes: tuple[str, ...], timeout: float = 60.0) -> None:
    """Wait until no process named with one of `prefixes` is left: the run's actors outlive `fit()` by a
    few seconds, and the next bare loop must not share the machine with them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and os.path.isdir("/proc/self"):
        if not any(p.cmd.startswith(prefixes) for p in read_processes().values()):
            return
        time.sleep(0.5)


class ProcessSampler:
    """Every process's CPU seconds (utime + stime from /proc), sampled once a second in a thread.

    `split((t0, t1), worker_prefix)` -> CPU share of the machine over [t0, t1] used by the processes
    whose name starts with `worker_prefix`, by Ray's other processes and by everything else, as
    fractions of (t1 - t0) x CPUs (the rest is idle); and the workers' minor page faults per second and
    the share of their CPU spent in the kernel. Linux only; None elsewhere.
    """

    def __init__(self, interval: float = 1.0):
        import threading

        self.interval, self.snapshots = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        if os.path.isdir("/proc/self"):
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.snapshots.append((time.time(), read_processes()))
            self._stop.wait(self.interval)

    def split(self, window: tuple[float, float], worker_prefix: str) -> dict | None:
        inside = [s for s in self.snapshots if window[0] <= s[0] <= window[1]]
        if len(inside) < 2:
            return None
        (t0, a), (t1, b) = inside[0], inside[-1]
        capacity = (t1 - t0) * (os.cpu_count() or 1)
        used = {"workers": 0.0, "ray_other": 0.0, "other": 0.0}
        worker_system = worker_faults = 0.0
        for pid, proc in b.items():
            before = a.get(pid, Proc(proc.cmd, 0.0, 0.0, 0))  # a process started inside the window: all of it
            if proc.cmd.startswith(worker_prefix):
                kind = "workers"
                worker_system += proc.system - before.system
                worker_faults += proc.faults - before.faults
            elif (proc.cmd.startswith("ray::") or "/ray/" in proc.cmd or "jobs.finetune" in proc.cmd
                  or "train_throughput" in proc.cmd):
                kind = "ray_other"
            else:
                kind = "other"
            used[kind] += proc.cpu - before.cpu
        return {"seconds": t1 - t0, **{k: v / capacity for k, v in used.items()},
                "idle": max(0.0, 1 - sum(used.values()) / capacity),
                "worker_system_share": worker_system / max(used["workers"], 1e-9),
                "worker_faults_per_s": worker_faults / (t1 - t0)}


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
    # Interleaved rounds of (bare, bare pair, job 1, job 2), closed by a last (bare, bare pair): each job
    # run is compared with the mean of the references on either side of its round.
    bare, pair = [bare_loop(cfg, args.steps)], [bare_pair(cfg, args.steps)]
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for r in range(args.rounds):
        jobs = {w: job_throughput(root, f"w{w}-r{r}", w, stage, args.micro_batch, args.steps, args.log_every)
                for w, stage in ((1, 0), (2, 2))}
        bare.append(bare_loop(cfg, args.steps))
        pair.append(bare_pair(cfg, args.steps))
        for w, job in jobs.items():
            runs[w].append(_summary(job, _mean(bare[-2:]), _mean(pair[-2:])))
            last = runs[w][-1]
            print(f"round {r + 1}/{args.rounds}, {w} worker(s): {last['per_worker']:.1f} samples/s per worker, "
                  f"overhead {last['overhead_wall']:.1%} wall (vs a bare pair {last['overhead_vs_pair']:.1%}) / "
                  f"{last['overhead_cpu']:.1%} CPU", flush=True)
    ray.shutdown()
    single, both = _mean(bare), _mean(pair)
    rows = [
        {"setup": "bare PyTorch loop, 1 process, 1 thread", "workers": 1, "zero": "-",
         "samples_per_s": single["samples_per_s"], "per_worker": single["samples_per_s"], "overhead_wall": 0.0,
         "overhead_wall_range": "-", "overhead_vs_pair": "-", "overhead_cpu": 0.0, "ray_other_cpu": "-",
         "idle_cpu": "-", "faults_per_s": single["faults_per_s"], "system_share": single["system_share"],
         "detail": {"runs": bare}},
        {"setup": "2 bare loops at once, 2 processes", "workers": 2, "zero": "-",
         "samples_per_s": 2 * both["samples_per_s"], "per_worker": both["samples_per_s"],
         "overhead_wall": 1 - both["samples_per_s"] / single["samples_per_s"], "overhead_wall_range": "-",
         "overhead_vs_pair": 0.0, "overhead_cpu": 1 - both["samples_per_cpu_s"] / single["samples_per_cpu_s"],
         "ray_other_cpu": "-", "idle_cpu": "-", "faults_per_s": both["faults_per_s"],
         "system_share": both["system_share"], "detail": {"runs": pair}},
    ]
    for workers, stage in ((1, 0), (2, 2)):
        rows.append({"setup": f"jobs.finetune, {workers} worker{'s' * (workers > 1)}", "workers": workers,
                     "zero": stage, **_median_of(runs[workers], workers)})
    header = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; debug DyDiT stage 1 (fp32), "
              f"micro-batch {args.micro_batch} per worker, {args.steps} steps per run, {args.rounds} interleaved "
              f"rounds; samples/s = median of {args.log_every}-step windows after the first; 1 CPU and 1 thread "
              "per worker. Job rows: the median round (overhead_wall_range: lowest and highest round). "
              "overhead_wall = 1 - per-worker samples/s / the single bare loop's; overhead_vs_pair = the same "
              "against one process of the bare pair (both cores busy, as with 2 workers); overhead_cpu = on "
              "samples per CPU-second of the worker process; ray_other_cpu / idle_cpu = share of the machine's "
              "CPUs used by Ray's other processes / left idle while the job trained.")
    _write(f"train_throughput{args.tag}", rows, header, ["setup", "workers", "zero", "samples_per_s", "per_worker",
                                              "overhead_wall", "overhead_wall_range", "overhead_vs_pair",
                                              "overhead_cpu", "ray_other_cpu", "idle_cpu", "faults_per_s",
                                              "system_share"])


def _pair_child(cfg, steps: int, barrier, queue) -> None:
    torch.set_num_threads(1)
    barrier.wait()
    queue.put(bare_loop(cfg, steps))


def bare_pair(cfg, steps: int) -> dict:
    """Two bare loops at once in two processes (both cores busy, as under the 2-worker job) -> the mean
    per-process samples/s and samples per CPU-second."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_pair_child, args=(cfg, steps, barrier, queue)) for _ in range(2)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    return _mean(results)


def _mean(runs: list[dict]) -> dict:
    return {k: statistics.mean(r[k] for r in runs) for k in runs[0]}


def _summary(job: dict, bare: dict, pair: dict) -> dict:
    return {"samples_per_s": job["samples_per_s"], "per_worker": job["per_worker"],
            "overhead_wall": 1 - job["per_worker"] / bare["samples_per_s"],
            "overhead_vs_pair": 1 - job["per_worker"] / pair["samples_per_s"],
            "per_worker_per_cpu_s": job["per_worker_per_cpu_s"],
            "overhead_cpu": 1 - job["per_worker_per_cpu_s"] / bare["samples_per_cpu_s"],
            "machine": job["machine"], "detail": {**job, "bare_reference": bare, "pair_reference": pair}}


def _median_of(runs: list[dict], workers: int) -> dict:
    """The median round (by wall-clock overhead; of an even count, the upper one) of a job's runs, with the
    range over rounds."""
    ordered = sorted(runs, key=lambda r: r["overhead_wall"])
    mid = ordered[len(ordered) // 2]
    lo, hi = ordered[0]["overhead_wall"], ordered[-1]["overhead_wall"]
    machine = [r["machine"] for r in runs if r["machine"]]
    share = (lambda key: f"{statistics.median(m[key] for m in machine):.1%}") if machine else (lambda key: "n/a")
    return {"samples_per_s": mid["samples_per_s"], "per_worker": mid["per_worker"],
            "overhead_wall": mid["overhead_wall"], "overhead_wall_range": f"{lo:.1%} .. {hi:.1%}",
            "overhead_vs_pair": statistics.median(r["overhead_vs_pair"] for r in runs) if workers > 1 else "-",
            "overhead_cpu": statistics.median(r["overhead_cpu"] for r in runs),
            "ray_other_cpu": share("ray_other"), "idle_cpu": share("idle"),
            "faults_per_s": statistics.median(m["worker_faults_per_s"] / workers for m in machine) if machine else "n/a",
            "system_share": statistics.median(m["worker_system_share"] for m in machine) if machine else "n/a",
            "detail": {"rounds": runs}}


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
        if (column.startswith("overhead") or column == "system_share") and isinstance(v, float):
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
    c.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (bare, bare pair, job 1, job 2)")
    c.add_argument("--tag", default="", help="suffix of the result files")
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
