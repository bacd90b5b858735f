"""The report: a table per method with labelled metrics, and its plots."""

from __future__ import annotations

import numpy as np
import pytest

from dydit_dist import config, storage
from dydit_dist.eval import write_report
from dydit_dist.eval.report import training_scalars
from dydit_dist.paths import RunPaths
from dydit_dist.sample import GeneratedSample, pack
from dydit_dist.sample.manifest import SamplesManifest
from dydit_dist.shardset import write_shard
from dydit_dist.train.metrics import TensorBoardLog


def _samples(url: str, stats: dict) -> None:
    rng = np.random.default_rng(0)
    samples = [GeneratedSample(k, rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), {"index": k, "class": k % 10})
               for k in range(12)]
    record = write_shard(url, 0, pack(samples), 12, replace=True)  # name, count, sha256, bytes
    manifest = SamplesManifest({"method": "x"}, 1, stats=stats)
    manifest.add({**record, "start": 0, "timing": {"sample_s": 1.0}})
    manifest.write(url)


def _record(url: str, method: str, fid: float, gflops: float) -> dict:
    return {
        "metrics": {"fid": fid, "isc_mean": 3.0, "isc_std": 0.1, "precision": 0.5, "recall": 0.6},
        "num_samples": 12, "samples": url, "method": method, "gflops": gflops, "images_per_s": 10.0,
        "sampling": {"sampler": "ddpm", "steps": 50, "cfg_scale": 1.5, "seed": 0, "num_samples": 12, "labels": "random",
                     "precision": "bf16", "tf32": True, "vae_precision": "bf16"},
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
    assert "| FID |" not in text and "NOT Inception" in text  # no column claims the published kind of FID
    assert "- Static weights: trained from scratch." in text
    for name in ("fid_vs_flops.png", "dydit_width.png", "samples_grid.png"):
        assert storage.read_bytes(f"{run}/plots/{name}")[:4] == b"\x89PNG"


def _training_run(url: str, sessions: list[list[tuple[int, dict]]]) -> None:
    """Event files as the trainer writes them: one TensorBoardLog per session (a resumed run starts another)."""
    for points in sessions:
        log = TensorBoardLog(url, enabled=True)
        for step, scalars in points:
            log.log(step, scalars)
        log.close()


def test_training_curves_of_a_resumed_run(tmp_path):
    """A run logged steps 1-4, crashed, resumed from its checkpoint at step 2 and logged 3-6 again: the curve
    is 1-2 of the first session and 3-6 of the second (the redone steps replace the lost ones)."""
    url = str(tmp_path / "finetune" / "tensorboard")
    first = [(s, {"loss": 1.0 / s, "flops_ratio": 1.0, "lambda_t": 1.0}) for s in (1, 2, 3, 4)]
    second = [(s, {"loss": 0.5 / s, "flops_ratio": 0.9 - 0.1 * s, "lambda_t": 0.5}) for s in (3, 4, 5, 6)]
    _training_run(url, [first, second])
    storage.write_bytes(f"{url}/.events.out.tfevents.1.host.7.0.1f2e.tmp", b"cut")  # an upload cut short
    scalars = training_scalars(url)
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in scalars["loss"]] == pytest.approx([1.0, 0.5, 0.5 / 3, 0.125, 0.1, 0.5 / 6])
    assert scalars["flops_ratio"][-1] == (6, pytest.approx(0.3)) and scalars["lambda_t"][0] == (1, 1.0)
    assert training_scalars(str(tmp_path / "nothing")) == {}


def test_report_shows_the_training_runs(tmp_path):
    paths = RunPaths(config.load("debug", [f"storage.root={tmp_path}", "storage.run=demo"]))
    run = paths.url
    _samples(f"{run}/static/samples", {})
    _samples(f"{run}/dydit/samples", {})
    _training_run(f"{run}/pretrain/tensorboard", [[(s, {"loss": 2.0 / s}) for s in (10, 20)]])
    _training_run(f"{run}/finetune/tensorboard",
                  [[(s, {"loss": 0.1 * s, "flops_ratio": 0.6, "lambda_t": 0.5}) for s in (1, 2)]])
    records = [_record(f"{run}/static/samples", "static", 14.2, 0.0035),
               _record(f"{run}/dydit/samples", "dydit", 8.4, 0.0019)]
    training = {"static (pretrain)": f"{run}/pretrain/tensorboard", "dydit": f"{run}/finetune/tensorboard",
                "flexdit": f"{run}/finetune-flexdit/tensorboard"}  # not trained yet: no curve, no line
    text = storage.read_bytes(write_report(paths, records, "demo", training=training)).decode()
    assert "- static (pretrain) training: last logged step 20, loss 0.1000." in text
    assert "- dydit training: last logged step 2, loss 0.2000, FLOPs ratio 0.600 (target 0.500)." in text
    assert "flexdit training" not in text and "![training curves](plots/training.png)" in text
    assert storage.read_bytes(f"{run}/plots/training.png")[:4] == b"\x89PNG"
    # the same run reported again without its training runs and widths: their old plots go with their links
    assert storage.exists(f"{run}/plots/dydit_width.png") is False
    storage.write_bytes(f"{run}/plots/dydit_width.png", b"an earlier report's")
    text = storage.read_bytes(write_report(paths, records, "demo")).decode()
    assert "plots/training.png" not in text and not storage.exists(f"{run}/plots/training.png")
    assert not storage.exists(f"{run}/plots/dydit_width.png") and storage.exists(f"{run}/plots/samples_grid.png")
    # without a training run: no plot and no link
    other = RunPaths(config.load("debug", [f"storage.root={tmp_path}", "storage.run=other"]))
    _samples(f"{other.url}/static/samples", {})
    text = storage.read_bytes(write_report(other, [_record(f"{other.url}/static/samples", "static", 1.0, 1.0)],
                                           "x", training={"dydit": f"{other.url}/finetune/tensorboard"})).decode()
    assert "training" not in text and not storage.exists(f"{other.url}/plots/training.png")


def test_a_report_names_each_methods_sampling_and_refuses_records_of_other_features(tmp_path):
    paths = RunPaths(config.load("debug", [f"storage.root={tmp_path}", "storage.run=demo"]))
    for method in ("static", "dydit"):
        _samples(f"{paths.url}/{method}/samples", {})
    static = _record(f"{paths.url}/static/samples", "static", 14.2, 0.0035)
    dydit = _record(f"{paths.url}/dydit/samples", "dydit", 8.4, 0.0019)
    dydit["sampling"] = {**dydit["sampling"], "steps": 25}
    text = storage.read_bytes(write_report(paths, [static, dydit], "demo")).decode()
    assert ("- Sampling: ddpm, (static: 50, dydit: 25) steps, guidance 1.5, seed 0, 12 samples per method, labels "
            "random; network bf16 (TF32 True), VAE bf16 (the official samplers: fp32 / TF32)") in text  # FID moves with them
    assert "not a side-by-side speed comparison" in text and "FlopCounterMode for SD-XL" in text
    assert "| precision [digits-cnn] | recall [digits-cnn] |" in text
    inception = {**dydit, "feature_extractor": {"name": "inception-v3-compat", "label": "Inception", "weights": "pt",
                                                "is_inception": True}}
    with pytest.raises(ValueError, match=r"other features or references \(static: features digits-cnn \(w\), reference "
                                         r"ref; dydit: features inception-v3-compat \(pt\), reference ref\)"):
        write_report(paths, [static, inception], "demo")
