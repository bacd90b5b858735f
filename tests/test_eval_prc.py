"""Improved precision/recall: the blockwise computation the evaluate driver runs equals torch-fidelity's
full-matrix one and the ADM evaluator's definition (k-th neighbour radii, a point inside any ball)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.spatial.distance
import torch
from torch_fidelity.metric_prc import prc_features_to_metric

from dydit_dist.eval.metrics import precision_recall


def adm_precision_recall(generated: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    """The ADM evaluator's ManifoldEstimator (evaluations/evaluator.py) in float64: a set's radii are the
    distances to each point's k-th nearest neighbour (itself excluded), a point is inside a set's manifold
    when it is within the radius of any of its points."""

    def radii(x: np.ndarray) -> np.ndarray:
        return np.partition(scipy.spatial.distance.cdist(x, x, "sqeuclidean"), k, axis=1)[:, k]  # [:, 0]: itself

    between = scipy.spatial.distance.cdist(generated, real, "sqeuclidean")  # (N_g, N_r)
    precision = (between <= radii(real)[None, :]).any(axis=1).mean()
    recall = (between <= radii(generated)[:, None]).any(axis=0).mean()
    return float(precision), float(recall)


@pytest.fixture(scope="module")
def features() -> tuple[torch.Tensor, torch.Tensor]:
    """600 generated and 500 real 64-dimensional features of two shifted Gaussians (precision, recall near 0.6)."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(64, 64)) / 8
    generated = rng.normal(size=(600, 64)) @ mix + 0.3
    real = rng.normal(size=(500, 64)) @ mix
    return torch.from_numpy(generated.astype(np.float32)), torch.from_numpy(real.astype(np.float32))


@pytest.mark.parametrize("batch_size", [128, 2500])  # blocks ending inside both sets; one block each
def test_blockwise_precision_recall_equals_the_full_matrices(features, batch_size):
    generated, real = features
    ours = precision_recall(generated, real, neighborhood=3, batch_size=batch_size)
    full = prc_features_to_metric(generated, real, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False,
                                  verbose=False)
    assert ours == full
    assert 0.05 < ours["precision"] < 0.95 and 0.05 < ours["recall"] < 0.95  # neither count trivial


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_match_the_adm_definition(features, k):
    generated, real = features
    ours = precision_recall(generated, real, neighborhood=k, batch_size=128)
    precision, recall = adm_precision_recall(generated.double().numpy(), real.double().numpy(), k)
    assert (ours["precision"], ours["recall"]) == pytest.approx((precision, recall), abs=1e-6)
    assert ours["f_score"] == pytest.approx(2 * precision * recall / (precision + recall), rel=1e-6)
