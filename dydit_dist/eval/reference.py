"""Reference statistics of an evaluation: given by an ADM reference batch, or computed once and cached.

- An ADM reference batch (`VIRTUAL_imagenet256_labeled.npz`: `mu`, `sigma`, `mu_s`, `sigma_s`,
  `arr_0`, ...): its `mu` and `sigma` (and `mu_s`, `sigma_s` for sFID) are used as given (never
  recomputed from `arr_0`); `arr_0` gives the real features of precision/recall when those are asked
  for. A caption reference (`captions.prepare_caption_reference`) is one too, with `captions` (caption
  k of image k) and `feature_extractor` (the extractor of its statistics, checked).
- Any other image source (an `.npz` with `arr_0` only, a samples folder, pixel-space data): features
  are computed once per source content, extractor and weights and cached on storage under
  `RunPaths.reference_features(digest)`, so later evaluations only read them.

torch-fidelity 0.4 takes no statistics file; the statistics are written into its cache in the format
it expects (`{cache_root}/{name}-{extractor}-stat-fid-{layer}.pt` holding {"mu": float32, "sigma":
float64}) and read back through its own cache lookup, so torch-fidelity sees them as its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch
from torch_fidelity.utils import cache_lookup_one_recompute_on_miss
from torch_fidelity.utils_torch import torch_atomic_save

from dydit_dist import storage
from dydit_dist.paths import RunPaths
from dydit_dist.sample.export import npz_keys, read_npz_small
from dydit_dist.shardset import manifest_url

from .extractors import SPATIAL, Extractor, file_sha256
from .features import FEATURE_PRECISION, count_images, extract_features, image_batches, source_kind
from .metrics import EvalInputError, statistics

log = logging.getLogger(__name__)


@dataclass
class Reference:
    """Statistics (and real features, for precision/recall) of the reference set."""

    url: str
    kind: str  # "adm-npz", "npz", "samples", "data"
    mu: np.ndarray  # (D,) float32
    sigma: np.ndarray  # (D, D) float64
    statistics: str  # where mu and sigma came from
    features: torch.Tensor | None = None  # (N, D) real features of the FID/PRC layer
    num_images: int | None = None
    cache: dict = field(default_factory=dict)
    spatial: dict | None = None  # sFID: {"mu": (D_s,), "sigma": (D_s, D_s)}
    captions: list[str] | None = None  # text-to-image: caption k of real image k (`captions`)

    def describe(self) -> dict:
        return {"url": self.url, "kind": self.kind, "statistics": self.statistics, "num_images": self.num_images,
                "feature_dim": int(self.mu.shape[0]), **self.cache}


def fidelity_cache_root(configured: str | None) -> str:
    return configured or os.path.join(torch.hub.get_dir(), "fidelity_cache")


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _file_digest(path: str | None) -> str:
    return "none" if path is None else file_sha256(path)[:16]


def through_fidelity_cache(name: str, extractor: Extractor, layer: str, mu: np.ndarray, sigma: np.ndarray,
                           cache_root: str) -> dict:
    """Write {"mu", "sigma"} into torch-fidelity's statistics cache and read them back through it."""
    stats = {"mu": np.asarray(mu, dtype=np.float32), "sigma": np.asarray(sigma, dtype=np.float64)}
    cached_name = f"{name}-{extractor.name}-stat-fid-{layer}"
    os.makedirs(cache_root, exist_ok=True)
    torch_atomic_save(stats, os.path.join(cache_root, cached_name + ".pt"))

    def missing():
        raise RuntimeError(f"torch-fidelity's cache lost {cached_name} in {cache_root}")

    return cache_lookup_one_recompute_on_miss(cached_name, missing, cache=True, cache_root=cache_root, verbose=False)


def source_identity(url: str) -> str:
    """What identifies the images of a reference source, read without reading them: an .npz's size and the
    name, CRC-32 and size of each member its zip directory records (at the end of the file); a folder's
    shards as its manifest records them, names and sha256 (the shards are checked against them when read;
    not the manifest's bytes, whose stats and timings change when its driver writes it again)."""
    if source_kind(url) != "npz":
        shards = [(r["name"], r["sha256"]) for r in storage.read_json(manifest_url(url))["shards"]]
        return hashlib.sha256(json.dumps(sorted(shards)).encode()).hexdigest()
    try:
        with storage.open_file(url, "rb") as f, zipfile.ZipFile(f) as zf:
            members = [f"{m.filename}:{m.CRC:08x}:{m.file_size}" for m in zf.infolist()]
    except zipfile.BadZipFile as err:
        raise EvalInputError(f"{url}: not a readable .npz ({err}); expected an ADM reference batch "
                             "(a zip of .npy arrays)") from None
    return " ".join([str(storage.size(url)), *members])


