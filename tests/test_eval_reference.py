"""Reference features computed from images: the layers every metric needs are extracted (sFID and IS alone
still give the reference's FID statistics), and the cache follows the reference's content, not its URL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sampling_util import random_checkpoint, tiny_config, write_samples

from dydit_dist.eval.digits import DigitsNet
from dydit_dist.eval.evaluate import evaluate
from dydit_dist.eval.extractors import resolve_extractor
from dydit_dist.eval.features import extract_features
from dydit_dist.eval.metrics import EvalInputError, statistics
from dydit_dist.eval.reference import load_reference
from dydit_dist.network import save_weights
from dydit_dist.paths import RunPaths
from dydit_dist.sample import SamplesManifest


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reference")
    torch.manual_seed(0)
    save_weights(DigitsNet(), str(root / "digits.safetensors"))
    return {"digits": str(root / "digits.safetensors"), "checkpoint": random_checkpoint(str(root / "static.safetensors"))}


def _overrides(tmp_path, weights, *more: str) -> list[str]:
    return [f"model.checkpoint={weights['checkpoint']}", "eval.feature_extractor=digits-cnn",
            f"eval.feature_extractor_weights={weights['digits']}", f"eval.fidelity_cache={tmp_path / 'fc'}",
            "eval.num_actors=0", "eval.isc_splits=2", *more]


def _images(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)


def test_isc_and_sfid_against_a_reference_of_images_only(tmp_path, weights):
    """eval.metrics=[isc, sfid] with a reference of images (arr_0, no mu/sigma): the reference's features
    hold the FID layer its statistics are made of, and sFID equals the one of [fid, sfid]."""
    root = str(tmp_path)
    torch.set_num_threads(1)
    write_samples(tiny_config(root, *_overrides(tmp_path, weights)), f"{root}/runs/t/samples")
    reference = tmp_path / "ref.npz"
    np.savez(reference, arr_0=_images(1))
    record = evaluate(tiny_config(root, *_overrides(tmp_path, weights, "eval.metrics=[isc,sfid]",
                                                    f"eval.reference={reference}")))
    assert set(record["metrics"]) == {"isc_mean", "isc_std", "sfid"} and record["metrics"]["sfid"] > 0
    assert record["reference"]["num_images"] == 12
    both = evaluate(tiny_config(root, *_overrides(tmp_path, weights, "eval.metrics=[fid,sfid]",
                                                  f"eval.reference={reference}")))
    assert both["metrics"]["sfid"] == pytest.approx(record["metrics"]["sfid"], rel=1e-6)


def test_a_reference_replaced_at_its_url_is_not_read_from_the_cache(tmp_path, weights):
    """Other images written at the reference's URL (the same shape, so the same file size): its features
    and statistics are those of the new images, cached apart from the old ones."""
    cfg = tiny_config(str(tmp_path), *_overrides(tmp_path, weights, "eval.metrics=[fid,prc]"))
    extractor = resolve_extractor(cfg.eval)
    module = extractor.create("cpu", cfg.eval.metrics)
    url = str(tmp_path / "ref.npz")

    def load():
        return load_reference(url, extractor, module, "cpu", cfg.eval.metrics, cfg.eval, RunPaths(cfg))

    np.savez(url, arr_0=_images(1))
    first, size = load(), (tmp_path / "ref.npz").stat().st_size
    assert load().cache["features_cache"] == first.cache["features_cache"]  # unchanged: read from the cache
    np.savez(url, arr_0=_images(2))
    assert (tmp_path / "ref.npz").stat().st_size == size
    second = load()
    expected = extract_features(iter([_images(2)]), module, "cpu")[extractor.layer("prc")]
    assert second.cache["features_cache"] != first.cache["features_cache"]
    torch.testing.assert_close(second.features, expected, rtol=0, atol=0)
    np.testing.assert_array_equal(second.mu, statistics(expected)["mu"])


def test_a_folder_reference_is_keyed_by_its_shards_not_its_manifest_bytes(tmp_path, weights):
    """A samples folder as the reference: a manifest written again with other stats (its driver's timings)
    is the same images and reads the cache; a shard made again with other bytes is not."""
    cfg = tiny_config(str(tmp_path), *_overrides(tmp_path, weights, "eval.metrics=[fid]", "sample.num_samples=8",
                                                 "sample.shard_size=4", "sample.steps=2"))
    extractor = resolve_extractor(cfg.eval)
    module = extractor.create("cpu", cfg.eval.metrics)
    url = str(tmp_path / "refs")
    write_samples(cfg, url)

    def load():
        return load_reference(url, extractor, module, "cpu", cfg.eval.metrics, cfg.eval, RunPaths(cfg))

    first = load().cache["features_cache"]
    manifest = SamplesManifest.read(url)
    manifest.stats["wall_s"] = 123.0
    manifest.write(url)
    assert load().cache["features_cache"] == first
    write_samples(tiny_config(str(tmp_path), *_overrides(tmp_path, weights, "sample.num_samples=8",
                                                          "sample.shard_size=4", "sample.steps=2", "sample.seed=1")), url)
    assert load().cache["features_cache"] != first


def test_a_reference_that_does_not_fit_is_exit_2_before_the_samples_feature_pass(tmp_path, weights, capsys,
                                                                                monkeypatch):
    """Bad input is one line and exit 2 (not a ValueError's traceback, exit 1), found before the samples'
    features are extracted: statistics of other features (an ADM 2048-d reference with the 64-d digits
    extractor), images of another resolution, a reference without the images precision/recall needs."""
    import importlib

    from jobs.evaluate import main

    evaluate_module = importlib.import_module("dydit_dist.eval.evaluate")  # the package exports the function

    root = str(tmp_path)
    torch.set_num_threads(1)
    write_samples(tiny_config(root, *_overrides(tmp_path, weights)), f"{root}/runs/t/samples")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2048, 2048)), rng.normal(size=(64, 64))
    np.savez(tmp_path / "adm.npz", mu=rng.normal(size=2048), sigma=a @ a.T / 2048, arr_0=_images(1))
    np.savez(tmp_path / "big.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    np.savez(tmp_path / "stats.npz", mu=rng.normal(size=64), sigma=b @ b.T / 64)
    passes = []
    monkeypatch.setattr(evaluate_module, "sample_features", lambda *args: passes.append(args) or {})
    base = ["--config", "debug", f"storage.root={root}", "storage.run=t", "sample.num_samples=16",
            "sample.shard_size=4", *_overrides(tmp_path, weights)]
    for reference, metrics, message in [
        ("adm.npz", "[fid]", "adm.npz: reference statistics have 2048 dimensions, the digits-cnn features 64; use "),
        ("stats.npz", "[fid,prc]", "stats.npz: precision/recall need the reference images (arr_0), which it lacks"),
    ]:
        assert main([*base, f"eval.reference={tmp_path / reference}", f"eval.metrics={metrics}"]) == 2
        err = capsys.readouterr().err
        assert f"evaluate: {tmp_path / message}" in err and "Traceback" not in err, err
    # images of another resolution: named by the preflight (reproduce's too, before stage 1), and by the
    # evaluation itself before the reference's own features are made
    size = "its images are 32x32, the samples 16x16; use the reference of the samples' resolution"
    assert main([*base, f"eval.reference={tmp_path / 'big.npz'}", "eval.metrics=[fid]"]) == 2
    assert f"eval.reference={tmp_path / 'big.npz'}: {size}" in capsys.readouterr().err
    monkeypatch.setattr(evaluate_module, "load_reference", lambda *args: passes.append(args))
    with pytest.raises(EvalInputError, match=f"big.npz: {size}"):
        evaluate_module.evaluate(tiny_config(root, *_overrides(tmp_path, weights, "eval.metrics=[fid]",
                                                               f"eval.reference={tmp_path / 'big.npz'}")))
    assert passes == []


def test_weights_of_another_network_are_refused_when_resolved(tmp_path):
    """A tensors-only file that is not the extractor's state dict: refused by name before any work (it failed
    with torch's load_state_dict traceback when the first features were due)."""
    from dydit_dist import config
    from dydit_dist.eval.extractors import ExtractorWeightsRefused

    save_weights(torch.nn.Linear(3, 2), str(tmp_path / "linear.safetensors"))
    cfg = config.load("debug", ["eval.feature_extractor=digits-cnn",
                                f"eval.feature_extractor_weights={tmp_path / 'linear.safetensors'}"])
    with pytest.raises(ExtractorWeightsRefused, match=r"eval.feature_extractor_weights=.*linear.safetensors: not a "
                                                      r"state dict of digits-cnn \(Error\(s\) in loading state_dict"):
        resolve_extractor(cfg.eval)


def test_extractor_weights_format_is_read_from_content_not_name(tmp_path, weights):
    """digits-cnn weights as a safetensors file named `.pt` (passed the pickle check by name and was refused
    with torch.load's advice to unpickle) and as a tensors-only torch `.pt` (the extractor read every file
    with safetensors): both give the features of the original file."""
    import shutil

    from dydit_dist import config
    from dydit_dist.models import load_state_dict_file

    images = torch.from_numpy(_images(1)).permute(0, 3, 1, 2).contiguous()
    renamed = tmp_path / "digits-safetensors.pt"
    shutil.copy(weights["digits"], renamed)
    pickled = tmp_path / "digits-torch.pt"
    torch.save(load_state_dict_file(weights["digits"]), pickled)
    features = {}
    for path in (weights["digits"], renamed, pickled):
        cfg = config.load("debug", ["eval.feature_extractor=digits-cnn", f"eval.feature_extractor_weights={path}"])
        extractor = resolve_extractor(cfg.eval).create("cpu", ["fid"])
        features[path] = extractor(images)[0]
    first, *others = features.values()
    for other in others:
        torch.testing.assert_close(other, first, rtol=0, atol=0)
