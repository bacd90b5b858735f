"""Which unit each sampling actor makes next: a driver-side queue the actors pull from, and
speculative copies of the oldest running units once the queue is empty.

    dispatch = Dispatcher(plan_shards(N, S))
    unit = dispatch.assign(actor)              # None: nothing for this actor now
    if dispatch.sampled(actor, unit.index):    # the first copy to finish sampling writes the unit...
        ...write it...; dispatch.written(actor, unit.index)
    else:                                      # ...a later copy is discarded
        ...drop it...
    dispatch.lost(actor)                       # it died: its units go back to the front of the queue

A unit is one shard (`sample.shard_size` samples, written as one object with its done-marker). Its
life: queued -> sampling (by one actor, or more once the queue is empty: an idle actor then copies
the running unit that started first and that no copy has won yet, up to `max_copies` copies at
once) -> writing (the first copy to finish sampling; the others are told to discard theirs) -> done.
Only one actor writes a unit at a time, so a duplicate never overwrites a shard or its marker and the
manifest counts every unit once; the first complete write wins.

Nothing here knows Ray or clocks: `pool.run_sampling` drives it with actor handles, `simulate` with
fake actors on an event clock. Actors are any hashable values.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Hashable, Iterable

from .plan import ShardSpec

MAX_COPIES = 2  # copies of one unit sampled at once: the straggler's and one speculative copy


class Dispatcher:
    """The state of every unit of one job (see the module docstring)."""

    def __init__(self, units: Iterable[ShardSpec], speculate: bool = True, max_copies: int = MAX_COPIES):
        if max_copies < 1:
            raise ValueError(f"max_copies={max_copies} must be at least 1")
        self.units = {u.index: u for u in units}
        self.queue: deque[int] = deque(self.units)
        self.speculate = speculate
        self.max_copies = max_copies
        self.runners: dict[int, list[Hashable]] = {}  # sampling units -> their actors, in start order
        self.first_start: dict[int, int] = {}  # sampling units -> order of their first start (oldest first)
        self.writers: dict[int, Hashable] = {}
        self.done: set[int] = set()
        self.copies_started = 0  # speculative copies handed out
        self.copies_discarded = 0  # copies that finished sampling after another copy won
        self._starts = itertools.count()

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.units)

    def sampling(self, actor: Hashable) -> list[int]:
        """The units `actor` is sampling."""
        return [i for i, actors in self.runners.items() if actor in actors]

    def assign(self, actor: Hashable) -> ShardSpec | None:
        """The next unit for `actor`: the head of the queue; once the queue is empty (and `speculate`),
        a copy of the oldest running unit that it is not making, that has fewer than `max_copies`
        copies and that no copy has won yet (written or being written: a copy of it would be discarded);
        None when there is neither."""
        if self.queue:
            index = self.queue.popleft()
        else:
            candidates = [i for i, actors in self.runners.items()
                          if self.speculate and actor not in actors and len(actors) < self.max_copies
                          and i not in self.writers and i not in self.done]
            if not candidates:
                return None
            index = min(candidates, key=self.first_start.__getitem__)
            self.copies_started += 1
        self.runners.setdefault(index, []).append(actor)
        self.first_start.setdefault(index, next(self._starts))
        return self.units[index]

    def sampled(self, actor: Hashable, index: int) -> bool:
        """`actor` finished sampling unit `index`: True if it should write it, False if another copy is
        written or being written (discard this one)."""
        self._stop(actor, index)
        if index in self.done or index in self.writers:
            self.copies_discarded += 1
            return False
        self.writers[index] = actor
        return True

    def written(self, actor: Hashable, index: int) -> None:
        """`actor` wrote unit `index` and its marker."""
        if self.writers.get(index) != actor:
            raise AssertionError(f"unit {index} written by {actor!r}, which was not its writer")
        del self.writers[index]
        self.done.add(index)

    def lost(self, actor: Hashable) -> list[ShardSpec]:
        """`actor` died: what it sampled or wrote is forgotten; returns the units that went back to the
        front of the queue (those with no other copy running)."""
        back = []
        for index in self.sampling(actor):
            self._stop(actor, index)
            if index not in self.done and index not in self.writers and index not in self.runners:
                back.append(index)
        for index in [i for i, a in self.writers.items() if a == actor]:
            del self.writers[index]
            if index not in self.runners:
                back.append(index)
        self.queue.extendleft(sorted(back, reverse=True))  # in index order at the front
        return [self.units[i] for i in sorted(back)]

    def _stop(self, actor: Hashable, index: int) -> None:
        actors = self.runners[index]
        actors.remove(actor)
        if not actors:
            del self.runners[index]
            del self.first_start[index]
