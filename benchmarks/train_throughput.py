"""Fine-tuning throughput: the bare PyTorch loop against the Ray Train + DeepSpeed job, side by side.

    python benchmarks/train_throughput.py compare [--micro-batch 32] [--slices 8] [--slice-steps 50] [--jobs 1:0 2:2]
    python benchmarks/train_throughput.py step --model DiT-XL/2 --micro-batch 32 --precision bf16 --stages 1 2 3

`compare` (CPU, one run): samples/s of the `debug` DyDiT (stage 1: dynamic + complete-model + FLOPs
losses) in
  1. a bare single-process loop: the same objective, torch AdamW, batches already in memory, 1 thread,
     alone ("bare") and two at once in two processes ("bare pair": both cores busy);
  1b. a plain PyTorch DDP pair ("ddp pair"): the same loop in 2 processes (torch.multiprocessing spawn)
     wrapped in DistributedDataParallel over gloo, global batch 2 x micro-batch: the fair baseline for
     what Ray Train + DeepSpeed add to the 2-worker job (`overhead_vs_ddp`);
  2. `jobs.finetune` with 1 worker, ZeRO-0 (Ray Train + DeepSpeed + the shard reader + EMA + metrics);
  3. `jobs.finetune` with 2 workers, ZeRO-2 (gloo reduce / all-gather between them).
Each worker has 1 CPU (1 torch thread), like the bare loop.

On a shared 2-core VM the speed of the cores moves by 10-25% within minutes, so references timed a
minute away from the job are not a fair comparison. Each job is therefore cut into `--slices` slices of
`--slice-steps` steps: after each slice the benchmark stops the job's workers (SIGSTOP), times the
references (`--bare-steps` steps of the bare loop, then of the bare pair), and lets the workers go on
(SIGCONT). A slice's throughput is the median of the job's log windows (read back from its TensorBoard
files) that began and ended inside it, and it is compared with the mean of the references just before
and just after it. The table gives medians over the slices and the quartiles of the wall-clock overhead.

  overhead_wall    = 1 - job samples/s per worker / bare samples/s      (the criterion: < 15%)
  overhead_vs_pair = the same against one process of the bare pair: the machine's own cost of having
                     both cores busy taken out
  overhead_vs_ddp  = the same against one rank of the DDP pair: the cost of Ray + DeepSpeed over the
                     plain data-parallel loop at the same world size and global batch
  overhead_cpu     = the same on samples per CPU-second of the worker process (the job reports its CPU
                     seconds per step): the job's own work, without the time it waits

While each job trains, a sampler reads every process's CPU time from /proc once a second and splits the
machine's CPU over each slice between the training workers, Ray's other processes (controller, raylet,
GCS, idle actors, the driver) and everything else, and counts the workers' minor page faults and kernel
CPU share (the bare loop's come from getrusage). With 2 workers on 2 cores no core is left for Ray's
processes, so their share comes out of the workers' wall clock. Ray's processes keep running while the
workers are stopped, so the references share the machine with an idle Ray as well.

`step` (any device, one process, world size 1): the training step of a model at a micro-batch under
each ZeRO stage: samples/s and peak device memory. On a GPU this is the DiT-XL/2 DyDiT measurement.

Results: benchmarks/results/train_throughput[_step].{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
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
from procstat import ProcessSampler, read_processes, wait_for_exit

from dydit_dist import config as config_lib
from dydit_dist.network import build_network
from dydit_dist.train.step import DiffusionObjective, draw_inputs, step_generator

RESULTS = Path(__file__).parent / "results"


def bare_loop(cfg, steps: int, warmup: int = 5, rank: int | None = None) -> dict:
    """samples/s and samples per CPU-second of the plain PyTorch loop: objective, backward, AdamW step,
    in-memory batches. With `rank` (inside an initialised gloo process group) the objective is wrapped in
    DistributedDataParallel, so the gradients are all-reduced between the ranks."""
    torch.manual_seed(0)
    network = build_network(cfg.model)
    objective = model = DiffusionObjective(network, cfg)
    if rank is not None:
        model = torch.nn.parallel.DistributedDataParallel(objective)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=cfg.train.scaled_lr)
    b, m = cfg.train.micro_batch_size, cfg.model
    torch.manual_seed(rank or 0)
    batches = [{"x": torch.randn(b, m.in_channels, m.input_size, m.input_size),
                "y": torch.randint(0, m.num_classes, (b,))} for _ in range(8)]
    start = cpu = 0.0
    usage = None
    for step in range(warmup + steps):
        if step == warmup:
            start, cpu, usage = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
        g = step_generator(0, rank or 0, step, 0, "cpu")
        terms = model(**draw_inputs(batches[step % 8], network, cfg, g, "cpu"), step=step, generator=g)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.train.grad_clip)
        optimizer.step()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    end = resource.getrusage(resource.RUSAGE_SELF)
    return {"samples_per_s": steps * b / wall, "samples_per_cpu_s": steps * b / cpu,
            "faults_per_s": (end.ru_minflt - usage.ru_minflt) / wall,
            "system_share": (end.ru_stime - usage.ru_stime) / cpu}


WORKER = "ray::RayTrainWorker"


class Window(NamedTuple):
    """One TensorBoard log window of the job: it ended at `wall` (time.time() on the worker)."""
    wall: float
    step: int
    samples_per_s: float  # of the whole job
    cpu_s_per_step: float  # of rank 0's process


def read_windows(folder: str) -> list[Window]:
    """The run's log windows from its TensorBoard event files, in step order. Each call reads the files
    whole: the trainer replaces them on every upload (an atomic rename), so a loader kept open would
    not see new events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    windows = []
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for name in (n for n in names if n.startswith("events.out.tfevents")):  # not the writer's temporary files
        acc = EventAccumulator(os.path.join(folder, name))
        acc.Reload()
        if "samples_per_s" in acc.Tags()["scalars"]:  # a restarted run that had nothing left to do logs none
            windows += [Window(e.wall_time, e.step, e.value, c.value)
                        for e, c in zip(acc.Scalars("samples_per_s"), acc.Scalars("cpu_s_per_step"), strict=True)]
    return sorted(windows, key=lambda w: w.step)


