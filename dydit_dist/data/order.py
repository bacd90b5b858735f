"""The order in which the reader visits samples: a pure function of (seed, epoch, consumer).

A *consumer* is one DataLoader worker of one rank: consumer = rank x num_workers + worker, out of
C = world_size x num_workers. Per epoch e:

1. The shards are permuted with `default_rng([seed, e])`, identical on every consumer; their
   samples, laid end to end, form the epoch's sequence of N samples.
2. Consumer c takes the contiguous segment [c q, (c + 1) q) with q = N // C: every consumer (so every
   rank) gets the same number of samples, none twice within an epoch; the N mod C samples at the end
   wait for a later epoch. They are the last samples of the shard permuted last, so different ones each
   epoch when there are several shards; a data set of one shard never yields its last N mod C (fewer
   than C: prepare more than one shard, as the prepare job does for any real data set).
3. The segment goes through a shuffle buffer of `buffer_size` samples driven by
   `default_rng([seed, e, c, 1])` (webdataset's algorithm: once full, emit a random slot and put the
   next sample there; at the end, emit what is left in random order).

Because the buffer is simulated on sample positions, not on the samples themselves, the position of
every sample in a consumer's stream is known before a byte is read: resuming at any position reads
only the shards that still have samples to give, and yields exactly what an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of manifest shard `shard`, at positions [first, first + stop - start) of the segment."""

    shard: int
    start: int
    stop: int
    first: int


def per_consumer(num_samples: int, num_consumers: int) -> int:
    """Samples each consumer reads per epoch (q = N // C)."""
    q = num_samples // num_consumers
    if q == 0:
        raise ValueError(
            f"the data has {num_samples} samples, fewer than ranks x workers = {num_consumers}: "
            "every worker of every rank needs at least one sample per epoch"
        )
    return q


def segment(counts: np.ndarray, seed: int, epoch: int, consumer: int, num_consumers: int) -> list[Piece]:
    """The pieces of shards consumer `consumer` reads in epoch `epoch`, in reading order."""
    q = per_consumer(int(counts.sum()), num_consumers)
    perm = np.random.default_rng([seed, epoch]).permutation(len(counts))
    ends = np.cumsum(counts[perm])
    begin, end = consumer * q, (consumer + 1) * q
    pieces, offset = [], 0
    for shard, stop_global in zip(perm.tolist(), ends.tolist(), strict=True):
        start_global = stop_global - int(counts[shard])
        lo, hi = max(begin, start_global), min(end, stop_global)
        if lo < hi:
            pieces.append(Piece(shard, lo - start_global, hi - start_global, offset))
            offset += hi - lo
        if stop_global >= end:
            break
    return pieces


def shuffle_order(length: int, buffer_size: int, seed: int, epoch: int, consumer: int) -> np.ndarray:
    """order[p] = segment position of the sample emitted p-th by a shuffle buffer of `buffer_size`."""
    rng = np.random.default_rng([seed, epoch, consumer, 1])
    size = max(1, min(buffer_size, length))
    slots = rng.integers(0, size, size=max(0, length - size)).tolist()
    buffer = list(range(size))
    order = []
    for position, slot in zip(range(size, length), slots, strict=True):
        order.append(buffer[slot])
        buffer[slot] = position
    order += rng.permutation(np.asarray(buffer, dtype=np.int64)).tolist()
    return np.asarray(order, dtype=np.int64)
