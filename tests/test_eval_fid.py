"""FID arithmetic, reference statistics, the offline feature-extractor error, evaluation from S3."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import scipy.linalg
import torch
from sampling_util import random_checkpoint, tiny_config, write_samples

from dydit_dist import storage
from dydit_dist.eval.digits import DigitsNet
from dydit_dist.eval.evaluate import evaluate
from dydit_dist.eval.extractors import FeatureExtractorUnavailable, resolve_extractor
from dydit_dist.eval.metrics import frechet_distance, statistics
from dydit_dist.network import save_weights


def scipy_fid(mu1, sigma1, mu2, sigma2) -> float:
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def test_fid_matches_scipy_and_the_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    m1, m2 = rng.normal(size=d).astype(np.float32), rng.normal(size=d).astype(np.float32)
    ours = frechet_distance({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2})
    assert ours == pytest.approx(scipy_fid(m1.astype(np.float64), s1, m2.astype(np.float64), s2), rel=1e-6)
    # Diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2.
    v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    known = float(((m1.astype(np.float64) - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    assert frechet_distance({"mu": m1, "sigma": np.diag(v1)}, {"mu": m2, "sigma": np.diag(v2)}) == pytest.approx(known, rel=1e-6)
    # Statistics of features: float32 mean, float64 covariance, as torch-fidelity makes them.
    stats = statistics(torch.from_numpy(rng.normal(size=(500, d)).astype(np.float32)))
    assert stats["mu"].dtype == np.float32 and stats["sigma"].dtype == np.float64


def test_inception_without_weights_is_a_clear_offline_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cfg = tiny_config(str(tmp_path))
    with pytest.raises(FeatureExtractorUnavailable, match="eval.inception_weights=/path/to/weights-inception"):
        resolve_extractor(cfg.eval)
    bad = tmp_path / "evil.pth"
    torch.save({"weights": object()}, bad)
    cfg = tiny_config(str(tmp_path), f"eval.inception_weights={bad}")
    with pytest.raises(FeatureExtractorUnavailable, match="refusing to unpickle"):  # an input error of the jobs
        resolve_extractor(cfg.eval)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Random (untrained) digits-cnn weights and a static debug checkpoint."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    weights = str(root / "digits-cnn.safetensors")
    save_weights(DigitsNet(), weights)
    return {"weights": weights, "checkpoint": random_checkpoint(str(root / "static.safetensors"))}


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_adm_reference_statistics_are_used_as_given(tmp_path, setup):
    overrides = [f"model.checkpoint={setup['checkpoint']}", "eval.feature_extractor=digits-cnn",
                 f"eval.feature_extractor_weights={setup['weights']}", f"eval.fidelity_cache={tmp_path / 'fc'}",
                 "eval.metrics=[fid]"]
    cfg = tiny_config(str(tmp_path), *overrides)
    torch.set_num_threads(1)
    write_samples(cfg, str(tmp_path / "runs/t/samples"))
    rng = np.random.default_rng(1)
    a = rng.normal(size=(64, 64))
    mu, sigma = rng.normal(size=64), a @ a.T / 64  # float64, as the ADM evaluator writes them
    # arr_0 holds other images: FID must come from mu and sigma, never from them.
    images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    ref = tmp_path / "VIRTUAL_ref.npz"
    ref.write_bytes(_npz_bytes(arr_0=images, mu=mu, sigma=sigma))
    record = evaluate(tiny_config(str(tmp_path), *overrides, f"eval.reference={ref}"))
    gen = _features_of_samples(cfg, str(tmp_path / "runs/t/samples"), setup["weights"])
    stats = statistics(gen)
    # 16 samples of 64-dim features: a singular covariance, so the trace of the root via eigenvalues.
    diff = stats["mu"].astype(np.float64) - mu
    root = np.sqrt(np.linalg.eigvals(stats["sigma"] @ sigma).astype(complex)).real.sum()
    expected = diff @ diff + np.trace(stats["sigma"]) + np.trace(sigma) - 2 * root
    assert record["metrics"]["fid"] == pytest.approx(expected, rel=1e-5)
    assert record["reference"]["kind"] == "adm-npz" and "as given" in record["reference"]["statistics"]
    cached = torch.load(record["reference"]["fidelity_cache"], weights_only=False)  # torch-fidelity's format
    assert cached["mu"].dtype == np.float32 and cached["sigma"].dtype == np.float64
    assert np.array_equal(cached["sigma"], sigma)
    assert record["torch_fidelity_version"] == "0.4.0" and record["num_samples"] == 16
    assert "NOT Inception" in record["feature_extractor"]["label"]


def _features_of_samples(cfg, url, weights):
    from dydit_dist.eval.extractors import resolve_extractor
    from dydit_dist.eval.features import extract_features, image_batches

    cfg.eval.feature_extractor_weights = weights
    extractor = resolve_extractor(cfg.eval)
    module = extractor.create("cpu", ["fid"])
    return extract_features(image_batches(url, 5), module, "cpu")[extractor.layer("fid")]


@pytest.mark.integration
def test_evaluate_reads_shards_and_reference_from_s3(s3_bucket, s3_endpoint, tmp_path, setup):
    overrides = [f"model.checkpoint={setup['checkpoint']}", "eval.feature_extractor=digits-cnn",
                 f"eval.feature_extractor_weights={setup['weights']}", f"eval.fidelity_cache={tmp_path / 'fc'}",
                 f"storage.endpoint_url={s3_endpoint}", "eval.isc_splits=2"]
    cfg = tiny_config(s3_bucket, *overrides)
    torch.set_num_threads(1)
    write_samples(cfg, f"{s3_bucket}/runs/t/samples")
    # The reference: another sample set, given as an ADM .npz with images only (statistics computed, cached).
    other = tiny_config(s3_bucket, *overrides, "sample.seed=5", "storage.run=ref")
    write_samples(other, f"{s3_bucket}/runs/ref/samples")
    from dydit_dist.sample import export_adm_npz

    local = str(tmp_path / "ref.npz")
    export_adm_npz(f"{s3_bucket}/runs/ref/samples", local)
    storage.write_bytes(f"{s3_bucket}/ref.npz", open(local, "rb").read())
    record = evaluate(tiny_config(s3_bucket, *overrides, f"eval.reference={s3_bucket}/ref.npz"))
    assert set(record["metrics"]) == {"fid", "sfid", "isc_mean", "isc_std", "precision", "recall", "f_score"}
    assert record["metrics"]["fid"] > 0 and record["metrics"]["sfid"] > 0 and record["reference"]["num_images"] == 16
    assert storage.read_json(f"{s3_bucket}/runs/t/metrics.json")["metrics"] == record["metrics"]
    cache = record["reference"]["features_cache"]
    assert cache.startswith(s3_bucket) and storage.exists(cache)
    # A samples folder as the reference gives the same numbers as its ADM export.
    again = evaluate(tiny_config(s3_bucket, *overrides, f"eval.reference={s3_bucket}/runs/ref/samples"))
    assert again["metrics"]["fid"] == pytest.approx(record["metrics"]["fid"], rel=1e-6)
    assert again["metrics"]["sfid"] == pytest.approx(record["metrics"]["sfid"], rel=1e-6)
    assert os.path.exists(again["reference"]["fidelity_cache"])


def test_inception_score_matches_its_definition():
    """IS = exp(E_x KL(p(y|x) || p(y))), here by numpy on softmax of the logits (one split: no shuffle)."""
    from dydit_dist.eval.metrics import inception_score

    logits = np.random.default_rng(3).normal(scale=3.0, size=(200, 10))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), axis=1)))
    mean, std = inception_score(torch.from_numpy(logits), splits=1)
    assert mean == pytest.approx(expected, rel=1e-5) and std == 0.0
    mean, std = inception_score(torch.from_numpy(logits), splits=4)  # four splits of 50: each its own p(y)
    assert mean != pytest.approx(expected, rel=1e-3) and std > 0


def test_a_reference_covariance_that_is_no_covariance_is_refused():
    from dydit_dist.eval.reference import check_covariance

    rng = np.random.default_rng(4)
    features = rng.normal(size=(40, 64))  # fewer samples than dimensions: singular, eigenvalues ~ -1e-15
    sigma = np.cov(features, rowvar=False)
    check_covariance(sigma, "ok")
    check_covariance(sigma.astype(np.float32), "ok as float32")
    bad = sigma - np.eye(64) * (np.linalg.eigvalsh(sigma)[-1] * 0.2)
    # torch-fidelity would score it (keeping a complex root's real part): a FID that means nothing
    gen = statistics(torch.from_numpy(features.astype(np.float32)))
    assert np.isfinite(frechet_distance(gen, {"mu": gen["mu"], "sigma": bad}))
    with pytest.raises(ValueError, match=r"ref.npz: sigma: not a covariance \(eigenvalue -.*not positive semi-definite"):
        check_covariance(bad, "ref.npz: sigma")
    skew = sigma.copy()
    skew[0, 1] += sigma.max()
    with pytest.raises(ValueError, match="not symmetric"):
        check_covariance(skew, "ref.npz: sigma")
    nan = sigma.copy()
    nan[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        check_covariance(nan, "ref.npz: sigma")


def _samples_folder(url: str, index_lists: list[list[int]], counts: list[int]) -> None:
    """A samples folder whose shard i holds the samples `index_lists[i]` and whose record counts `counts[i]`."""
    from dydit_dist.sample import GeneratedSample, pack
    from dydit_dist.sample.manifest import SamplesManifest
    from dydit_dist.shardset import write_shard

    rng = np.random.default_rng(0)
    manifest = SamplesManifest({"method": "static", "sampler": "ddpm", "steps": 1, "cfg_scale": 1.0, "seed": 0,
                                "num_samples": sum(counts)}, len(index_lists))
    start = 0
    for i, (indices, count) in enumerate(zip(index_lists, counts, strict=True)):
        samples = [GeneratedSample(k, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), {"index": k, "class": k % 10})
                   for k in indices]
        manifest.add({**write_shard(url, i, pack(samples), count, replace=True), "start": start, "timing": {"sample_s": 1.0}})
        start += count
    manifest.write(url)


def test_evaluate_refuses_shards_that_do_not_hold_their_records_samples(tmp_path, setup):
    from dydit_dist.sample import SamplesError
    from dydit_dist.sample.export import export_adm_npz

    torch.set_num_threads(1)
    ref = tmp_path / "ref.npz"
    ref.write_bytes(_npz_bytes(arr_0=np.random.default_rng(1).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)))
    overrides = ["eval.feature_extractor=digits-cnn", f"eval.feature_extractor_weights={setup['weights']}",
                 f"eval.fidelity_cache={tmp_path / 'fc'}", "eval.num_actors=0", "eval.metrics=[fid,isc]",
                 "eval.isc_splits=2", f"eval.reference={ref}"]

    def run(name, indices, counts, *more):
        url = str(tmp_path / name)
        _samples_folder(url, indices, counts)
        return evaluate(tiny_config(str(tmp_path), *overrides, f"eval.samples={url}", *more), out=f"{url}.json")

    assert run("good", [[0, 1, 2, 3], [4, 5, 6, 7]], [4, 4])["num_samples"] == 8
    with pytest.raises(SamplesError, match=r"twice/shard-000000.tar: sample 3 where 2 was expected"):
        run("twice", [[0, 1, 1, 3], [4, 5, 6, 7]], [4, 4])  # sample 1 twice (one tar key: read once), 2 missing
    with pytest.raises(SamplesError, match=r"short/shard-000000.tar: 3 samples, its manifest record counts 4"):
        run("short", [[0, 1, 2], [4, 5, 6, 7]], [4, 4])
    with pytest.raises(SamplesError, match=r"short/shard-000000.tar: 3 samples, its manifest record counts 4"):
        export_adm_npz(str(tmp_path / "short"), str(tmp_path / "short.npz"))  # the export reads by the same check
    assert not os.path.exists(tmp_path / "short.npz")
    with pytest.raises(SamplesError, match=r"eval.isc_splits=20: more splits than .* \(8\)"):
        run("splits", [[0, 1, 2, 3], [4, 5, 6, 7]], [4, 4], "eval.isc_splits=20")
    assert not os.path.exists(tmp_path / "splits.json")  # nothing written
