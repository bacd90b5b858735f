"""FID, sFID, Inception Score and precision/recall through torch-fidelity's own arithmetic.

torch-fidelity computes its metrics from features; the features here come from shards streamed off
storage (`features`), so its functions are called on them directly: `fid_features_to_statistics` and
`fid_statistics_to_metric` (mean float32, covariance float64, trace of the matrix square root from
the eigenvalues of sigma1 sigma2), `isc_features_to_metric`, `prc_features_to_metric`. sFID is the
same Frechet distance on spatial features (`extractors.SpatialTap`: ADM's `mixed_6/conv[..., :7]`).
The CLIP score of text-to-image samples is in `clip`.
"""

from __future__ import annotations

import typing

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_prc import (
    KEY_METRIC_F_SCORE,
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
    prc_features_to_metric,
)

from dydit_dist.config import Metric

SUPPORTED = typing.get_args(Metric)  # ("fid", "sfid", "isc", "prc", "clip"): the config's vocabulary
NEED_REFERENCE = ("fid", "sfid", "prc")
PRC_BATCH_SIZE = 2500  # rows of distances per block in precision/recall (`precision_recall`: its peak memory)


class EvalInputError(ValueError):
    """An input of the evaluation that cannot be used (a reference of other features or without images,
    samples that do not fit it, a setting without what it needs): the job's exit 2 with the message."""


def needs_reference(metrics) -> bool:
    """Whether any of `metrics` compares the samples with a reference (FID, sFID, precision/recall)."""
    return any(m in NEED_REFERENCE for m in metrics)


def check_metrics(metrics: list[str], protocol: str = "adm") -> None:
    unknown = sorted(set(metrics) - set(SUPPORTED))
    if unknown or not metrics:
        raise EvalInputError(f"eval.metrics={metrics}: valid metrics are {', '.join(SUPPORTED)} (at least one)")
    if "clip" in metrics and protocol != "coco":
        raise EvalInputError("eval.metrics has clip, the CLIP score of text-to-image samples; it needs "
                             "eval.protocol=coco (samples of a captions file)")


def statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """(N, D) features -> {"mu": (D,) float32, "sigma": (D, D) float64}, as torch-fidelity makes them."""
    return fid_features_to_statistics(features.float())


def frechet_distance(stats_1: dict, stats_2: dict) -> float:
    """FID between two {"mu", "sigma"} statistics, by torch-fidelity."""
    return float(fid_statistics_to_metric(stats_1, stats_2, verbose=False)[KEY_METRIC_FID])


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` splits of (N, classes) logits (torch-fidelity's shuffle seed 2020)."""
    out = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=2020)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def precision_recall(generated: torch.Tensor, real: torch.Tensor, neighborhood: int = 3,
                     batch_size: int = PRC_BATCH_SIZE) -> dict[str, float]:
    """Improved precision/recall (Kynkaanniemi et al.) of generated (N_g, D) against real (N_r, D) features.

    torch-fidelity's blockwise mode (`save_cpu_ram=True`): distances are taken `batch_size` rows at a
    time against one whole set, so the peak is about 20 * batch_size * max(N_g, N_r) bytes (the fp32
    row blocks, their concatenation, kthvalue's copy and cdist's temporaries), 2.3 GiB at 50k samples.
    Its full mode holds N x N distance matrices, about 16 * N^2 bytes (37 GiB at 50k), more than the
    evaluate driver has. Both give the same radii and the same counts (test_eval_prc)."""
    out = prc_features_to_metric(generated.float(), real.float(), prc_neighborhood=neighborhood,
                                 prc_batch_size=batch_size, save_cpu_ram=True, verbose=False)
    return {"precision": out[KEY_METRIC_PRECISION], "recall": out[KEY_METRIC_RECALL],
            "f_score": out[KEY_METRIC_F_SCORE]}
