"""The trainer's progress line: the time left at the window's throughput, in the two largest units."""

from __future__ import annotations

import pytest
import torch

from dydit_dist import config as config_lib
from dydit_dist.train.metrics import MetricsWindow, TensorBoardLog, duration, progress_line


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (12.4, "12s"), (245, "4m 05s"), (3600, "1h 00m"),
                                           (11520, "3h 12m"), (183600, "2d 03h"), (-3, "0s")])
def test_duration_gives_the_two_largest_units(seconds, text):
    assert duration(seconds) == text


def test_a_window_tells_the_time_left_at_its_throughput():
    train = config_lib.load("debug", ["train.max_steps=100", "train.global_batch_size=8", "train.log_every=10"]).train
    window = MetricsWindow(train, TensorBoardLog("memory://unused", enabled=False), torch.device("cpu"), rank=0,
                           world_size=1, min_report_interval_s=0.0)
    for _ in range(10):
        window.add({"loss": torch.tensor(0.5)})
    metrics, _ = window.close(10, {"lr": 1e-4, "grad_norm": None})
    # 90 steps left at the window's steps/s (samples/s over the global batch)
    assert metrics["eta_s"] * metrics["samples_per_s"] == pytest.approx(90 * 8)
    assert progress_line(metrics, 100).endswith(f"| eta {duration(metrics['eta_s'])}")
    line = progress_line({**metrics, "eta_s": 11520.0}, 100)
    assert line.startswith("step 10/100 | loss 0.5000 | ") and line.endswith("| lr 1.00e-04 | eta 3h 12m")
