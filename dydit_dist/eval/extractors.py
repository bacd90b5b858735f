"""The feature extractor of an evaluation: torch-fidelity's Inception-v3 (the one FIDs are published
with) or another registered extractor, with its weights found offline or a clear error.

Inception weights come from `eval.inception_weights` (a local path, a storage URL or an http(s) URL)
or torch hub's cache, where torch-fidelity itself would put them; nothing else is downloaded. Pickled
weights are opened with `weights_only=True` first, so a file holding anything but tensors is refused
before torch-fidelity (which unpickles freely) sees it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from dydit_dist import storage
from dydit_dist.models import is_safetensors_file

from . import digits
from .metrics import EvalInputError, needs_reference

log = logging.getLogger(__name__)

INCEPTION = "inception-v3-compat"
INCEPTION_SHA256 = "6726825d"  # the start of the sha256 of torch-fidelity's weights (its file name says so too)
LABELS = {
    INCEPTION: "Inception-v3 (torch-fidelity's TF-compatible port, pool3 / logits)",
    digits.NAME: "digits-cnn: a small CNN classifier trained on scikit-learn's digits (NOT Inception; "
                 "comparable only with numbers on the same features)",
}
METRIC_KEYS = ("fid", "isc", "prc")  # metrics whose features are a layer torch-fidelity provides
SPATIAL = "spatial"  # sFID's features: the key `features.extract_features` gives them under


@dataclass(frozen=True)
class SpatialTap:
    """sFID's features: the first `channels` channels of `module`'s (B, C, H, W) output, flattened in
    (H, W, channels) order as the ADM evaluator flattens its NHWC tensor."""

    module: str  # submodule of the torch-fidelity extractor
    channels: int
    label: str


# ADM's evaluator takes `mixed_6/conv` of the TF graph: the 1x1 branch of the 7th mixed block, which is
# torch-fidelity's Mixed_6d.branch1x1 (Mixed_5b..5d, 6a..6e are mixed, mixed_1 .. mixed_7).
SPATIAL_TAPS = {
    INCEPTION: SpatialTap("Mixed_6d.branch1x1", 7, "mixed_6/conv[..., :7] (Mixed_6d.branch1x1), 17 x 17 x 7 = 2023"),
    digits.NAME: SpatialTap("net.conv1", 7, "conv1[..., :7], 8 x 8 x 7 = 448"),
}


class FeatureExtractorUnavailable(RuntimeError):
    """The feature extractor's weights cannot be had offline; the message says how to supply them."""


class ExtractorWeightsRefused(FeatureExtractorUnavailable, ValueError):
    """A weights file given for the extractor that is not a plain state dict (refused unpickled): an input
    error of the job (exit 2), as a missing one is."""


def register_extractors() -> None:
    """Register this project's extractors with torch-fidelity (once per process)."""
    if digits.NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(digits.NAME, digits.DigitsFeatureExtractor)


@dataclass(frozen=True)
class Extractor:
    """name: torch-fidelity registry name; weights: local file handed to it; source: as configured."""

    name: str
    weights: str | None
    source: str | None
    label: str
    official: bool = True  # Inception: the weights are torch-fidelity's (their sha256), so its numbers are FID

    @property
    def is_inception(self) -> bool:
        """Whether the metrics are the published kind: Inception-v3 with the official weights (other weights of
        the same shape give other numbers, labelled with the extractor's name in the report)."""
        return self.name == INCEPTION and self.official

    def layer(self, metric: str) -> str:
        """The features of `metric` (fid, sfid, isc, prc): a torch-fidelity layer, or SPATIAL for sfid."""
        if metric == "sfid":
            return SPATIAL
        return FEATURE_EXTRACTORS_REGISTRY[self.name].get_default_feature_layer_for_metric(metric)

    @property
    def spatial(self) -> SpatialTap:
        if self.name not in SPATIAL_TAPS:
            raise EvalInputError(f"eval.metrics has sfid, which needs spatial features; {self.name} has none "
                                 f"(extractors with them: {', '.join(SPATIAL_TAPS)})")
        return SPATIAL_TAPS[self.name]

    def weights_sha256(self) -> str:
        """The sha256 of the weights file ("" for an extractor without one)."""
        return file_sha256(self.weights) if self.weights else ""

    def describe(self) -> dict:
        layers = {m: self.layer(m) for m in METRIC_KEYS}
        if self.name in SPATIAL_TAPS:
            layers["sfid"] = SPATIAL_TAPS[self.name].label
        return {"name": self.name, "label": self.label, "weights": self.source, "is_inception": self.is_inception,
                "layers": layers}

    def create(self, device: str | torch.device, metrics: list[str]) -> torch.nn.Module:
        """The torch-fidelity module producing the features of `metrics`, in eval mode on `device`. The FID
        layer is always among them when a metric needs a reference (fid, sfid, prc): a reference computed
        from images gets its statistics from that layer (`reference.load_reference`), for sFID too."""
        layers = {self.layer(m) for m in metrics if m in METRIC_KEYS}
        if not layers or needs_reference(metrics):
            layers.add(self.layer("fid"))
        kwargs = {"feature_extractor_weights_path": self.weights, "verbose": False}
        module = create_feature_extractor(self.name, sorted(layers), cuda=False, **kwargs)
        return module.to(device)


