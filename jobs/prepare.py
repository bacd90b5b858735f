"""Encode images (and captions) into latent shards: `python -m jobs.prepare --config NAME key=value ...`.

    python -m jobs.prepare --config dit_xl2_256 data.source=/datasets/imagenet/train \
        data.uri=s3://bucket/imagenet-256-latents
"""

from __future__ import annotations

import sys

from dydit_dist import cli

DESCRIPTION = "Encode images (and captions) into VAE-latent (and T5) WebDataset shards"


def main(argv: list[str] | None = None) -> int:
    cfg, args = cli.parse_args(cli.job_parser("prepare", DESCRIPTION), argv)
    # heavy (torch, ray, diffusers): imported once the config is known good
    from dydit_dist.data import DataError, prepare
    from dydit_dist.shardset import ShardError

    def work() -> str:
        result = prepare(cfg)
        manifest = result.manifest
        return (f"{result.uri}: {manifest.num_samples} samples in {manifest.num_shards} shards ({result.encoded} "
                f"encoded now, {result.skipped} already done, {manifest.bad_inputs} unreadable inputs)")

    return cli.run_job("prepare", work, (DataError, ShardError), cfg, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
