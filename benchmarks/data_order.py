"""Classes per batch in the reader's order, for shards written in class order (before) and in the prepare
job's seeded permutation (after).

    python benchmarks/data_order.py [--ranks 8] [--workers 2] [--micro-batch 32] [--shard-size 1000]
        [--buffer 1000] [--seed 0]

A simulation on labels only, no bytes, of the code paths that decide the order:
1. An ImageFolder listing of C classes x N images (labels in listing order, i.e. class order) is cut into
   shards of `--shard-size` as the prepare job did before (listing order) and as it does now
   (`sources.chunk_items`: a permutation seeded by `data.seed`).
2. Each of `--ranks` x `--workers` consumers reads its first epoch as `LatentStream` does
   (`order.segment`, then `order.shuffle_order` with a buffer of `--buffer`), cut into micro-batches of
   `--micro-batch`; batch i of a rank comes from its worker i mod W, and the global batch at step i is the
   ranks' batches i together (ranks x micro-batch samples).
3. Distinct labels per micro-batch and per global batch, averaged over the epoch's steps, next to the
   expectation for i.i.d. draws (C (1 - (1 - 1/C)^B) for B samples).

Results: benchmarks/results/data_order.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dydit_dist.data.order import per_consumer, segment, shuffle_order
from dydit_dist.data.sources import Item, chunk_items

RESULTS = Path(__file__).parent / "results"
DATASETS = [("100 classes x 100 images", 100, 100), ("ImageNet-sized: 1000 classes x 1300 images", 1000, 1300)]


def class_order_shards(labels: np.ndarray, shard_size: int) -> list[np.ndarray]:
    """The shards' labels as the prepare job wrote them before: listing (class) order."""
    return [labels[s : s + shard_size] for s in range(0, len(labels), shard_size)]


def permuted_shards(labels: np.ndarray, shard_size: int, seed: int) -> list[np.ndarray]:
    """The shards' labels as the prepare job writes them now (`sources.chunk_items`)."""
    items = [Item(f"{i:09d}", "", label=int(label)) for i, label in enumerate(labels)]
    return [np.array([item.label for item in chunk.items]) for chunk in chunk_items(items, shard_size, seed)]


def reader_batches(shards: list[np.ndarray], ranks: int, workers: int, micro_batch: int, buffer: int,
                   seed: int) -> np.ndarray:
    """Labels of each rank's micro-batches over the first epoch in the reader's order: (steps, ranks, B)."""
    counts = np.array([len(s) for s in shards], dtype=np.int64)
    consumers = ranks * workers
    q = per_consumer(int(counts.sum()), consumers)
    per_worker = q // micro_batch  # whole micro-batches of each worker in the epoch
    out = np.empty((per_worker * workers, ranks, micro_batch), dtype=np.int64)
    for rank in range(ranks):
        for worker in range(workers):
            consumer = rank * workers + worker
            labels = np.concatenate([shards[p.shard][p.start : p.stop]
                                     for p in segment(counts, seed, 0, consumer, consumers)])
            stream = labels[shuffle_order(q, buffer, seed, 0, consumer)]
            out[worker::workers, rank] = stream[: per_worker * micro_batch].reshape(per_worker, micro_batch)
    return out


def distinct(batches: np.ndarray) -> float:
    """Mean number of distinct labels per row of (n, B) labels."""
    return float(np.mean([len(np.unique(row)) for row in batches]))


def iid(num_classes: int, batch: int) -> float:
    return num_classes * (1 - (1 - 1 / num_classes) ** batch)


def measure(num_classes: int, per_class: int, args) -> dict:
    labels = np.repeat(np.arange(num_classes), per_class)
    row = {"classes": num_classes, "images_per_class": per_class}
    for name, shards in [("class_order", class_order_shards(labels, args.shard_size)),
                         ("permuted", permuted_shards(labels, args.shard_size, args.seed))]:
        batches = reader_batches(shards, args.ranks, args.workers, args.micro_batch, args.buffer, args.seed)
        row[name] = {"micro_batch": distinct(batches.reshape(-1, args.micro_batch)),
                     "global_batch": distinct(batches.reshape(len(batches), -1)), "steps": len(batches)}
    row["iid"] = {"micro_batch": iid(num_classes, args.micro_batch),
                  "global_batch": iid(num_classes, args.micro_batch * args.ranks)}
    return row


def markdown(results: dict) -> str:
    a = results["args"]
    micro, world = a["micro_batch"], a["micro_batch"] * a["ranks"]
    lines = [
        "# Data order: classes per batch",
        "",
        f"Simulated reader order (no bytes read): {a['ranks']} ranks x {a['workers']} DataLoader workers, shards "
        f"of {a['shard_size']}, shuffle buffer {a['buffer']}, seed {a['seed']}; distinct labels per micro-batch of "
        f"{micro} (one rank) and per global batch of {world} ({a['ranks']} ranks x {micro}), averaged over "
        "the first epoch's steps. *Class order*: shards as the prepare job wrote them before (ImageFolder "
        "listing order); *permuted*: as it writes them now (seeded permutation); *i.i.d.*: the expectation "
        "for independent uniform draws.",
        "",
        f"| data set | steps | class order / {micro} | permuted / {micro} | i.i.d. / {micro} | "
        f"class order / {world} | permuted / {world} | i.i.d. / {world} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        c, p, i = r["class_order"], r["permuted"], r["iid"]
        lines.append(f"| {r['name']} | {p['steps']} | {c['micro_batch']:.1f} | {p['micro_batch']:.1f} | "
                     f"{i['micro_batch']:.1f} | {c['global_batch']:.1f} | {p['global_batch']:.1f} | "
                     f"{i['global_batch']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--buffer", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    for name, num_classes, per_class in DATASETS:
        rows.append({"name": name, **measure(num_classes, per_class, args)})
        print(rows[-1], flush=True)
    results = {"args": vars(args), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_order.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "data_order.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