def windows_inside(windows: list[Window], interval: tuple[float, float]) -> list[Window]:
    """The windows that began and ended inside `interval` (a window begins where the one before it ended;
    the first window of the run, which includes the warm-up, has no beginning and is never inside)."""
    return [w for prev, w in itertools.pairwise(windows) if interval[0] <= prev.wall and w.wall <= interval[1]]


def sliced_job(root: str, run: str, workers: int, stage: int, args, cfg) -> dict:
    """Run jobs.finetune in a thread for `slices x slice_steps` steps; after each slice, stop its workers
    (SIGSTOP), time the references (a bare loop, then a bare pair), and let them go on (SIGCONT).
    -> the job's running intervals, its log windows, the references before / between / after the slices
    and the machine's CPU split over each interval."""
    import signal
    import threading
    from unittest import mock

    from dydit_dist import cli
    from jobs import finetune

    steps = args.slices * args.slice_steps
    argv = ["--config", "debug", "model.method=dydit", f"ray.num_workers={workers}", "ray.cpus_per_worker=1",
            f"train.micro_batch_size={args.micro_batch}", f"train.global_batch_size={args.micro_batch * workers}",
            f"train.max_steps={steps}", f"train.log_every={args.log_every}", f"train.checkpoint_every={steps}",
            f"deepspeed.zero_stage={stage}", "data.num_workers=0", f"data.uri={root}/data",
            f"storage.root={root}", f"storage.run={run}"]
    folder = f"{root}/runs/{run}/tensorboard"
    references = [reference(cfg, args.bare_steps)]
    errors: list[BaseException] = []

    def fit() -> None:
        try:
            # The job runs in a thread: Python installs signal handlers only from the main thread, and the
            # benchmark needs none of the job's (it stops and resumes the workers, not the driver).
            with mock.patch.object(cli, "install_signal_handlers", lambda job, cfg: None):
                finetune.run(argv)
        except BaseException as e:  # noqa: BLE001 - re-raised in the benchmark's thread
            errors.append(e)

    thread = threading.Thread(target=fit, name="finetune", daemon=True)
    intervals, begin = [], 0.0
    with ProcessSampler() as sampler:
        thread.start()
        for k in range(1, args.slices):
            while thread.is_alive() and max((w.step for w in read_windows(folder)), default=0) < k * args.slice_steps:
                time.sleep(0.25)
            if not thread.is_alive():
                break
            pids = [pid for pid, proc in read_processes().items() if proc.cmd.startswith(WORKER)]
            end = time.time()
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                intervals.append((begin, end))
                references.append(reference(cfg, args.bare_steps))
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            begin = time.time()
        thread.join()
        intervals.append((begin, time.time()))
    if errors:
        raise errors[0]
    wait_for_exit(("ray::TrainController", WORKER, "ray::PlacementGroupCleaner", "ray::SynchronizationActor",
                    "ray::DatasetManager", "ray::PreemptionWatcher"))
    references.append(reference(cfg, args.bare_steps))
    windows = read_windows(folder)
    # The machine's CPU split over the training inside each interval: the first interval begins when the
    # warm-up window ends, the last one ends at the last window (not at the end of the final checkpoint).
    spans = [(max(a, windows[0].wall), min(b, windows[-1].wall)) for a, b in intervals] if windows else []
    return {"workers": workers, "zero": stage, "intervals": intervals, "windows": windows,
            "references": references, "machine": [sampler.split(span, worker_prefix=WORKER) for span in spans]}


