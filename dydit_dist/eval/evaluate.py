"""The evaluate job's work: features of a samples folder streamed from storage, metrics against the
reference, and `{run}/metrics.json` recording every number with what it was computed from.

    {
      "metrics": {"fid": .., "isc_mean": .., "isc_std": .., "precision": .., "recall": .., "f_score": ..},
      "num_samples": 50000, "samples": url, "method": "dydit", "sampling": {settings of the samples},
      "gflops": 57.3, "images_per_s": 12.3,        # per network forward of one image; per actor
      "reference": {"url": .., "kind": "adm-npz", "statistics": "as given in ..", "num_images": ..},
      "feature_extractor": {"name": .., "label": .., "weights": .., "is_inception": .., "layers": {..}},
      "torch_fidelity_version": "0.4.0"
    }
"""

from __future__ import annotations

import logging

import torch
import torch_fidelity

from dydit_dist import storage
from dydit_dist.config import Config
from dydit_dist.paths import RunPaths
from dydit_dist.sample.manifest import SamplesError, SamplesManifest

from .extractors import resolve_extractor
from .features import extract_features, image_batches
from .metrics import check_metrics, frechet_distance, inception_score, precision_recall, statistics
from .reference import load_reference

log = logging.getLogger(__name__)


def images_per_second(manifest) -> float | None:
    """Measured sampling throughput of one actor: samples over seconds of sampling and decoding."""
    seconds = sum(r["timing"]["sample_s"] for r in manifest.shards.values())
    return manifest.num_samples / seconds if seconds > 0 else None


def evaluate(cfg: Config, samples: str | None = None, out: str | None = None) -> dict:
    """Metrics of the samples folder `samples` (default `eval.samples`, else the run's `samples/`),
    written to `out` (default the run's `metrics.json`, see `RunPaths`) and returned."""
    e = cfg.eval
    check_metrics(e.metrics)
    paths = RunPaths(cfg)
    samples = samples or e.samples or paths.samples
    out = out or paths.metrics
    # 1. What is evaluated
    try:
        manifest = SamplesManifest.read(samples)
    except FileNotFoundError:
        raise SamplesError(f"{samples}: no samples manifest; run the sample job first") from None
    if not manifest.complete:
        raise SamplesError(f"{samples}: {len(manifest.shards)} of {manifest.num_shards} shards are done; "
                           "rerun the sample job to finish them")
    if ("fid" in e.metrics or "prc" in e.metrics) and not e.reference:
        raise ValueError("eval.reference is required for FID and precision/recall: an ADM reference batch (.npz), "
                         "a samples folder or a pixel-space data folder")
    # 2. Features of the samples, streamed
    extractor = resolve_extractor(e)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = extractor.create(device, e.metrics)
    feats = extract_features(image_batches(samples, e.batch_size), module, device, manifest.num_samples,
                             desc="samples")
    # 3. Metrics
    values: dict[str, float] = {}
    reference = None
    if "fid" in e.metrics or "prc" in e.metrics:
        reference = load_reference(e.reference, extractor, module, device, e.metrics, e, paths)
    if "fid" in e.metrics:
        gen = statistics(feats[extractor.layer("fid")])
        if gen["mu"].shape != reference.mu.shape:
            raise ValueError(f"{e.reference}: reference statistics have {reference.mu.shape[0]} dimensions, the "
                             f"{extractor.name} features {gen['mu'].shape[0]}; use statistics of the same extractor")
        values["fid"] = frechet_distance(gen, {"mu": reference.mu, "sigma": reference.sigma})
    if "isc" in e.metrics:
        values["isc_mean"], values["isc_std"] = inception_score(feats[extractor.layer("isc")], e.isc_splits)
    if "prc" in e.metrics:
        values.update(precision_recall(feats[extractor.layer("prc")], reference.features, e.prc_neighborhood))
    # 4. The record
    record = {
        "metrics": values,
        "num_samples": manifest.num_samples,
        "samples": samples,
        "method": manifest.settings["method"],
        "sampling": manifest.settings,
        "gflops": manifest.stats.get("gflops"),
        "images_per_s": images_per_second(manifest),
        "reference": reference.describe() if reference else None,
        "feature_extractor": extractor.describe(),
        "torch_fidelity_version": torch_fidelity.__version__,
    }
    storage.write_json(out, record)
    log.info("%s: %s on %d samples (%s)", out, values, manifest.num_samples, extractor.name)
    return record
