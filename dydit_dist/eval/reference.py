"""Reference statistics of an evaluation: given by an ADM reference batch, or computed once and cached.

- An ADM reference batch (`VIRTUAL_imagenet256_labeled.npz`: `mu`, `sigma`, `arr_0`, ...): its `mu`
  and `sigma` are used as given for FID (never recomputed from `arr_0`); `arr_0` gives the real
  features of precision/recall when those are asked for.
- Any other image source (an `.npz` with `arr_0` only, a samples folder, pixel-space data): features
  are computed once per extractor and weights and cached on storage under
  `RunPaths.reference_features(digest)`, so later evaluations only read them.

torch-fidelity 0.4 takes no statistics file; the statistics are written into its cache in the format
it expects (`{cache_root}/{name}-{extractor}-stat-fid-{layer}.pt` holding {"mu": float32, "sigma":
float64}) and read back through its own cache lookup, so torch-fidelity sees them as its own.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch_fidelity.utils import cache_lookup_one_recompute_on_miss
from torch_fidelity.utils_torch import torch_atomic_save

from dydit_dist import storage
from dydit_dist.paths import RunPaths
from dydit_dist.sample.export import npz_keys, read_npz_small

from .extractors import Extractor
from .features import count_images, extract_features, image_batches, source_kind
from .metrics import statistics

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

    def describe(self) -> dict:
        return {"url": self.url, "kind": self.kind, "statistics": self.statistics, "num_images": self.num_images,
                "feature_dim": int(self.mu.shape[0]), **self.cache}


def fidelity_cache_root(configured: str | None) -> str:
    return configured or os.path.join(torch.hub.get_dir(), "fidelity_cache")


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _file_digest(path: str | None) -> str:
    if path is None:
        return "none"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


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


def _cached_features(url: str, extractor: Extractor, layer: str, module, device, batch_size: int,
                     paths: RunPaths) -> tuple[torch.Tensor, str]:
    """Real features of `url` on `layer`, computed once and cached on storage; (features, cache URL)."""
    key = _digest(url, extractor.name, _file_digest(extractor.weights), layer)
    cache_url = paths.reference_features(key)
    if storage.exists(cache_url):
        return torch.from_numpy(read_npz_small(cache_url, "features")), cache_url
    total = count_images(url)
    feats = extract_features(image_batches(url, batch_size), module, device, total, desc="reference")[layer]
    buf = io.BytesIO()
    np.savez(buf, features=feats.numpy(), source=np.array(url), extractor=np.array(extractor.name))
    storage.write_bytes(cache_url, buf.getvalue())
    log.info("reference features of %s cached at %s", url, cache_url)
    return feats, cache_url


def load_reference(url: str, extractor: Extractor, module, device, metrics: list[str], eval_cfg,
                   paths: RunPaths) -> Reference:
    """The reference of an evaluation (see the module docstring)."""
    layer = extractor.layer("fid")
    if extractor.layer("prc") != layer:
        raise ValueError(f"{extractor.name}: FID layer {layer} != precision/recall layer {extractor.layer('prc')}")
    cache_root = fidelity_cache_root(eval_cfg.fidelity_cache)
    kind = source_kind(url)
    keys = npz_keys(url) if kind == "npz" else []
    given = "mu" in keys and "sigma" in keys
    features, cache = None, {}
    if given:
        kind = "adm-npz"
        mu, sigma = read_npz_small(url, "mu"), read_npz_small(url, "sigma")
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{url}: mu {mu.shape} and sigma {sigma.shape} must be (D,) and (D, D)")
        source = f"as given in {url} (mu, sigma)"
        name = "dydit-adm-" + hashlib.sha256(mu.tobytes() + sigma.tobytes()).hexdigest()[:16]
        if "prc" in metrics:
            if "arr_0" not in keys:
                raise ValueError(f"{url}: precision/recall need the reference images (arr_0), which it lacks")
            features, cache["features_cache"] = _cached_features(url, extractor, layer, module, device,
                                                                 eval_cfg.batch_size, paths)
    else:
        features, cache["features_cache"] = _cached_features(url, extractor, layer, module, device,
                                                             eval_cfg.batch_size, paths)
        stats = statistics(features)
        mu, sigma = stats["mu"], stats["sigma"]
        source = f"computed from {features.shape[0]} images of {url}"
        name = "dydit-ref-" + _digest(cache["features_cache"])
    stats = through_fidelity_cache(name, extractor, layer, mu, sigma, cache_root)
    cache["fidelity_cache"] = os.path.join(cache_root, f"{name}-{extractor.name}-stat-fid-{layer}.pt")
    num = int(features.shape[0]) if features is not None else (count_images(url) if "arr_0" in keys else None)
    return Reference(url, kind, stats["mu"], stats["sigma"], source, features, num, cache)
