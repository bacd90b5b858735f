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
from dydit_dist.train import launcher


def run(argv: list[str] | None = None, wrap_session=None):
    """Parse, check, fit; returns Ray Train's `Result`. ConfigError / DataError before any worker starts.
    wrap_session: see `launcher.build_trainer` (tests)."""
    import ray

    cfg = cli.parse(argv, "Fine-tune DiT / PixArt (static or DyDiT) with DeepSpeed ZeRO on Ray Train")
    launcher.preflight(cfg)
    if not ray.is_initialized():
        ray.init(address=cfg.ray.address)
    launcher.preflight_cluster(cfg, ray.cluster_resources())
    cli.save_resolved_config(cfg, "finetune")
    result = launcher.build_trainer(cfg, wrap_session).fit()
    print(f"finetune: done at step {(result.metrics or {}).get('step')}; checkpoint "
          f"{result.checkpoint.path if result.checkpoint else None}; EMA weights {launcher.latest_ema_url(cfg)}")
    return result


def main(argv: list[str] | None = None) -> int:
    def work() -> None:
        run(argv)  # prints its own summary line

    return cli.run_job("finetune", work, (ConfigError, DataError))


if __name__ == "__main__":
    sys.exit(main())
