"""A sampling job's dispatch on an event clock with fake actors: how much of the paid actor time a
policy leaves idle, at any cluster size, without a cluster and without sleeping.

    actors = [FakeActor()] * 30 + [FakeActor(speed=1 / 3), FakeActor(dies_at=5.5)]
    result = simulate(50_000, unit_size=128, batch_size=64, actors=actors)
    result.idle_fraction, result.unique_samples

Time is counted in batches of a normal actor: an actor of `speed` samples a unit of n samples in
ceil(n / batch_size) / speed. Writing a unit (PNG encoding, upload, marker) takes n x `write_time`, in the
actor's background thread (`overlap_write`, as `pool.SamplingWorker` does) or in series with its
sampling (the pool before units were pulled). An actor holds up to `depth` units it has not returned
(the earlier pool queued `sample.shards_in_flight` = 2 per actor; the pool now pulls one at a time).
An actor with `dies_at` dies then, and is replaced after `load_time`, as the pool replaces it.

Accounting: paid = actors x wall (wall: from every actor ready to the last unit written);
busy = time spent sampling, any copy; idle = paid - busy (writes in series, replacement loads,
nothing to do); wasted = sampling whose result was never written (discarded duplicates, units lost
with a dead actor, copies still running at the end).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field

from .dispatch import Dispatcher
from .plan import plan_shards


@dataclass(frozen=True)
class FakeActor:
    speed: float = 1.0  # batches per unit of time
    dies_at: float | None = None


@dataclass
class SimResult:
    wall: float
    paid: float
    busy: float
    wasted: float
    written: list[int]  # unit indices in the order their writes finished
    samples: list[int]  # sample indices of the written units, in the same order
    copies_started: int
    copies_discarded: int
    failures: int

    @property
    def idle_fraction(self) -> float:
        return (self.paid - self.busy) / self.paid

    @property
    def wasted_fraction(self) -> float:
        return self.wasted / self.paid

    @property
    def unique_samples(self) -> int:
        return len(set(self.samples))


@dataclass
class _Slot:
    """One actor's place in the pool; `gen` counts its replacements (events of a dead one are stale)."""

    speed: float
    dies_at: float | None
    gen: int = 0
    ready: bool = True
    held: deque = field(default_factory=deque)  # units assigned and not returned, in the order it makes them
    sampling_since: float | None = None
    writing: dict = field(default_factory=dict)  # unit -> its sampling time, while its write runs
    writing_in_series: bool = False


def simulate(num_samples: int, unit_size: int, batch_size: int, actors: list[FakeActor], *,
             write_time: float = 0.0, overlap_write: bool = True, depth: int = 1, speculate: bool = True,
             load_time: float = 0.0) -> SimResult:
    """Run one job to its end (see the module docstring)."""
    units = plan_shards(num_samples, unit_size)
    dispatch = Dispatcher(units, speculate=speculate)
    slots = [_Slot(a.speed, a.dies_at) for a in actors]
    events: list = []
    order = itertools.count()  # ties are taken in the order they were scheduled
    busy = wasted = 0.0
    written, samples, failures = [], [], 0

    def at(time: float, *event) -> None:
        heapq.heappush(events, (time, next(order), event))

    def feed(now: float) -> None:
        for n, slot in enumerate(slots):
            while slot.ready and len(slot.held) < depth and len(slot.writing) < 2:
                unit = dispatch.assign((n, slot.gen))
                if unit is None:
                    break
                slot.held.append(unit)
            if slot.ready and slot.held and slot.sampling_since is None and not slot.writing_in_series:
                unit = slot.held[0]
                slot.sampling_since = now
                at(now + math.ceil(unit.count / batch_size) / slot.speed, "sampled", n, slot.gen, unit.index)

    for n, slot in enumerate(slots):
        if slot.dies_at is not None:
            at(slot.dies_at, "dies", n, 0)
    feed(0.0)
    now = 0.0
    while not dispatch.finished:
        now, _, (kind, n, gen, *index) = heapq.heappop(events)
        slot = slots[n]
        if gen != slot.gen:
            continue  # an event of an actor that died
        if kind == "sampled":
            took = now - slot.sampling_since
            busy += took
            slot.sampling_since = None
            if dispatch.sampled((n, gen), index[0]):
                slot.writing[index[0]] = took
                slot.writing_in_series = not overlap_write
                at(now + write_time * dispatch.units[index[0]].count, "written", n, gen, index[0])
            else:
                wasted += took
            if overlap_write or index[0] not in slot.writing:
                slot.held.popleft()  # returned to the driver now; in series, once written
        elif kind == "written":
            dispatch.written((n, gen), index[0])
            unit = dispatch.units[index[0]]
            written.append(unit.index)
            samples.extend(unit.indices)
            del slot.writing[unit.index]
            if slot.writing_in_series:
                slot.writing_in_series = False
                slot.held.popleft()
        elif kind == "dies":
            failures += 1
            if slot.sampling_since is not None:
                busy += now - slot.sampling_since
                wasted += now - slot.sampling_since
            wasted += sum(slot.writing.values())
            dispatch.lost((n, gen))
            slots[n] = _Slot(slot.speed, None, gen=gen + 1, ready=False)
            at(now + load_time, "ready", n, gen + 1)
        elif kind == "ready":
            slot.ready = True
        feed(now)
    for slot in slots:  # copies still running at the end are abandoned
        if slot.ready and slot.sampling_since is not None:
            busy += now - slot.sampling_since
            wasted += now - slot.sampling_since
    return SimResult(now, now * len(slots), busy, wasted, written, samples, dispatch.copies_started,
                     dispatch.copies_discarded, failures)
