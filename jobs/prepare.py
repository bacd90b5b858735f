"""Encode images (and captions) into latent shards: `python -m jobs.prepare --config NAME key=value ...`.

    python -m jobs.prepare --config dit_xl2_256 data.source=/datasets/imagenet/train \
        data.uri=s3://bucket/imagenet-256-latents
"""

from __future__ import annotations

import sys

from dydit_dist import cli
from dydit_dist.data import DataError, prepare


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse(argv, "Encode images (and captions) into VAE-latent (and T5) WebDataset shards")
    try:
        result = prepare(cfg)
    except DataError as err:
        print(f"prepare: {err}", file=sys.stderr)
        return 2
    manifest = result.manifest
    print(f"{result.uri}: {manifest.num_samples} samples in {manifest.num_shards} shards "
          f"({result.encoded} encoded now, {result.skipped} already done, {manifest.bad_inputs} unreadable inputs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