def _cache_dir() -> str:
    return os.path.join(torch.hub.get_dir(), "dydit_dist")


def _local_copy(source: str, what: str) -> str:
    """A local file holding `source` (a path, a storage URL or an http(s) URL)."""
    plain = source.removeprefix("file://")
    if "://" not in plain or source.startswith("file://"):
        if not os.path.isfile(plain):
            raise FileNotFoundError(f"{what}: no such file {source}")
        return plain
    target = os.path.join(_cache_dir(), hashlib.sha256(source.encode()).hexdigest()[:16] + "-" + os.path.basename(plain))
    if os.path.isfile(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"
    if source.startswith(("http://", "https://")):
        try:
            torch.hub.download_url_to_file(source, tmp, progress=False)
        except OSError as err:
            raise FeatureExtractorUnavailable(
                f"{what}: cannot download {source} ({type(err).__name__}: {err}); copy the file to this "
                "machine and give its local path instead") from err
    else:
        with open(tmp, "wb") as f:
            f.write(storage.read_bytes(source))
    os.replace(tmp, target)
    return target


def _check_tensors_only(path: str, what: str) -> None:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; the cause is kept
        raise ExtractorWeightsRefused(f"{what}: {path} is not a plain state dict loadable with weights_only=True "
                         f"({type(err).__name__}); refusing to unpickle it") from err


def hub_inception_path() -> str:
    """Where torch-fidelity keeps its Inception-v3 weights (torch hub's cache), used when
    eval.inception_weights is unset."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))


def inception_missing_message() -> str:
    """How to supply the Inception-v3 weights when neither eval.inception_weights nor the hub cache has them."""
    return ("FID, IS and precision/recall need torch-fidelity's Inception-v3 weights, which are not on this "
            f"machine and are not downloaded here. Fetch {URL_INCEPTION_V3} on a machine with internet, then "
            "set eval.inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth (a local path, "
            f"an s3:// URL or an http(s) mirror), or put the file in {os.path.dirname(hub_inception_path())}/. "
            f"For an offline smoke test use eval.feature_extractor={digits.NAME} (NOT Inception).")


def file_sha256(path: str) -> str:
    """The sha256 of a local file (hex), read in 1 MiB blocks once per version of the file (size, mtime)."""
    stat = os.stat(path)
    return _sha256(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inception_weights(configured: str | None) -> str:
    """A local, checked Inception-v3 weights file, or FeatureExtractorUnavailable saying how to get one."""
    if configured:
        path = _local_copy(configured, "eval.inception_weights")
    else:
        path = hub_inception_path()
        if not os.path.isfile(path):
            raise FeatureExtractorUnavailable(inception_missing_message())
    _check_tensors_only(path, "eval.inception_weights")
    return path


def _check_loads(extractor: Extractor, key: str) -> None:
    """ExtractorWeightsRefused naming `key` when the extractor cannot load its weights (another network's
    state dict, a file torch cannot read), found before any work rather than when the first features are
    due; once per process and version of the file (`resolve_extractor` runs in the driver and each actor)."""
    stat = os.stat(extractor.weights)
    try:
        _loads(extractor, stat.st_size, stat.st_mtime_ns)
    except Exception as err:  # noqa: BLE001 - load_state_dict's key errors, an unpickling or a format error
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ExtractorWeightsRefused(f"{key}={extractor.source}: not a state dict of {extractor.name} "
                                      f"({first})") from None


@functools.lru_cache(maxsize=8)
def _loads(extractor: Extractor, size: int, mtime_ns: int) -> None:
    extractor.create("cpu", ["fid"])


def resolve_extractor(eval_cfg) -> Extractor:
    """The extractor of an `EvalConfig`, its weights made local and checked."""
    register_extractors()
    name = eval_cfg.feature_extractor
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise EvalInputError(f"eval.feature_extractor={name!r} is not registered with torch-fidelity "
                             f"{torch_fidelity.__version__}; registered: {', '.join(FEATURE_EXTRACTORS_REGISTRY)}")
    if name == INCEPTION:
        path = inception_weights(eval_cfg.inception_weights)
        digest = file_sha256(path)
        official = digest.startswith(INCEPTION_SHA256)
        extractor = Extractor(name, path, eval_cfg.inception_weights or "torch hub cache", LABELS[name], official)
        if not official:
            log.warning("eval.inception_weights=%s: not torch-fidelity's Inception weights (sha256 %s..., expected "
                        "%s...): the metrics are not comparable with published FIDs, and say so", path,
                        digest[:8], INCEPTION_SHA256)
            _check_loads(extractor, "eval.inception_weights")
        return extractor
    source = eval_cfg.feature_extractor_weights
    if name == digits.NAME and not source:
        raise EvalInputError(f"eval.feature_extractor={name} needs eval.feature_extractor_weights "
                             "(train them with dydit_dist.eval.digits.train_digits_classifier)")
    weights = _local_copy(source, "eval.feature_extractor_weights") if source else None
    if weights and not is_safetensors_file(weights):  # by content: a safetensors file named .pt is no pickle
        _check_tensors_only(weights, "eval.feature_extractor_weights")
    extractor = Extractor(name, weights, source, LABELS.get(name, f"{name} (torch-fidelity extractor, NOT Inception)"))
    if weights:
        _check_loads(extractor, "eval.feature_extractor_weights")
    return extractor
