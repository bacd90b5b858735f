"""Idle actor time of the sampling fan-out's dispatch, before and after pull-based units with
speculative copies, at 8 and 32 actors.

    python benchmarks/sampling_dispatch.py [--num-samples 50000] [--batch-size 64] [--unit-size 128]

An event-clock simulation (`dydit_dist.sample.simulate`, no sleeping, no cluster) driven by the same
`Dispatcher` the pool uses. Time is in batches of a normal actor; writing a unit (PNG tar + upload +
marker) takes `--write-fraction` of its sampling time; a replaced actor loads for `--load-batches`.
Policies:
- *before*: the previous pool: shards of 1000 queued two per actor (`sample.shards_in_flight=2`),
  encoded and written in series with sampling, no copies;
- *units only*: shards of `--unit-size` pulled one at a time, written in the background, no copies;
- *after*: as *units only*, plus speculative copies of the oldest running units once the queue is
  empty (`sample.speculate=true`, the default);
- *after, one-batch units*: as *after* with `sample.shard_size` = `sample.batch_size` (a finer tail, more
  objects).
Scenarios: *uniform* (every actor at the same speed) and *uneven* (one actor at a third of the speed,
one that dies in the middle of its third unit and is replaced).

Idle = paid actor time not spent sampling (paid = actors x wall, wall = every actor ready -> last unit
written); wasted = sampling that was never written (copies that lost, units lost with a dead actor,
copies still running at the end). Results: benchmarks/results/sampling_dispatch.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dydit_dist.sample.simulate import FakeActor, simulate

RESULTS = Path(__file__).parent / "results"
OLD_SHARD_SIZE, OLD_IN_FLIGHT = 1000, 2


def scenarios(num_actors: int) -> dict[str, list[FakeActor]]:
    return {"uniform": [FakeActor()] * num_actors,
            "uneven": [FakeActor()] * (num_actors - 2) + [FakeActor(speed=1 / 3), FakeActor(dies_at=5.5)]}


def policies(args) -> dict[str, dict]:
    return {
        "before": dict(unit_size=OLD_SHARD_SIZE, depth=OLD_IN_FLIGHT, speculate=False, overlap_write=False),
        "units only": dict(unit_size=args.unit_size, speculate=False),
        "after": dict(unit_size=args.unit_size),
        "after, one-batch units": dict(unit_size=args.batch_size),
    }


def measure(args) -> list[dict]:
    rows = []
    for num_actors in args.actors:
        for scenario, actors in scenarios(num_actors).items():
            for policy, options in policies(args).items():
                r = simulate(args.num_samples, batch_size=args.batch_size, actors=actors,
                             write_time=args.write_fraction / args.batch_size, load_time=args.load_batches,
                             **options)
                rows.append({"actors": num_actors, "scenario": scenario, "policy": policy,
                             "unit_size": options["unit_size"], "wall_batches": r.wall,
                             "idle_fraction": r.idle_fraction, "wasted_fraction": r.wasted_fraction,
                             "useful_fraction": 1 - r.idle_fraction - r.wasted_fraction,
                             "copies_started": r.copies_started, "copies_discarded": r.copies_discarded,
                             "unique_samples": r.unique_samples, "samples_written": len(r.samples)})
    return rows


def markdown(results: dict) -> str:
    a = results["args"]
    lines = [
        "# Sampling dispatch: idle actor time before and after pull-based units with speculative copies",
        "",
        f"Event-clock simulation (`dydit_dist.sample.simulate`, the pool's own `Dispatcher`): {a['num_samples']} "
        f"samples at batch {a['batch_size']}; time in batches of a normal actor; writing a unit costs "
        f"{100 * a['write_fraction']:.0f}% of its sampling time; a replaced actor loads for {a['load_batches']} "
        f"batches. *before*: shards of {OLD_SHARD_SIZE} queued {OLD_IN_FLIGHT} per actor, written in series; "
        f"*units only*: shards of {a['unit_size']} pulled one at a time, written in the background; *after*: "
        "the same plus speculative copies of the oldest running units once the queue is empty (last row: units of "
        "one batch). *uneven*: one "
        "actor at 1/3 speed, one that dies mid-unit. Idle: paid actor time not sampling; wasted: sampling "
        "never written (losing copies, work lost with the dead actor, copies running at the end).",
        "",
        "| actors | scenario | policy | unit | wall (batches) | idle | wasted | useful | copies started / discarded "
        "| unique samples |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['actors']} | {r['scenario']} | {r['policy']} | {r['unit_size']} | "
                     f"{r['wall_batches']:.1f} | {100 * r['idle_fraction']:.1f}% | {100 * r['wasted_fraction']:.1f}% | "
                     f"{100 * r['useful_fraction']:.1f}% | {r['copies_started']} / {r['copies_discarded']} | "
                     f"{r['unique_samples']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--unit-size", type=int, default=128)
    parser.add_argument("--actors", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--write-fraction", type=float, default=0.01)
    parser.add_argument("--load-batches", type=float, default=3.0)
    args = parser.parse_args(argv)
    results = {"args": vars(args), "rows": measure(args)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sampling_dispatch.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (RESULTS / "sampling_dispatch.md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
