"""The prepare job's sample order: a seeded permutation (not class order), per-shard class histograms,
the warning for class-sorted shards, and the reader's classes per batch. No Ray."""

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dydit_dist import config
from dydit_dist.data import LatentStream, ManifestError, prepare, sources
from dydit_dist.data.manifest import Manifest
from dydit_dist.data.pipeline import ShardEncoder, plan, warn_if_class_sorted
from dydit_dist.data.synthetic import write_dataset

_spec = importlib.util.spec_from_file_location("data_order", Path(__file__).parents[1] / "benchmarks" / "data_order.py")
data_order = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(data_order)


@pytest.fixture
def ten_classes(tmp_path):
    """An ImageFolder of 10 classes x 100 files (empty: planning lists files, it does not open them)."""
    root = tmp_path / "images"
    for c in range(10):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(100):
            (root / f"class_{c}" / f"{i:03d}.png").touch()
    return str(root)


def _labels(source_plan) -> list[list[int]]:
    return [[item.label for item in chunk.items] for chunk in source_plan.chunks]


def test_the_plan_is_a_seeded_permutation(ten_classes):
    a = sources.plan_imagefolder(ten_classes, num_classes=10, shard_size=100, seed=0)
    assert a == sources.plan_imagefolder(ten_classes, num_classes=10, shard_size=100, seed=0)
    other = sources.plan_imagefolder(ten_classes, num_classes=10, shard_size=100, seed=1)
    assert _labels(other) != _labels(a) and other.digest == a.digest  # the listing is the same
    keys = [item.key for chunk in a.chunks for item in chunk.items]
    assert sorted(keys) == [f"{i:09d}" for i in range(1000)]  # every image once, keyed by listing position
    assert all(len(set(labels)) == 10 for labels in _labels(a))  # every shard of 100 holds every class


