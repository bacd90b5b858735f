"""Sampling fan-out scaling: images/s of the `debug` model with 1 and 2 CPU actors on a local Ray.

    python benchmarks/sampling_scaling.py [--num-samples 384] [--steps 25] [--repeats 2] [--root /tmp/x]

Each run samples into a fresh local folder (object storage stand-in) through `run_sampling`, one
torch thread per actor. Reported per run: images/s over the sampling phase (actors ready -> last shard
written; actor start-up and model load reported apart), and per shard the pure sampling time against
the overhead of encoding the PNG tar and writing it (+ its marker). Scaling efficiency =
images/s(2 actors) / (2 x images/s(1 actor)) within each repeat (the 1- and 2-actor runs of a repeat run
back to back, so a noisy neighbour affects both alike); the median over `--repeats` counts, each repeat's
is listed ("actor CPU share" below 1 says an actor waited for a core). Results:
benchmarks/results/sampling_scaling.{json,md}, with the commit measured (`stamp`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from stamp import stamp

from dydit_dist import config
from dydit_dist.sample import run_sampling

RESULTS = Path(__file__).parent / "results"


def one_run(root: str, actors: int, args) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    cfg = config.load("debug", [
        f"storage.root={root}", "storage.run=bench", f"sample.num_samples={args.num_samples}",
        f"sample.shard_size={args.shard_size}", f"sample.batch_size={args.batch_size}", f"sample.steps={args.steps}",
        f"sample.num_actors={actors}", "sample.cpus_per_actor=1",
    ])
    manifest = run_sampling(cfg)
    shards = list(manifest.shards.values())
    sample_s = [r["timing"]["sample_s"] for r in shards]
    overhead_s = [r["timing"]["encode_s"] + r["timing"]["write_s"] for r in shards]
    st = manifest.stats
    cpu_s = sum(r["timing"]["sample_cpu_s"] for r in shards)
    return {
        "actors": actors,
        "images_per_s": manifest.num_samples / st["sampling_wall_s"],
        "sampling_wall_s": st["sampling_wall_s"],
        "startup_s": st["startup_s"],
        "model_load_s": statistics.mean(st["model_load_s"]),
        "shard_sample_s": statistics.mean(sample_s),
        "shard_overhead_s": statistics.mean(overhead_s),
        "overhead_fraction": sum(overhead_s) / (sum(sample_s) + sum(overhead_s)),
        "cpu_share": cpu_s / sum(sample_s),  # < 1: the actor waited for a core (other processes)
        "load_average": os.getloadavg()[0],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=384)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--root", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    root = args.root or tempfile.mkdtemp(prefix="sampling-bench-")
    ray.init(address="local", num_cpus=2, _temp_dir=temp, include_dashboard=False, logging_level=logging.WARNING)
    try:
        runs = {1: [], 2: []}
        for _ in range(args.repeats):
            for actors in (1, 2):  # interleaved: a noisy neighbour affects both alike
                runs[actors].append(one_run(f"{root}/a{actors}", actors, args))
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    # Within a repeat: both runs shared the machine's state of that moment.
    efficiencies = [two["images_per_s"] / (2 * one["images_per_s"]) for one, two in zip(runs[1], runs[2], strict=True)]
    # Images per CPU-second an actor actually got: what scaling would be if no other process ran.
    cpu_efficiencies = [(two["images_per_s"] / (2 * two["cpu_share"])) / (one["images_per_s"] / one["cpu_share"])
                        for one, two in zip(runs[1], runs[2], strict=True)]
    efficiency, cpu_efficiency = statistics.median(efficiencies), statistics.median(cpu_efficiencies)
    middle = sorted(range(len(efficiencies)), key=efficiencies.__getitem__)[(len(efficiencies) - 1) // 2]
    shown = {a: runs[a][middle] for a in runs}  # the repeat at the median (the lower one for an even count)
    result = {"config": vars(args), "source": stamp(), "runs": runs, "scaling_efficiency": efficiency,
              "scaling_efficiency_per_repeat": efficiencies, "cpu_normalized_efficiency": cpu_efficiency,
              "cpu_normalized_efficiency_per_repeat": cpu_efficiencies, "shown_repeat": middle}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sampling_scaling.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Sampling scaling: debug model, {args.num_samples} samples, {args.steps} DDPM steps, cfg 1.5, "
        f"batch {args.batch_size}, shards of {args.shard_size}; {args.repeats} repeats, the median one shown",
        "",
        f"Commit {result['source']['commit']}{' (with uncommitted changes)' if result['source']['dirty'] else ''}.",
        "",
        "| actors | images/s | sampling wall s | start-up s | model load s | per shard: sampling s | "
        "per shard: PNG tar + write s | overhead | actor CPU share | load avg |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in (1, 2):
        b = shown[a]
        lines.append(f"| {a} | {b['images_per_s']:.1f} | {b['sampling_wall_s']:.2f} | {b['startup_s']:.2f} | "
                     f"{b['model_load_s']:.3f} | {b['shard_sample_s']:.3f} | {b['shard_overhead_s']:.4f} | "
                     f"{100 * b['overhead_fraction']:.1f}% | {b['cpu_share']:.2f} | {b['load_average']:.1f} |")
    per_repeat = ", ".join(f"{e:.2f}" for e in efficiencies)
    lines += ["", f"Scaling efficiency at 2 actors: **{efficiency:.2f}** (median of the repeats: {per_repeat}; "
              f"target >= 0.8); per CPU-second the actors got: {cpu_efficiency:.2f} (below the first when other "
              f"processes took the cores)."]
    (RESULTS / "sampling_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
