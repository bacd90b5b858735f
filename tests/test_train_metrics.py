"""The trainer's progress line (the time left at the window's throughput, in the two largest units) and its TensorBoard
uploads (off the training thread, failures a warning)."""

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


def test_the_time_left_counts_the_checkpoints_left_at_the_last_ones_duration(monkeypatch):
    train = config_lib.load("debug", ["train.max_steps=105", "train.global_batch_size=8", "train.log_every=10",
                                      "train.checkpoint_every=20"]).train
    clock = [0.0]
    monkeypatch.setattr("dydit_dist.train.metrics.time.perf_counter", lambda: clock[0])
    window = MetricsWindow(train, TensorBoardLog("memory://unused", enabled=False), torch.device("cpu"), rank=0,
                           world_size=1, min_report_interval_s=0.0)
    # after the close at step s: the checkpoints at 20, 40, 60, 80, 100 and 105 from s on (s's own comes next)
    assert [window.checkpoints_left(s) for s in (1, 20, 21, 100, 101, 105, 106)] == [6, 6, 5, 2, 1, 1, 0]

    def steps(n: int, step: int, seconds_each: float = 1.0) -> dict:
        for _ in range(n):
            clock[0] += seconds_each
            window.add({"loss": torch.tensor(0.5)})
        return window.close(step, {"lr": 1e-4})[0]

    assert steps(20, 20)["eta_s"] == pytest.approx(85.0)  # no checkpoint measured yet
    clock[0] += 7.0  # the checkpoint at step 20
    window.restart()
    # 20 steps at 1 s (the checkpoint left out), then 65 steps and the checkpoints at 40, 60, 80, 100, 105
    assert steps(20, 40)["eta_s"] == pytest.approx(65.0 + 5 * 7.0)
    assert steps(65, 105)["eta_s"] == pytest.approx(7.0)  # the last checkpoint


def _scalars(folder) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("loss")}


def test_tensorboard_uploads_do_not_hold_up_the_step_and_all_arrive_at_close(tmp_path, monkeypatch):
    """Rank 0 uploads its event file on a thread of its own: a slow object store does not stop `log` (the
    other ranks would wait for it at the next all-reduce); the flushes made during an upload are uploaded
    after it, and `close` leaves every scalar in the run folder."""
    import threading

    from dydit_dist import storage

    release, started, puts = threading.Event(), threading.Event(), []
    real = storage.write_bytes

    def slow_put(url, data):
        started.set()
        assert release.wait(30), "the test never released the upload"
        puts.append(url)
        real(url, data)

    monkeypatch.setattr(storage, "write_bytes", slow_put)
    url = str(tmp_path / "tensorboard")
    tb = TensorBoardLog(url, enabled=True)
    tb.log(1, {"loss": 1.0})
    assert started.wait(30)
    for step in range(2, 6):  # while the first upload hangs
        tb.log(step, {"loss": 1.0 / step})
    assert puts == []  # log returned with the upload still held
    release.set()
    tb.close()
    assert _scalars(url) == pytest.approx({s: 1.0 / s for s in range(1, 6)})
    assert len(puts) <= 3  # the first, one for the flushes made during it, the last: not one per log


def test_a_failed_tensorboard_upload_is_a_warning_and_the_next_carries_the_scalars(tmp_path, monkeypatch, caplog):
    from dydit_dist import storage

    real, calls = storage.write_bytes, []

    def flaky(url, data):
        calls.append(url)
        if len(calls) == 1:
            raise OSError("503 Slow Down")
        real(url, data)

    monkeypatch.setattr(storage, "write_bytes", flaky)
    url = str(tmp_path / "tensorboard")
    tb = TensorBoardLog(url, enabled=True)
    tb.log(1, {"loss": 0.5})
    tb._uploader.join(30)
    assert "TensorBoard upload" in caplog.text and "503 Slow Down" in caplog.text
    tb.log(2, {"loss": 0.25})
    tb.close()
    assert _scalars(url) == pytest.approx({1: 0.5, 2: 0.25})


def test_a_flush_after_an_upload_decided_to_end_is_uploaded_without_waiting_for_close(tmp_path):
    """The upload thread's last look at the flushes and its exit are not one instant: a log() between them
    starts an upload of its own (it used to leave its scalars to the next log or close, which a run that
    dies never reaches)."""
    import threading

    exiting, go_on = threading.Event(), threading.Event()

    class Lingering(TensorBoardLog):
        def _upload_while_stale(self):
            super()._upload_while_stale()
            if not exiting.is_set():  # the first upload thread only
                exiting.set()
                go_on.wait(30)  # decided to end, not yet ended

    url = tmp_path / "tensorboard"
    tb = Lingering(str(url), enabled=True)
    tb.log(1, {"loss": 1.0})
    assert exiting.wait(30)
    first = tb._uploader
    tb.log(2, {"loss": 0.5})
    assert tb._uploader is not first  # an upload of its own
    tb._uploader.join(30)
    assert _scalars(url) == pytest.approx({1: 1.0, 2: 0.5})  # before close
    go_on.set()
    tb.close()


def _close_on_rank(rank: int, init_file: str, results) -> None:
    """One rank of a 2-rank gloo group: a window of one step whose rank-own skip counters differ."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        train = config_lib.load("debug", ["train.max_steps=10", "train.global_batch_size=8"]).train
        window = MetricsWindow(train, TensorBoardLog("memory://unused", enabled=False), torch.device("cpu"),
                               rank=rank, world_size=2, min_report_interval_s=0.0)
        window.add({"loss": torch.tensor([1.0, 3.0][rank])})
        skipped = {"data/skipped_shards": [0, 3][rank], "data/skipped_samples": [0, 20_000_001][rank]}
        metrics, _ = window.close(1, {"lr": 1e-4, **skipped})
        results[rank] = {k: metrics[k] for k in ("loss", "data/skipped_shards", "data/skipped_samples")}
        results[f"line{rank}"] = progress_line(metrics, 10)
    finally:
        dist.destroy_process_group()


def test_the_skip_counters_are_summed_over_the_ranks(tmp_path):
    """Rank 0's metrics are what the session, TensorBoard and the progress line get: they carry every rank's
    skipped shards and samples (rank 1 alone skipped here), exactly, while the loss stays the ranks' mean."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_close_on_rank, args=(str(tmp_path / "init"), results), nprocs=2, start_method="spawn")
        results = dict(results)
    for rank in (0, 1):
        assert results[rank] == {"loss": 2.0, "data/skipped_shards": 3, "data/skipped_samples": 20_000_001}
    assert "| skipped 3 shards (20000001 samples)" in results["line0"]
