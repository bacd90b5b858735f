"""Fine-tune on every worker of the Ray cluster: `python -m jobs.finetune --config NAME key=value ...`.

    ray job submit --address ... --working-dir . -- python -m jobs.finetune --config dit_xl2_256 \
        model.method=dydit data.uri=s3://bucket/imagenet-256-latents storage.root=s3://bucket storage.run=dydit-0.5

Submitting again with the same `storage.run` resumes from the run's latest checkpoint. The exported
EMA weights land in `{storage.root}/runs/{storage.run}/checkpoints/ema-{step:07d}.safetensors`.
"""

from __future__ import annotations

import sys

from dydit_dist import cli
from dydit_dist.config import ConfigError
from dydit_dist.data import DataError
from dydit_dist.preflight import check
from dydit_dist.train import launcher

DESCRIPTION = "Fine-tune DiT / PixArt (static or DyDiT) with DeepSpeed ZeRO on Ray Train"


def fit(cfg, wrap_session=None):
    """Start (or join) Ray, check the workers fit the cluster, fit; returns Ray Train's `Result`.
    wrap_session: see `launcher.build_trainer` (tests)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.ray.address)
    launcher.preflight_cluster(cfg, ray.cluster_resources())
    cli.save_resolved_config(cfg, "finetune")
    result = launcher.build_trainer(cfg, wrap_session).fit()
    print(f"finetune: done at step {(result.metrics or {}).get('step')}; checkpoint "
          f"{result.checkpoint.path if result.checkpoint else None}; EMA weights {launcher.latest_ema_url(cfg)}")
    return result


def run(argv: list[str] | None = None, wrap_session=None):
    """Parse, preflight (`dydit_dist.preflight`: a PreflightError before Ray is contacted), fit."""
    cfg = cli.parse(argv, DESCRIPTION)
    check(cfg, "finetune")
    return fit(cfg, wrap_session)


def main(argv: list[str] | None = None) -> int:
    cfg, args = cli.parse_args(cli.job_parser(DESCRIPTION), argv)

    def work() -> None:
        fit(cfg)  # prints its own summary line

    return cli.run_job("finetune", work, (ConfigError, DataError), cfg, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
