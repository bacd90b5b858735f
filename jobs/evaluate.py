"""FID, IS and precision/recall of a samples folder: `python -m jobs.evaluate --config NAME key=value ...`.

    python -m jobs.evaluate --config dit_xl2_256 storage.root=s3://bucket storage.run=dydit-0.5 \
        eval.reference=s3://bucket/VIRTUAL_imagenet256_labeled.npz eval.inception_weights=/weights/pt_inception.pth

Writes the run's `metrics.json` (`{storage.root}/runs/{storage.run}/metrics.json`, see `dydit_dist.paths`).
"""

from __future__ import annotations

import sys

from dydit_dist import cli
from dydit_dist.paths import RunPaths

DESCRIPTION = "Evaluate generated samples with torch-fidelity against reference statistics"


def main(argv: list[str] | None = None) -> int:
    cfg, args = cli.parse_args(cli.job_parser("evaluate", DESCRIPTION), argv)
    # heavy (torch, torch-fidelity): imported once the config is known good
    from dydit_dist.eval import EvalInputError, FeatureExtractorUnavailable, evaluate
    from dydit_dist.sample import SamplesError
    from dydit_dist.shardset import ShardError

    def work() -> str:
        cli.save_resolved_config(cfg, "evaluate")
        record = evaluate(cfg)
        values = ", ".join(f"{k} {v:.4g}" for k, v in record["metrics"].items())
        return (f"{RunPaths(cfg).metrics}: {values} on {record['num_samples']} samples "
                f"[{record['feature_extractor']['name']}]")

    return cli.run_job("evaluate", work, (EvalInputError, FeatureExtractorUnavailable, SamplesError, ShardError), cfg, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
