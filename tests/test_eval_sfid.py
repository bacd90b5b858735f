"""sFID: the Frechet distance of spatial Inception features (ADM's mixed_6/conv[..., :7]), its features
tapped from the FID forward of torch-fidelity's Inception, and reference statistics given beside mu, sigma."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from eval_util import random_inception_weights
from sampling_util import random_checkpoint, tiny_config, write_samples

from dydit_dist.eval.digits import DigitsNet
from dydit_dist.eval.evaluate import evaluate
from dydit_dist.eval.extractors import INCEPTION, SPATIAL, Extractor
from dydit_dist.eval.features import extract_features
from dydit_dist.eval.metrics import frechet_distance, statistics
from dydit_dist.network import save_weights
from dydit_dist.sample import export_adm_npz


def numpy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The ADM evaluator's arithmetic (evaluations/evaluator.py FIDStatistics.frechet_distance), in float64."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_sfid_of_two_gaussian_feature_sets_matches_numpy():
    rng = np.random.default_rng(0)
    d, n = 7 * 7 * 7, 1500  # 7 channels of a 7 x 7 grid (ADM's 17 x 17 x 7 = 2023 takes minutes in scipy on CPU)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    a = (rng.normal(size=(n, d)) @ mix).astype(np.float32)
    b = (0.9 * rng.normal(size=(n, d)) @ mix + 0.05).astype(np.float32)
    ours = frechet_distance(statistics(torch.from_numpy(a)), statistics(torch.from_numpy(b)))
    assert ours == pytest.approx(numpy_frechet(a.astype(np.float64), b.astype(np.float64)), rel=1e-6)


def test_spatial_features_of_torch_fidelity_inception(tmp_path):
    """The real Inception-v3 architecture (random weights): 17 x 17 x 7 = 2023 spatial features, the first
    7 channels of Mixed_6d (= its 1x1 branch, TF's mixed_6/conv) in NHWC order, from the FID forward."""
    weights = random_inception_weights(str(tmp_path / "inception.pth"))
    extractor = Extractor(INCEPTION, weights, weights, "random Inception")
    module = extractor.create("cpu", ["fid", "sfid"])
    mixed = []
    module.Mixed_6d.register_forward_hook(lambda m, i, out: mixed.append(out))
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    feats = extract_features(iter([images[:2], images[2:]]), module, "cpu", spatial=extractor.spatial)
    assert feats[SPATIAL].shape == (3, 2023) and feats["2048"].shape == (3, 2048)
    expected = torch.cat(mixed)[:, :7].permute(0, 2, 3, 1).reshape(3, -1)  # (B, 17, 17, 7) flattened
    torch.testing.assert_close(feats[SPATIAL], expected)
    assert feats[SPATIAL].std() > 0
    assert extractor.describe()["layers"]["sfid"].startswith("mixed_6/conv[..., :7]")


def test_sfid_uses_mu_s_sigma_s_of_an_adm_reference(tmp_path):
    """An ADM reference batch gives mu_s, sigma_s: sFID uses them as given; without them, they are
    computed from its arr_0 (and both agree when the given ones are those statistics)."""
    save_weights(DigitsNet(), str(tmp_path / "digits.safetensors"))
    overrides = [f"model.checkpoint={random_checkpoint(str(tmp_path / 'static.safetensors'))}",
                 "eval.feature_extractor=digits-cnn", f"eval.feature_extractor_weights={tmp_path / 'digits.safetensors'}",
                 f"eval.fidelity_cache={tmp_path / 'fc'}", "eval.metrics=[fid,sfid]"]
    root = f"file://{tmp_path}"
    torch.set_num_threads(1)
    write_samples(tiny_config(root, *overrides), f"{root}/runs/t/samples")
    write_samples(tiny_config(root, *overrides, "sample.seed=5"), f"{root}/runs/ref/samples")
    images_only = str(tmp_path / "ref.npz")
    export_adm_npz(f"{root}/runs/ref/samples", images_only)
    computed = evaluate(tiny_config(root, *overrides, f"eval.reference={images_only}"))
    assert computed["metrics"]["sfid"] > 0
    # The same statistics written beside the images, as the ADM evaluator's batches carry them.
    module = Extractor("digits-cnn", str(tmp_path / "digits.safetensors"), None, "").create("cpu", ["fid", "sfid"])
    arr = np.load(images_only)["arr_0"]
    from dydit_dist.eval.extractors import SPATIAL_TAPS

    feats = extract_features(iter([arr]), module, "cpu", spatial=SPATIAL_TAPS["digits-cnn"])
    fid, spatial = statistics(feats["64"]), statistics(feats[SPATIAL])
    given = str(tmp_path / "given.npz")
    np.savez(given, arr_0=arr, mu=fid["mu"], sigma=fid["sigma"], mu_s=spatial["mu"], sigma_s=spatial["sigma"])
    record = evaluate(tiny_config(root, *overrides, f"eval.reference={given}"))
    assert record["reference"]["kind"] == "adm-npz" and "sFID: as given" in record["reference"]["statistics"]
    assert "features_cache" not in record["reference"]  # nothing recomputed
    assert record["metrics"]["sfid"] == pytest.approx(computed["metrics"]["sfid"], rel=1e-5)
    assert record["metrics"]["fid"] == pytest.approx(computed["metrics"]["fid"], rel=1e-5)


def test_inception_weights_other_than_torch_fidelitys_are_not_called_fid(tmp_path, monkeypatch, caplog):
    """Weights of Inception's shape but not torch-fidelity's (their sha256): the metrics are labelled with the
    extractor and the reason, never as the published kind; the official weights' digest is what decides."""
    from dydit_dist import config as config_lib
    from dydit_dist.eval import extractors
    from dydit_dist.eval.report import metric_name

    weights = random_inception_weights(str(tmp_path / "inception.pth"))
    e = config_lib.load("debug", [f"eval.inception_weights={weights}", "eval.feature_extractor=inception-v3-compat"]).eval
    other = extractors.resolve_extractor(e)
    assert not other.is_inception and "not torch-fidelity's Inception weights" in caplog.text
    assert metric_name({"feature_extractor": other.describe()}, "fid") == \
        "FID [inception-v3-compat, not torch-fidelity's weights]"
    monkeypatch.setattr(extractors, "INCEPTION_SHA256", extractors.file_sha256(weights)[:8])  # as if they were
    official = extractors.resolve_extractor(e)
    assert official.is_inception and metric_name({"feature_extractor": official.describe()}, "fid") == "FID"
