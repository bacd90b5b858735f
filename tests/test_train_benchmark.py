"""The training throughput benchmark's slice arithmetic: which log windows belong to a slice, and what
each slice is compared with."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "train_throughput", Path(__file__).parents[1] / "benchmarks" / "train_throughput.py"
)
train_throughput = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_throughput)
Window = train_throughput.Window


def _windows(walls: list[float], rates: list[float]) -> list:
    return [Window(wall, 5 * (i + 1), rate, 0.32 / rate * 100) for i, (wall, rate) in enumerate(zip(walls, rates,
                                                                                                       strict=True))]


def test_a_window_counts_only_when_it_began_and_ended_inside_the_slice():
    # Windows end at these times; the workers were stopped from 12.5 to 30.0.
    windows = _windows([10, 11, 12, 31, 32, 33], [100, 200, 200, 50, 200, 200])
    first, second = (0.0, 12.5), (30.0, 40.0)
    assert [w.wall for w in train_throughput.windows_inside(windows, first)] == [11, 12]  # not the warm-up (10)
    # The window ending at 31 began at 12, before the pause: it holds the stopped time and is left out.
    assert [w.wall for w in train_throughput.windows_inside(windows, second)] == [32, 33]


def _reference(single: float, pair: float, ddp: float | None = None) -> dict:
    bare = {"samples_per_s": single, "samples_per_cpu_s": single, "faults_per_s": 0.0, "system_share": 0.0}
    ddp = pair if ddp is None else ddp
    return {"single": bare, "pair": {**bare, "samples_per_s": pair, "samples_per_cpu_s": pair},
            "ddp": {**bare, "samples_per_s": ddp, "samples_per_cpu_s": ddp}}


def test_each_slice_is_compared_with_the_references_on_either_side():
    windows = _windows([10, 11, 12, 31, 32, 33], [100, 160, 160, 50, 300, 300])
    job = {"workers": 2, "intervals": [(0.0, 12.5), (30.0, 40.0)], "windows": windows,
           "references": [_reference(200, 100, 90), _reference(100, 100, 110), _reference(200, 200)],
           "machine": [None, None]}
    rows = train_throughput.slice_rows(job, micro=32)
    assert [r["slice"] for r in rows] == [0, 1]
    # Slice 0: 160 samples/s of the job = 80 per worker, against the bare loop's (200 + 100) / 2.
    assert rows[0]["per_worker"] == pytest.approx(80)
    assert rows[0]["overhead_wall"] == pytest.approx(1 - 80 / 150)
    assert rows[0]["overhead_vs_pair"] == pytest.approx(1 - 80 / 100)
    assert rows[0]["overhead_vs_ddp"] == pytest.approx(1 - 80 / 100)  # one DDP rank: (90 + 110) / 2
    # Slice 1: 150 per worker against (100 + 200) / 2.
    assert rows[1]["overhead_wall"] == pytest.approx(0.0)
    summary = train_throughput._median_of(rows, workers=2)
    assert summary["per_worker"] == pytest.approx(115)
    assert summary["overhead_wall"] == pytest.approx((1 - 80 / 150) / 2)


def test_a_slice_without_a_whole_window_is_left_out():
    windows = _windows([10, 11, 31], [100, 160, 160])
    job = {"workers": 1, "intervals": [(0.0, 12.5), (30.0, 31.5)], "windows": windows,
           "references": [_reference(200, 100)] * 3, "machine": [None, None]}
    assert [r["slice"] for r in train_throughput.slice_rows(job, micro=32)] == [0]
