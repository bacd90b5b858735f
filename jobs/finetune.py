"""Fine-tune on every worker of the Ray cluster: `python -m jobs.finetune --config NAME key=value ...`.

    ray job submit --address ... --working-dir . -- python -m jobs.finetune --config dit_xl2_256 \
        model.method=dydit data.uri=s3://bucket/imagenet-256-latents storage.root=s3://bucket storage.run=dydit-0.5

Submitting again with the same `storage.run` resumes from the run's latest checkpoint, with the same
settings (what decides the weights: the model and its method's options, the diffusion, the training
recipe but train.max_steps, the data) unless `train.allow_changed_settings=true`; a run
that already exported its EMA weights at train.max_steps exits at once. A worker that fails on its
input (a corrupt shard, a checkpoint of another model) ends the job at once with one line and exit
status 2; Ray Train retries only the other failures (`ray.max_failures`). The exported EMA weights land
in `{storage.root}/runs/{storage.run}/checkpoints/ema-{step:07d}.safetensors`.
"""

from __future__ import annotations

import sys

from dydit_dist import cli
from dydit_dist.paths import RunPaths

DESCRIPTION = "Fine-tune DiT / PixArt (static or DyDiT) with DeepSpeed ZeRO on Ray Train"


def fit(cfg, wrap_session=None):
    """Start (or join) Ray, wait for the workers' capacity, write the resolved config, fit (the settings
    of a resumed run checked before: `launcher.check_settings`); returns Ray Train's `Result`.
    wrap_session: see `launcher.build_trainer` (tests)."""
    from dydit_dist.train import checkpoints, launcher

    cli.connect_ray(cfg, "finetune")
    launcher.preflight_cluster(cfg)
    cli.save_resolved_config(cfg, "finetune")
    checkpoints.remove_uncommitted(RunPaths(cfg).checkpoints)
    result = launcher.fit(launcher.build_trainer(cfg, wrap_session), cfg.ray.capacity_timeout_s)
    print(f"finetune: done at step {(result.metrics or {}).get('step')}; checkpoint "
          f"{result.checkpoint.path if result.checkpoint else None}; EMA weights {launcher.latest_ema_url(cfg)}")
    return result


def run(argv: list[str] | None = None, wrap_session=None):
    """Parse, preflight (`dydit_dist.preflight`: a PreflightError before Ray is contacted), check the
    settings of a resumed run, fit."""
    from dydit_dist.preflight import check
    from dydit_dist.train import launcher

    cfg = cli.parse(argv, "finetune", DESCRIPTION)
    check(cfg, "finetune")
    launcher.check_settings(cfg)
    return fit(cfg, wrap_session)


def main(argv: list[str] | None = None) -> int:
    cfg, args = cli.parse_args(cli.job_parser("finetune", DESCRIPTION), argv)
    # heavy (torch, ray, deepspeed): imported once the config is known good
    from dydit_dist.data import DataError
    from dydit_dist.models import CheckpointError
    from dydit_dist.pipeline import trained_to_end
    from dydit_dist.train.launcher import InputFailure, check_settings, latest_ema_url

    def finished() -> str | None:
        """Before the run's lease is taken: a finished run, or a resume with changed settings (refused)."""
        if trained_to_end(cfg):
            return (f"{RunPaths(cfg).url} is finished: EMA weights at train.max_steps={cfg.train.max_steps} "
                    f"in {latest_ema_url(cfg)}")
        check_settings(cfg)
        return None

    def work() -> None:
        fit(cfg)  # prints its own summary line

    return cli.run_job("finetune", work, (DataError, InputFailure, CheckpointError), cfg, args.dry_run,
                       finished=finished)


if __name__ == "__main__":
    sys.exit(main())
