"""Evaluation: torch-fidelity metrics on shards streamed from storage, reference statistics, the report.

    record = evaluate(cfg)                                        # {run}/metrics.json
    write_report(RunPaths(cfg), [record_static, record_dydit])    # {run}/report.md + plots/
"""

from .evaluate import evaluate
from .extractors import FeatureExtractorUnavailable, register_extractors, resolve_extractor
from .metrics import EvalInputError, frechet_distance, inception_score, precision_recall, statistics
from .report import write_report

__all__ = [
    "EvalInputError",
    "FeatureExtractorUnavailable",
    "evaluate",
    "frechet_distance",
    "inception_score",
    "precision_recall",
    "register_extractors",
    "resolve_extractor",
    "statistics",
    "write_report",
]