def _classes_per_batch(tmp_path, name: str, shards: list[list[int]]) -> float:
    """The reader's `data/classes_per_batch` over the first epoch's 31 batches of 32 (1 rank, buffer 100:
    the default buffer of 1000 against shards of 1000, scaled down)."""
    labels = np.concatenate(shards)
    uri = str(tmp_path / name)
    write_dataset(uri, np.zeros((len(labels), 1, 1, 1), np.float16), labels=labels, shard_size=len(shards[0]),
                  num_classes=10)
    stream = LatentStream(uri, batch_size=32, seed=0, num_workers=0, shuffle_buffer=100)
    for _, _batch in zip(range(len(labels) // 32), stream, strict=False):
        pass
    return stream.metrics()["data/classes_per_batch"]


def test_batches_of_the_prepared_order_hold_many_classes(ten_classes, tmp_path):
    permuted = _labels(sources.plan_imagefolder(ten_classes, num_classes=10, shard_size=100, seed=0))
    class_order = [[c] * 100 for c in range(10)]  # what the prepare job wrote before
    after = _classes_per_batch(tmp_path, "permuted", permuted)
    before = _classes_per_batch(tmp_path, "class_order", class_order)
    assert after >= 8 > 5 > before  # i.i.d. draws of 32 from 10 classes hold 9.7 on average
    # The benchmark's simulation of the reader's order agrees with the reader.
    shards = [np.array(s) for s in permuted]
    simulated = data_order.reader_batches(shards, ranks=1, workers=1, micro_batch=32, buffer=100, seed=0)
    assert data_order.distinct(simulated.reshape(-1, 32)) == pytest.approx(after)


def _debug_cfg(source: str, uri: str, num_classes: int, shard_size: int):
    return config.load("debug", [f"data.source={source}", f"data.uri={uri}", f"model.num_classes={num_classes}",
                                 f"data.shard_size={shard_size}"])


def test_shard_records_hold_class_histograms(image_source, tmp_path):
    cfg = _debug_cfg(image_source["folder"], str(tmp_path / "pixels"), num_classes=3, shard_size=8)
    settings, source_plan = plan(cfg)
    assert settings["sample_order"] == "permuted"
    threads = torch.get_num_threads()  # the encoder sets this process's threads as a Ray worker's
    try:
        encoder = ShardEncoder(cfg.to_dict(), settings)
        for chunk in source_plan.chunks:
            record = encoder.encode(chunk, cfg.data.uri)
            bad = {b["source"] for b in record["bad"]}
            good = [item.label for item in chunk.items if item.url not in bad]
            assert record["classes"] == {str(c): good.count(c) for c in sorted(set(good))}
            assert sum(record["classes"].values()) == record["count"]
    finally:
        torch.set_num_threads(threads)


def _histogram(labels: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(labels, return_counts=True)
    return {str(v): int(n) for v, n in zip(values, counts, strict=True)}


def _manifest(settings: dict, histograms: list[dict]) -> Manifest:
    manifest = Manifest(settings, len(histograms), complete=True)
    for i, h in enumerate(histograms):
        manifest.add({"index": i, "name": f"shard-{i:06d}.tar", "count": sum(h.values()), "sha256": "",
                      "bytes": 0, "bad": [], "classes": h})
    return manifest


def test_class_sorted_shards_are_reported(caplog):
    settings = {"conditioning": "class", "source_format": "webdataset", "sample_order": "input"}
    rng = np.random.default_rng(0)
    mixed = [_histogram(rng.integers(0, 100, 1000)) for _ in range(10)]  # 100 classes, shards of 1000
    class_sorted = [_histogram(np.repeat(np.arange(10 * s, 10 * s + 10), 100)) for s in range(10)]
    assert _manifest(settings, mixed).class_mixing() == pytest.approx(1.0, abs=0.05)
    assert _manifest(settings, class_sorted).class_mixing() < 0.2  # 10 classes a shard where 100 are expected
    with caplog.at_level(logging.WARNING, logger="dydit_dist.data.pipeline"):
        warn_if_class_sorted("memory://mixed", _manifest(settings, mixed))
        assert not caplog.records
        warn_if_class_sorted("memory://sorted", _manifest(settings, class_sorted))
    assert "memory://sorted: shards are class-sorted" in caplog.text and "shuffle the input tars" in caplog.text


def test_a_data_set_prepared_in_class_order_is_kept_with_a_warning(ten_classes, tmp_path, caplog):
    uri = str(tmp_path / "old")
    cfg = _debug_cfg(ten_classes, uri, num_classes=10, shard_size=100)
    settings, source_plan = plan(cfg)
    old = {k: v for k, v in settings.items() if k != "sample_order"}  # the settings before samples were permuted
    _manifest(old, [{str(c): 100} for c in range(10)]).write(uri)
    for i in range(10):  # the records say 0 bytes
        open(f"{uri}/shard-{i:06d}.tar", "wb").close()
    with caplog.at_level(logging.WARNING, logger="dydit_dist.data.pipeline"):
        result = prepare(cfg)  # complete: nothing to encode, so no Ray
    assert result.encoded == 0 and result.skipped == 10
    assert f"{uri}: shards are in class order" in caplog.text
    # a fine-tune on it says so too (only jobs.prepare did: a lab that upgraded the training code never saw it)
    from dydit_dist import preflight

    noted = [i for i in preflight.plan(cfg, "finetune").inputs if i.key == "data.uri"]
    assert len(noted) == 1 and noted[0].problem is None, noted
    assert "complete manifest, fits the model; WARNING: shards are in class order" in noted[0].note
    os.remove(f"{uri}/shard-000003.tar")  # remade now, it would be in the new order among the old ones
    with pytest.raises(ManifestError, match=rf"{uri} was prepared before samples were permuted, and 1 of its shards "
                                            r"are missing or not of their recorded size \(shard-000003.tar\)"):
        prepare(cfg)
    incomplete = _manifest(old, [{str(c): 100} for c in range(5)])
    incomplete.complete = False
    incomplete.write(uri)
    with pytest.raises(ManifestError, match="other settings.*sample_order"):
        prepare(cfg)  # resuming it in the new order would mix the two orders