def _cached_features(url: str, extractor: Extractor, layers: list[str], module, device, batch_size: int,
                     paths: RunPaths) -> tuple[dict[str, torch.Tensor], str]:
    """Real features of `url` on `layers` (SPATIAL for sFID's), computed in one pass and cached on
    storage; ({layer: (N, D)}, cache URL). The cache is keyed by the source's content
    (`source_identity`) as well as its URL: other images written at the same URL are not read from it."""
    key = _digest(url, source_identity(url), extractor.name, _file_digest(extractor.weights), *layers,
                  FEATURE_PRECISION)  # caches of before (TF32 convolutions on a GPU) are made again
    cache_url = paths.reference_features(key)
    stored = {layer: "spatial" if layer == SPATIAL else "features" for layer in layers}  # names in the .npz
    if storage.exists(cache_url):
        return {layer: torch.from_numpy(read_npz_small(cache_url, name)) for layer, name in stored.items()}, cache_url
    total = count_images(url)
    spatial = extractor.spatial if SPATIAL in layers else None
    feats = extract_features(image_batches(url, batch_size), module, device, total, desc="reference", spatial=spatial)
    buf = io.BytesIO()
    np.savez(buf, **{name: feats[layer].numpy() for layer, name in stored.items()}, source=np.array(url),
             extractor=np.array(extractor.name))
    storage.write_bytes(cache_url, buf.getvalue())
    log.info("reference features of %s cached at %s", url, cache_url)
    return {layer: feats[layer] for layer in layers}, cache_url


# How far a given covariance may be from symmetric positive semi-definite, relative to its largest
# eigenvalue: float32 storage of a float64 covariance moves eigenvalues by about 1e-6 of it.
COVARIANCE_TOLERANCE = 1e-4


def check_covariance(sigma: np.ndarray, name: str) -> None:
    """ValueError naming `name` unless `sigma` is finite, symmetric and positive semi-definite (within
    COVARIANCE_TOLERANCE). torch-fidelity keeps the real part of a matrix square root that has gone
    complex, so a corrupt covariance would give a FID (even a negative one) where ADM's evaluator raises
    "Imaginary component"."""
    sigma = np.asarray(sigma, dtype=np.float64)
    if not np.isfinite(sigma).all():
        raise EvalInputError(f"{name}: the covariance holds NaN or inf; expected the statistics of real features")
    scale = max(float(np.abs(sigma).max()), np.finfo(np.float64).tiny)
    asymmetry = float(np.abs(sigma - sigma.T).max()) / scale
    if asymmetry > COVARIANCE_TOLERANCE:
        raise EvalInputError(f"{name}: not a covariance (not symmetric: |S - S^T| up to {asymmetry:.2g} of its largest "
                             "entry); a corrupt or foreign statistics file?")
    eigenvalues = np.linalg.eigvalsh((sigma + sigma.T) / 2)
    if eigenvalues[0] < -COVARIANCE_TOLERANCE * max(float(eigenvalues[-1]), np.finfo(np.float64).tiny):
        raise EvalInputError(f"{name}: not a covariance (eigenvalue {eigenvalues[0]:.4g}, the largest "
                             f"{eigenvalues[-1]:.4g}: not positive semi-definite); a corrupt or foreign statistics file?")


