"""Generate samples into object storage: `python -m jobs.sample --config NAME key=value ...`.

    ray job submit --address ... --working-dir . -- python -m jobs.sample --config dit_xl2_256 \
        model.method=dydit model.checkpoint=s3://bucket/runs/dydit-0.5 sample.method=dydit \
        storage.root=s3://bucket storage.run=dydit-0.5

Writes `{storage.root}/runs/{storage.run}/samples/shard-*.tar` and `manifest.json`; a rerun makes only
the missing shards. `sample.export_npz=PATH` also writes the ADM evaluator's `.npz`.
"""

from __future__ import annotations

import sys

from dydit_dist import cli
from dydit_dist.paths import RunPaths

DESCRIPTION = "Generate N samples across the Ray cluster into sharded tars on object storage"


def main(argv: list[str] | None = None) -> int:
    cfg, args = cli.parse_args(cli.job_parser("sample", DESCRIPTION), argv)
    # heavy (torch, ray, diffusers): imported once the config is known good
    from dydit_dist.models import CheckpointError
    from dydit_dist.sample import SamplesError, export_adm_npz, run_sampling
    from dydit_dist.shardset import ShardError

    def work() -> str:
        cli.save_resolved_config(cfg, "sample")
        cli.connect_ray(cfg, "sample")
        manifest = run_sampling(cfg)
        samples = RunPaths(cfg).samples
        if cfg.sample.export_npz:
            export_adm_npz(samples, cfg.sample.export_npz)
        return (f"{samples}: {manifest.num_samples} samples in {manifest.num_shards} shards"
                + (f"; ADM .npz at {cfg.sample.export_npz}" if cfg.sample.export_npz else ""))

    return cli.run_job("sample", work, (SamplesError, ShardError, CheckpointError), cfg, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
