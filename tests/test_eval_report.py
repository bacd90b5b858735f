"""The report: a table per method with labelled metrics, and its plots."""

from __future__ import annotations

import numpy as np

from dydit_dist import config, storage
from dydit_dist.eval import write_report
from dydit_dist.paths import RunPaths
from dydit_dist.sample import GeneratedSample, pack
from dydit_dist.sample.manifest import SamplesManifest
from dydit_dist.shardset import write_shard


def _samples(url: str, stats: dict) -> None:
    rng = np.random.default_rng(0)
    samples = [GeneratedSample(k, rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), {"index": k, "class": k % 10})
               for k in range(12)]
    record = write_shard(url, 0, pack(samples), 12)  # name, count, sha256, bytes
    manifest = SamplesManifest({"method": "x"}, 1, stats=stats)
    manifest.add({**record, "start": 0, "timing": {"sample_s": 1.0}})
    manifest.write(url)


def _record(url: str, method: str, fid: float, gflops: float) -> dict:
    return {
        "metrics": {"fid": fid, "isc_mean": 3.0, "isc_std": 0.1, "precision": 0.5, "recall": 0.6},
        "num_samples": 12, "samples": url, "method": method, "gflops": gflops, "images_per_s": 10.0,
        "sampling": {"sampler": "ddpm", "steps": 50, "cfg_scale": 1.5, "seed": 0, "num_samples": 12},
        "reference": {"url": "ref", "kind": "data", "statistics": "computed"},
        "feature_extractor": {"name": "digits-cnn", "label": "digits-cnn (NOT Inception)", "weights": "w",
                              "is_inception": False},
        "torch_fidelity_version": "0.4.0",
    }


def test_report_tables_and_plots(tmp_path):
    paths = RunPaths(config.load("debug", [f"storage.root={tmp_path}", "storage.run=demo"]))
    run = paths.url
    assert run == str(tmp_path / "runs" / "demo")
    width = [{"t": t, "heads": 0.5 if t > 500 else 1.0, "mlp": 0.25 if t > 500 else 1.0} for t in (999, 600, 300, 0)]
    _samples(f"{run}/static/samples", {})
    _samples(f"{run}/dydit/samples", {"width_by_timestep": width})
    records = [_record(f"{run}/static/samples", "static", 14.2, 0.0035),
               _record(f"{run}/dydit/samples", "dydit", 8.4, 0.0019)]
    url = write_report(paths, records, "demo", notes=["Static weights: trained from scratch."])
    text = storage.read_bytes(url).decode()
    assert "| method | GFLOPs | images/s | FID [digits-cnn] | sFID [digits-cnn] | IS [digits-cnn] |" in text
    assert "| dydit | 0.0019 | 10.0 | 8.40 | n/a | 3.00 |" in text
    assert "Inception FID" not in text and "NOT Inception" in text
    assert "- Static weights: trained from scratch." in text
    for name in ("fid_vs_flops.png", "dydit_width.png", "samples_grid.png"):
        assert storage.read_bytes(f"{run}/plots/{name}")[:4] == b"\x89PNG"
