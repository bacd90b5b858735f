"""The whole pipeline as one Ray job: `python -m jobs.reproduce --config NAME key=value ...`.

    python -m jobs.reproduce --config demo          # what `make demo` runs, offline, in minutes

prepare -> finetune -> sample -> evaluate for every method in `eval.methods`, each stage skipped when
its outputs exist, ending in `{storage.root}/runs/{storage.run}/report.md` (see `dydit_dist.pipeline`
for where everything goes; a text-to-image comparison that trains nothing, such as `--config
at_edm_sdxl_1024`, starts with the caption reference instead of prepare). The inputs of every stage
are resolved before the first one starts (`dydit_dist.preflight`; `--dry-run` prints the plan and stops).
"""

from __future__ import annotations

import sys
import time

from dydit_dist import cli

DESCRIPTION = "prepare -> finetune -> sample -> evaluate -> report, each stage skipped when done"


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    cfg, args = cli.parse_args(cli.job_parser("reproduce", DESCRIPTION), argv)
    # heavy (torch, ray, deepspeed, diffusers): imported once the config is known good
    from dydit_dist.data import DataError
    from dydit_dist.eval import EvalInputError, FeatureExtractorUnavailable
    from dydit_dist.models import CheckpointError
    from dydit_dist.pipeline import OutputsDiffer, reproduce
    from dydit_dist.sample import SamplesError
    from dydit_dist.shardset import ShardError
    from dydit_dist.train.launcher import InputFailure

    def work() -> str:
        cli.save_resolved_config(cfg, "reproduce")
        cli.connect_ray(cfg, "reproduce")
        report = reproduce(cfg)
        return f"reproduce: done in {time.monotonic() - start:.0f} s; report at {report}"

    return cli.run_job("reproduce", work, (DataError, ShardError, SamplesError, EvalInputError, FeatureExtractorUnavailable,
                                         InputFailure, OutputsDiffer, CheckpointError), cfg, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