def _given_statistics(url: str, mu_key: str, sigma_key: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(mu, sigma, name in torch-fidelity's cache) of an ADM reference batch."""
    mu, sigma = read_npz_small(url, mu_key), read_npz_small(url, sigma_key)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise EvalInputError(f"{url}: {mu_key} {mu.shape} and {sigma_key} {sigma.shape} must be (D,) and (D, D)")
    check_covariance(sigma, f"{url}: {sigma_key}")
    return mu, sigma, "dydit-adm-" + hashlib.sha256(mu.tobytes() + sigma.tobytes()).hexdigest()[:16]


def load_reference(url: str, extractor: Extractor, module, device, metrics: list[str], eval_cfg,
                   paths: RunPaths) -> Reference:
    """The reference of an evaluation (see the module docstring)."""
    layer = extractor.layer("fid")
    if extractor.layer("prc") != layer:
        raise ValueError(f"{extractor.name}: FID layer {layer} != precision/recall layer {extractor.layer('prc')}")
    cache_root = fidelity_cache_root(eval_cfg.fidelity_cache)
    kind = source_kind(url)
    keys = npz_keys(url) if kind == "npz" else []
    if "feature_extractor" in keys and str(read_npz_small(url, "feature_extractor")) != extractor.name:
        raise EvalInputError(f"{url}: its statistics are of {read_npz_small(url, 'feature_extractor')}, not of "
                             f"eval.feature_extractor={extractor.name}; prepare a reference with that extractor")
    if "feature_extractor_weights_sha256" in keys:  # a caption reference (`captions`): other weights, other features
        theirs = str(read_npz_small(url, "feature_extractor_weights_sha256"))
        if theirs != extractor.weights_sha256():
            raise EvalInputError(f"{url}: its statistics are of {extractor.name} with other weights (sha256 "
                                 f"{theirs[:8]}..., these {extractor.weights_sha256()[:8]}...); evaluate with the "
                                 f"weights it was made with, or prepare it again with these")
    given = "mu" in keys and "sigma" in keys
    spatial_given = "mu_s" in keys and "sigma_s" in keys
    # 1. Real features, for what the file does not give
    layers = [layer] if not given or "prc" in metrics else []
    if "sfid" in metrics and not spatial_given:
        layers.append(SPATIAL)
    if given and layers and "arr_0" not in keys:
        what = "precision/recall" if "prc" in metrics else "sFID (it has no mu_s, sigma_s)"
        raise EvalInputError(f"{url}: {what} need the reference images (arr_0), which it lacks")
    features, cache = {}, {}
    if layers:
        features, cache["features_cache"] = _cached_features(url, extractor, layers, module, device,
                                                             eval_cfg.batch_size, paths)
    # 2. Statistics: as given, or of the features
    if given:
        kind = "adm-npz"
        mu, sigma, name = _given_statistics(url, "mu", "sigma")
        source = f"as given in {url} (mu, sigma)"
    else:
        num, width = features[layer].shape
        if num < 2:
            raise EvalInputError(f"{url}: {num} reference image; FID needs the covariance of at least 2 (the published "
                                 "protocols take thousands)")
        if num <= width:
            log.warning("%s: %d reference images for %d features: their covariance is singular and the FID biased "
                        "high (the published protocols take 10,000 or more)", url, num, width)
        stats = statistics(features[layer])
        mu, sigma = stats["mu"], stats["sigma"]
        source = f"computed from {num} images of {url}"
        name = "dydit-ref-" + _digest(cache["features_cache"])
    stats = through_fidelity_cache(name, extractor, layer, mu, sigma, cache_root)
    cache["fidelity_cache"] = os.path.join(cache_root, f"{name}-{extractor.name}-stat-fid-{layer}.pt")
    spatial = None
    if "sfid" in metrics:
        if spatial_given:
            mu_s, sigma_s, spatial_name = _given_statistics(url, "mu_s", "sigma_s")
            source += "; sFID: as given (mu_s, sigma_s)"
        else:
            spatial = statistics(features[SPATIAL])
            mu_s, sigma_s = spatial["mu"], spatial["sigma"]
            spatial_name = "dydit-ref-" + _digest(cache["features_cache"])
            source += f"; sFID: computed from {features[SPATIAL].shape[0]} images"
        spatial = through_fidelity_cache(spatial_name, extractor, SPATIAL, mu_s, sigma_s, cache_root)
    first = next(iter(features.values()), None)
    num = int(first.shape[0]) if first is not None else (count_images(url) if "arr_0" in keys else None)
    captions = [str(c) for c in read_npz_small(url, "captions")] if "captions" in keys else None
    return Reference(url, kind, stats["mu"], stats["sigma"], source, features.get(layer), num, cache, spatial,
                     captions)
