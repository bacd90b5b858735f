"""The evaluate job's work: features of a samples folder streamed from storage, metrics against the
reference, and `{run}/metrics.json` recording every number with what it was computed from.

The samples' features (and CLIP scores) come from `eval.num_actors` Ray actors, on GPUs with
`ray.use_gpu` (`eval.actors`); `eval.num_actors: 0` computes them in this process. The reference's
features, when they are not given or cached, are computed in this process.

`eval.protocol`: `adm` (class-conditional samples against an ADM reference batch or a folder of real
images) or `coco` (text-to-image samples of a captions file, sample k from caption k, against the
real images of those captions made by `jobs.reference`; each sample's prompt is checked against its
image's caption; the metric `clip` adds the CLIP score of each sample and its prompt, `eval.clip`).

    {
      "metrics": {"fid": .., "sfid": .., "isc_mean": .., "isc_std": .., "precision": .., "recall": ..,
                  "f_score": .., "clip_score": ..},
      "num_samples": 50000, "samples": url, "method": "dydit", "sampling": {settings of the samples},
      "gflops": 57.3, "images_per_s": 12.3,        # per network forward of one image; per actor
      "protocol": "adm", "reference": {"url": .., "kind": "adm-npz", "statistics": "as given in ..", ..},
      "feature_extractor": {"name": .., "label": .., "weights": .., "is_inception": .., "layers": {..}},
      "clip_model": null, "torch_fidelity_version": "0.4.0"
    }
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch
import torch_fidelity

from dydit_dist import pretrained, storage
from dydit_dist.config import Config
from dydit_dist.paths import RunPaths
from dydit_dist.sample.manifest import SamplesError, SamplesManifest

from .actors import CLIP, make_pass, sample_features
from .extractors import SPATIAL, resolve_extractor
from .features import FEATURE_PRECISION, extract_features, size_problem
from .metrics import (
    EvalInputError,
    check_metrics,
    frechet_distance,
    inception_score,
    needs_reference,
    precision_recall,
    statistics,
)
from .reference import load_reference, source_identity

log = logging.getLogger(__name__)


def images_per_second(manifest) -> float | None:
    """Measured sampling throughput of one actor: samples over seconds of sampling and decoding."""
    seconds = sum(r["timing"]["sample_s"] for r in manifest.shards.values())
    return manifest.num_samples / seconds if seconds > 0 else None


def _check_captions(samples: str, num_samples: int, reference) -> None:
    if reference is None or reference.captions is None:
        raise EvalInputError(f"eval.protocol=coco: {reference.url if reference else 'eval.reference'} has no captions; "
                             "make the reference with jobs.reference (real images with their captions)")
    if num_samples > len(reference.captions):
        raise EvalInputError(f"eval.protocol=coco: {samples} holds {num_samples} samples, the reference "
                             f"{len(reference.captions)} captions; sample at most one per caption")


def _check_statistics_width(url: str, reference, extractor, module, device, sample_size: int) -> None:
    """EvalInputError, before the samples' feature pass, when the given statistics are of other features than
    the extractor's (their width against its features' on one blank image: an ADM 2048-d batch with a 64-d
    extractor)."""
    blank = np.zeros((1, sample_size, sample_size, 3), np.uint8)
    spatial = extractor.spatial if reference.spatial is not None else None
    dims = {name: f.shape[1] for name, f in extract_features([blank], module, device, spatial=spatial).items()}
    widths = [("statistics", reference.mu.shape[0], dims[extractor.layer("fid")])]
    if spatial is not None:
        widths.append(("sFID statistics", reference.spatial["mu"].shape[0], dims[SPATIAL]))
    for what, theirs, ours in widths:
        if theirs != ours:
            raise EvalInputError(f"{url}: reference {what} have {theirs} dimensions, the {extractor.name} "
                                 f"features {ours}; use statistics of the same extractor")


def evaluation_settings(e) -> dict:
    """What decides the metrics of a samples folder besides the samples (`EvalConfig` e); metrics.json records it.
    The reference (its URL and a digest of its content, `reference.source_identity`: images rewritten at the
    same URL are another reference) and the CLIP model only where a metric reads them."""
    reference = e.reference if needs_reference(e.metrics) else None
    content = hashlib.sha256(source_identity(reference).encode()).hexdigest()[:16] if reference else None
    return {"metrics": list(e.metrics), "protocol": e.protocol, "reference": reference, "reference_content": content,
            "feature_extractor": e.feature_extractor, "feature_extractor_weights": e.feature_extractor_weights,
            "inception_weights": e.inception_weights, "clip_model": e.clip_model if "clip" in e.metrics else None,
            "isc_splits": e.isc_splits if "isc" in e.metrics else None,
            "prc_neighborhood": e.prc_neighborhood if "prc" in e.metrics else None}


def evaluate(cfg: Config, samples: str | None = None, out: str | None = None) -> dict:
    """Metrics of the samples folder `samples` (default `eval.samples`, else the run's `samples/`),
    written to `out` (default the run's `metrics.json`, see `RunPaths`) and returned."""
    e = cfg.eval
    check_metrics(e.metrics, e.protocol)
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
    if "isc" in e.metrics and e.isc_splits > manifest.num_samples:
        raise SamplesError(f"eval.isc_splits={e.isc_splits}: more splits than {samples} has samples "
                         f"({manifest.num_samples}); the Inception Score takes at least one sample per split")
    compared = needs_reference(e.metrics)
    if compared and not e.reference:
        raise EvalInputError("eval.reference is required for FID, sFID and precision/recall: an ADM reference batch "
                             "(.npz), a samples folder or a pixel-space data folder")
    if "clip" in e.metrics and not e.clip_model:
        raise EvalInputError("eval.metrics has clip: set eval.clip_model to a CLIP model (a local or storage folder "
                             "of transformers' CLIPModel and CLIPProcessor, or a Hugging Face id)")
    pretrained.mirror_clip(cfg)  # a Hub id: once here, not once per actor (the pods of an offline cluster read it)
    # 2. The reference, and the features of the samples in one streamed pass (CLIP scores on the way)
    extractor = resolve_extractor(e)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = extractor.create(device, e.metrics)
    settings = evaluation_settings(e)  # before the reference is read: its content digest is what was read
    reference = None
    if compared:
        sample_size = manifest.settings.get("image_size")
        if (problem := size_problem(e.reference, sample_size)) is not None:  # before its features are made
            raise EvalInputError(f"{e.reference}: {problem}")
        reference = load_reference(e.reference, extractor, module, device, e.metrics, e, paths)
        if reference.kind == "adm-npz":  # statistics as given, of unknown features (made here: of these)
            _check_statistics_width(e.reference, reference, extractor, module, device, sample_size or 256)
    captions = None
    if e.protocol == "coco" and compared:
        _check_captions(samples, manifest.num_samples, reference)
        captions = reference.captions
    local = make_pass(cfg, device, module) if e.num_actors == 0 else None
    feats = sample_features(cfg, samples, manifest.records(), captions, local)
    # 3. Metrics
    values: dict[str, float] = {}
    if "fid" in e.metrics:
        gen = statistics(feats[extractor.layer("fid")])
        values["fid"] = frechet_distance(gen, {"mu": reference.mu, "sigma": reference.sigma})
    if "sfid" in e.metrics:
        values["sfid"] = frechet_distance(statistics(feats[SPATIAL]), reference.spatial)
    if "isc" in e.metrics:
        values["isc_mean"], values["isc_std"] = inception_score(feats[extractor.layer("isc")], e.isc_splits)
    if "prc" in e.metrics:
        values.update(precision_recall(feats[extractor.layer("prc")], reference.features, e.prc_neighborhood))
    if "clip" in e.metrics:
        values["clip_score"] = float(feats[CLIP].double().mean())
    # 4. The record
    record = {
        "metrics": values,
        "num_samples": manifest.num_samples,
        "samples": samples,
        "samples_digest": manifest.content_digest(),  # the bytes evaluated (`pipeline.metrics_done`)
        "method": manifest.settings["method"],
        "sampling": manifest.settings,
        "evaluation": settings,
        "gflops": manifest.stats.get("gflops"),
        "images_per_s": images_per_second(manifest),
        "protocol": e.protocol,
        "reference": reference.describe() if reference else None,
        "feature_extractor": extractor.describe(),
        "feature_precision": FEATURE_PRECISION,
        "clip_model": e.clip_model if "clip" in e.metrics else None,
        "torch_fidelity_version": torch_fidelity.__version__,
    }
    storage.write_json(out, record)
    log.info("%s: %s on %d samples (%s)", out, values, manifest.num_samples, extractor.name)
    return record
