"""Calibrate an EB-Cache schedule (the paper's Algorithm 1): `python -m jobs.calibrate --config NAME [options] key=value ...`.

    python -m jobs.calibrate --config dit_xl2_256 --tolerance 0.05 model.checkpoint=DiT-XL-2-256x256.pt

Writes `{storage.root}/runs/{storage.run}/eb_cache/<model>_<method>_<sampler><steps>_<criterion>_tol<t>_<hash>.json`
(the hash: of the weights, guidance, correction and precision it was calibrated with) or `--out` (a
`.json` name), which `sample.method=eb_cache` reads as its schedule. See `dydit_dist.accel.calibrate`.
"""

from __future__ import annotations

import sys

from dydit_dist import cli
from dydit_dist.accel.options import CRITERIA


def main(argv: list[str] | None = None) -> int:
    parser = cli.job_parser("calibrate", __doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=0.05, help="tolerance at the noisiest timestep")
    parser.add_argument("--tolerance-at-zero", type=float, default=0.0, help="tolerance at t = 0")
    parser.add_argument("--criterion", choices=CRITERIA, default="norm")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="table URL (default: the run folder's eb_cache/)")
    parser.add_argument("--random-init", action="store_true",
                        help="allow a model without checkpoint: random weights, with the zero-initialized "
                             "adaLN / output layers randomized too (tests and benchmarks only)")
    cfg, args = cli.parse_args(parser, argv)
    if args.num_samples < 1:
        parser.error("--num-samples must be >= 1")
    if not 0.0 <= args.tolerance_at_zero <= args.tolerance:
        parser.error(f"need 0 <= --tolerance-at-zero <= --tolerance, got {args.tolerance_at_zero} and {args.tolerance}")
    # heavy (torch, diffusers): imported once the config is known good
    from dydit_dist.models import CheckpointError
    from dydit_dist.sample.calibrate import run_calibration
    from dydit_dist.sample.plan import PromptsError

    def work() -> str:
        table, url = run_calibration(cfg, tolerance=args.tolerance, tolerance_at_zero=args.tolerance_at_zero,
                                     criterion=args.criterion, num_samples=args.num_samples, seed=args.seed,
                                     out=args.out, allow_random=args.random_init)
        return f"{url}: schedule {table['schedule']} ({table['full_steps']}/{table['num_steps']} full steps)"

    return cli.run_job("calibrate", work, (CheckpointError, PromptsError), cfg, args.dry_run,
                       allow_random=args.random_init, num_samples=args.num_samples, out=args.out)


if __name__ == "__main__":
    sys.exit(main())
