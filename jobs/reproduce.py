"""The whole pipeline as one Ray job: `python -m jobs.reproduce --config NAME key=value ...`.

    python -m jobs.reproduce --config demo          # what `make demo` runs, offline, in minutes

prepare -> finetune -> sample -> evaluate for every method in `eval.methods`, each stage skipped when
its outputs exist, ending in `{storage.root}/runs/{storage.run}/report.md` (see
`dydit_dist.pipeline` for where everything goes).
"""

from __future__ import annotations

import sys
import time

from dydit_dist import cli
from dydit_dist.config import ConfigError
from dydit_dist.data import DataError
from dydit_dist.eval import FeatureExtractorUnavailable
from dydit_dist.pipeline import reproduce
from dydit_dist.sample import SamplesError
from dydit_dist.shardset import ShardError


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    cfg = cli.parse(argv, "prepare -> finetune -> sample -> evaluate -> report, each stage skipped when done")
    cli.save_resolved_config(cfg, "reproduce")

    def work() -> str:
        report = reproduce(cfg)
        return f"reproduce: done in {time.monotonic() - start:.0f} s; report at {report}"

    return cli.run_job("reproduce", work, (ConfigError, DataError, ShardError, SamplesError,
                                          FeatureExtractorUnavailable))


if __name__ == "__main__":
    sys.exit(main())
