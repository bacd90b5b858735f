"""Pull-based sampling dispatch: the queue, speculative copies of the oldest running units, the first
write winning, units of dead actors going back; and on an event clock with fake actors of uneven speed,
a 50k job at 32 actors that leaves under 5% of the paid time idle and writes every sample once."""

from __future__ import annotations

from collections import Counter

import pytest

from dydit_dist.sample.dispatch import Dispatcher
from dydit_dist.sample.plan import plan_shards
from dydit_dist.sample.simulate import FakeActor, simulate


def test_actors_pull_the_queue_then_copy_the_oldest_running_units():
    dispatch = Dispatcher(plan_shards(12, 4))  # units 0, 1, 2
    assert [dispatch.assign(a).index for a in "abc"] == [0, 1, 2]
    assert dispatch.sampled("a", 0) and dispatch.sampling("a") == []
    # The queue is empty: "a" copies the oldest running unit, then others copy the next oldest.
    assert dispatch.assign("a").index == 1
    assert dispatch.assign("d").index == 2
    assert dispatch.assign("e") is None  # every running unit has its two copies
    assert dispatch.copies_started == 2
    assert dispatch.assign("b") is None  # never a second copy of what an actor already makes


def test_the_first_copy_to_finish_is_written_and_later_copies_are_discarded():
    dispatch = Dispatcher(plan_shards(4, 4))
    dispatch.assign("slow")
    dispatch.assign("fast")
    assert dispatch.sampled("fast", 0)
    assert not dispatch.sampled("slow", 0)  # being written by "fast": dropped, never written twice
    with pytest.raises(AssertionError, match="not its writer"):
        dispatch.written("slow", 0)
    dispatch.written("fast", 0)
    assert dispatch.finished and dispatch.done == {0} and dispatch.copies_discarded == 1


def test_speculation_can_be_switched_off():
    dispatch = Dispatcher(plan_shards(4, 4), speculate=False)
    dispatch.assign("a")
    assert dispatch.assign("b") is None


def test_units_of_a_dead_actor_go_back_to_the_front_unless_a_copy_runs():
    dispatch = Dispatcher(plan_shards(16, 4))  # units 0..3
    dispatch.assign("a")  # 0
    dispatch.assign("b")  # 1
    assert [u.index for u in dispatch.lost("a")] == [0]
    assert dispatch.assign("c").index == 0  # the front of the queue, before 2 and 3
    # A writer that dies: its unit is made again, unless another copy still runs.
    assert dispatch.sampled("b", 1)
    assert [u.index for u in dispatch.lost("b")] == [1]
    assert dispatch.assign("d").index == 1
    dispatch.assign("e"), dispatch.assign("f")  # 2, 3: the queue is empty
    assert dispatch.assign("g").index == 0  # a copy of the oldest running unit (c's)
    assert dispatch.sampled("c", 0)
    assert dispatch.lost("c") == []  # g's copy of unit 0 still runs: it will write it
    assert dispatch.sampled("g", 0)



def test_no_copy_of_a_unit_that_a_copy_already_won():
    dispatch = Dispatcher(plan_shards(12, 4))  # units 0, 1, 2
    assert [dispatch.assign(a).index for a in "abc"] == [0, 1, 2]
    assert dispatch.assign("d").index == 0  # the queue is empty: a copy of the oldest running unit
    assert dispatch.sampled("a", 0)  # "a" writes unit 0 while "d"'s copy still samples it
    assert dispatch.assign("e").index == 1  # the next straggler, not a third copy of 0 to be discarded
    dispatch.written("a", 0)
    assert dispatch.assign("a").index == 2  # 0 is done: the still-running 2, not 0 again
    assert dispatch.assign("f") is None  # 1 and 2 have their two copies, 0 needs none
    assert not dispatch.sampled("d", 0) and dispatch.copies_started == 3 and dispatch.copies_discarded == 1


def test_a_unit_whose_writer_died_is_copied_again():
    dispatch = Dispatcher(plan_shards(8, 4))  # units 0, 1
    dispatch.assign("a"), dispatch.assign("b"), dispatch.assign("c")  # c copies 0
    assert dispatch.sampled("a", 0)
    assert dispatch.assign("x").index == 1  # 0 is being written
    assert dispatch.lost("a") == []  # c's copy of 0 still runs: left to it, not queued again
    assert dispatch.assign("y").index == 0  # 0 has one copy and no writer: a second copy is worth starting


def _uneven(num_actors: int) -> list[FakeActor]:
    """One actor at a third of the speed, one that dies in the middle of its third unit."""
    return [FakeActor()] * (num_actors - 2) + [FakeActor(speed=1 / 3), FakeActor(dies_at=5.5)]


@pytest.mark.parametrize("num_actors", [8, 32])
def test_fifty_thousand_on_uneven_actors_idle_under_five_percent_and_exactly_n(num_actors):
    result = simulate(50_000, unit_size=128, batch_size=64, actors=_uneven(num_actors), write_time=0.01 / 64,
                      load_time=3.0)
    assert result.failures == 1 and result.copies_started > 0
    assert result.idle_fraction < 0.05, result
    assert result.unique_samples == 50_000 and len(result.samples) == 50_000  # none lost, none twice
    assert Counter(result.written) == Counter(range(391))  # every unit written once
    # Copies were started, and those that lost the race were dropped, not written.
    assert result.copies_discarded > 0 and result.wasted_fraction < 0.1


def test_the_previous_policy_leaves_seven_of_thirty_two_actors_without_work():
    """Shards of 1000 queued two per actor, encoded and written in series: what issue 16 measured."""
    old = simulate(50_000, unit_size=1000, batch_size=64, actors=[FakeActor()] * 32, depth=2,
                   speculate=False, overlap_write=False)
    assert old.idle_fraction == pytest.approx(7 / 32, abs=0.01)
    new = simulate(50_000, unit_size=128, batch_size=64, actors=[FakeActor()] * 32)
    assert new.idle_fraction < 0.05 and new.wall < old.wall


def test_speculation_takes_the_straggler_off_the_critical_path():
    actors = [FakeActor()] * 7 + [FakeActor(speed=1 / 10)]
    without = simulate(2_048, unit_size=128, batch_size=64, actors=actors, speculate=False)
    with_copies = simulate(2_048, unit_size=128, batch_size=64, actors=actors)
    assert with_copies.wall < without.wall
    assert sorted(with_copies.samples) == list(range(2_048))