def reference(cfg, steps: int) -> dict:
    """The bare loop alone, then two at once, then the DDP pair."""
    return {"single": bare_loop(cfg, steps), "pair": bare_pair(cfg, steps), "ddp": ddp_pair(cfg, steps)}


def slice_rows(job: dict, micro: int) -> list[dict]:
    """Per slice: the job's per-worker samples/s (median of its windows inside the slice) and samples per
    CPU-second, against the mean of the references timed just before and just after the slice."""
    workers, out = job["workers"], []
    for i, interval in enumerate(job["intervals"]):
        inside = windows_inside(job["windows"], interval)
        if not inside:
            continue
        before, after = job["references"][i], job["references"][i + 1]
        single = _mean([before["single"], after["single"]])
        pair = _mean([before["pair"], after["pair"]])
        ddp = _mean([before["ddp"], after["ddp"]])
        per_worker = statistics.median(w.samples_per_s for w in inside) / workers
        per_cpu_s = micro / statistics.median(w.cpu_s_per_step for w in inside)
        out.append({"slice": i, "windows": len(inside), "per_worker": per_worker,
                    "bare": single["samples_per_s"], "pair": pair["samples_per_s"],
                    "overhead_wall": 1 - per_worker / single["samples_per_s"],
                    "overhead_vs_pair": 1 - per_worker / pair["samples_per_s"],
                    "ddp": ddp["samples_per_s"], "overhead_vs_ddp": 1 - per_worker / ddp["samples_per_s"],
                    "overhead_cpu": 1 - per_cpu_s / single["samples_per_cpu_s"],
                    "machine": job["machine"][i]})
    return out


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
    jobs, slices = {}, {}
    for workers, stage in (map(int, j.split(":")) for j in args.jobs):
        jobs[workers] = sliced_job(root, f"w{workers}", workers, stage, args, cfg)
        slices[workers] = slice_rows(jobs[workers], args.micro_batch)
        for r in slices[workers]:
            print(f"{workers} worker(s), slice {r['slice'] + 1}: {r['per_worker']:.1f} samples/s per worker, bare "
                  f"{r['bare']:.1f}, overhead {r['overhead_wall']:.1%} wall (vs a bare pair {r['overhead_vs_pair']:.1%}, "
                  f"vs DDP {r['overhead_vs_ddp']:.1%})"
                  f" / {r['overhead_cpu']:.1%} CPU", flush=True)
    ray.shutdown()
    references = [r for job in jobs.values() for r in job["references"]]
    single, both = _mean([r["single"] for r in references]), _mean([r["pair"] for r in references])
    ddp = _mean([r["ddp"] for r in references])
    rows = [
        {"setup": "bare PyTorch loop, 1 process, 1 thread", "workers": 1, "zero": "-",
         "samples_per_s": single["samples_per_s"], "per_worker": single["samples_per_s"], "overhead_wall": 0.0,
         "overhead_wall_iqr": "-", "overhead_vs_pair": "-", "overhead_vs_ddp": "-", "overhead_cpu": 0.0,
         "ray_other_cpu": "-",
         "idle_cpu": "-", "faults_per_s": single["faults_per_s"], "system_share": single["system_share"],
         "detail": {"runs": [r["single"] for r in references]}},
        {"setup": "2 bare loops at once, 2 processes", "workers": 2, "zero": "-",
         "samples_per_s": 2 * both["samples_per_s"], "per_worker": both["samples_per_s"],
         "overhead_wall": 1 - both["samples_per_s"] / single["samples_per_s"], "overhead_wall_iqr": "-",
         "overhead_vs_pair": 0.0, "overhead_vs_ddp": "-",
         "overhead_cpu": 1 - both["samples_per_cpu_s"] / single["samples_per_cpu_s"],
         "ray_other_cpu": "-", "idle_cpu": "-", "faults_per_s": both["faults_per_s"],
         "system_share": both["system_share"], "detail": {"runs": [r["pair"] for r in references]}},
        {"setup": "plain PyTorch DDP, 2 processes (gloo)", "workers": 2, "zero": "-",
         "samples_per_s": 2 * ddp["samples_per_s"], "per_worker": ddp["samples_per_s"],
         "overhead_wall": 1 - ddp["samples_per_s"] / single["samples_per_s"], "overhead_wall_iqr": "-",
         "overhead_vs_pair": 1 - ddp["samples_per_s"] / both["samples_per_s"], "overhead_vs_ddp": 0.0,
         "overhead_cpu": 1 - ddp["samples_per_cpu_s"] / single["samples_per_cpu_s"],
         "ray_other_cpu": "-", "idle_cpu": "-", "faults_per_s": ddp["faults_per_s"],
         "system_share": ddp["system_share"], "detail": {"runs": [r["ddp"] for r in references]}},
    ]
    for workers, job in jobs.items():
        rows.append({"setup": f"jobs.finetune, {workers} worker{'s' * (workers > 1)}", "workers": workers,
                     "zero": job["zero"], **_median_of(slices[workers], workers)})
    header = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; debug DyDiT stage 1 (fp32), "
              f"micro-batch {args.micro_batch} per worker, 1 CPU and 1 thread per worker. Each job runs "
              f"{args.slices} slices of {args.slice_steps} steps; between slices its workers are stopped (SIGSTOP) "
              f"while the references run ({args.bare_steps} steps of the bare loop, then of two at once). A slice's "
              f"samples/s = median of its {args.log_every}-step log windows; it is compared with the mean of the "
              "references just before and after it (the bare loop, two at once, then a 2-process PyTorch DDP loop "
              "over gloo with the same global batch). Job rows: medians over the slices, overhead_wall_iqr = "
              "its first to third quartile. overhead_wall = 1 - per-worker samples/s / the single bare loop's (the "
              "criterion: < 15%); overhead_vs_pair = the same against one process of the bare pair (both cores "
              "busy, as with 2 workers); overhead_vs_ddp = the same against one rank of the DDP pair (what Ray "
              "Train + DeepSpeed cost over plain data parallelism); overhead_cpu = on samples per CPU-second of the worker process; "
              "ray_other_cpu / idle_cpu = share of the machine's CPUs used by Ray's other processes / left idle "
              "while the job trained. Bare rows: the mean of all references.")
    _write(f"train_throughput{args.tag}", rows, header, ["setup", "workers", "zero", "samples_per_s", "per_worker",
                                              "overhead_wall", "overhead_wall_iqr", "overhead_vs_pair",
                                              "overhead_vs_ddp", "overhead_cpu", "ray_other_cpu", "idle_cpu", "faults_per_s",
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


def _ddp_child(rank: int, cfg, steps: int, port: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        dist.barrier()
        queue.put(bare_loop(cfg, steps, rank=rank))
    finally:
        dist.destroy_process_group()


def ddp_pair(cfg, steps: int) -> dict:
    """The bare loop as a 2-process DistributedDataParallel job over gloo (torch.multiprocessing spawn),
    global batch 2 x micro-batch -> the mean per-rank samples/s and samples per CPU-second."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_ddp_child, args=(cfg, steps, port, queue), nprocs=2, join=True)
    return _mean([queue.get() for _ in range(2)])


def _mean(runs: list[dict]) -> dict:
    return {k: statistics.mean(r[k] for r in runs) for k in runs[0]}


def _median_of(slices: list[dict], workers: int) -> dict:
    """Medians over the slices, and the middle half (first to third quartile) of the wall-clock overhead."""
    def median(key: str) -> float:
        return statistics.median(r[key] for r in slices)

    walls = [r["overhead_wall"] for r in slices]
    q1, _, q3 = statistics.quantiles(walls, n=4, method="inclusive") if len(walls) > 1 else walls * 3
    machine = [r["machine"] for r in slices if r["machine"]]

    def machine_median(key: str, scale: float = 1.0) -> float | str:
        return statistics.median(m[key] * scale for m in machine) if machine else "n/a"

    def share(key: str) -> str:
        value = machine_median(key)
        return value if isinstance(value, str) else f"{value:.1%}"

    return {"samples_per_s": median("per_worker") * workers, "per_worker": median("per_worker"),
            "overhead_wall": median("overhead_wall"), "overhead_wall_iqr": f"{q1:.1%} .. {q3:.1%}",
            "overhead_vs_pair": median("overhead_vs_pair") if workers > 1 else "-",
            "overhead_vs_ddp": median("overhead_vs_ddp") if workers > 1 else "-",
            "overhead_cpu": median("overhead_cpu"), "ray_other_cpu": share("ray_other"), "idle_cpu": share("idle"),
            "faults_per_s": machine_median("worker_faults_per_s", 1 / workers),
            "system_share": machine_median("worker_system_share"), "detail": {"slices": slices}}


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
    c.add_argument("--slices", type=int, default=8, help="slices of each job, references between them")
    c.add_argument("--slice-steps", type=int, default=50)
    c.add_argument("--bare-steps", type=int, default=40, help="steps of each reference loop")
    c.add_argument("--log-every", type=int, default=5)
    c.add_argument("--jobs", nargs="+", default=["1:0", "2:2"], metavar="WORKERS:ZERO",
                   help="the jobs to time: workers and ZeRO stage (the issue's rows: 1:0 2:2)")
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
