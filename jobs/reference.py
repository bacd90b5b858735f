"""Reference of a text-to-image evaluation: `python -m jobs.reference --config NAME key=value ...`.

    python -m jobs.reference --config pixart_xl2_256 storage.root=s3://bucket \
        data.source=s3://bucket/coco/val2014-30k.csv eval.reference=s3://bucket/refs/coco30k-256.npz \
        sample.prompts=s3://bucket/refs/coco30k.txt eval.inception_weights=/weights/pt_inception.pth

Writes eval.reference (the real images at model.image_size with their captions and FID / sFID
statistics, in the ADM evaluator's format) and sample.prompts (the same captions, one per line), which
the sample job draws from and `eval.protocol=coco` evaluates against (`dydit_dist.eval.captions`).
"""

from __future__ import annotations

import sys

from dydit_dist import cli

DESCRIPTION = "Real images + captions -> an ADM-format reference batch with statistics, and the captions file"


def main(argv: list[str] | None = None) -> int:
    cfg, args = cli.parse_args(cli.job_parser("reference", DESCRIPTION), argv)
    # heavy (torch, torch-fidelity): imported once the config is known good
    from dydit_dist.data import DataError
    from dydit_dist.eval import EvalInputError, FeatureExtractorUnavailable
    from dydit_dist.eval.captions import prepare_caption_reference

    def work() -> str:
        made = prepare_caption_reference(cfg)
        return (f"{made['reference']}: {made['num_images']} images with captions and {made['feature_extractor']} "
                f"statistics; captions at {made['prompts']}")

    return cli.run_job("reference", work, (DataError, EvalInputError, FeatureExtractorUnavailable), cfg, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
