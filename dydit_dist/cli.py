"""What every job shares: `--config NAME_OR_PATH` plus dotlist overrides and `--dry-run`, the preflight
(`dydit_dist.preflight`) before any work, the exit status, the resolved config."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from dydit_dist import config as config_lib
from dydit_dist import storage
from dydit_dist.config import Config
from dydit_dist.paths import RunPaths
from dydit_dist.preflight import PreflightError, check


def job_parser(description: str) -> argparse.ArgumentParser:
    """The parser every job shares: `--config NAME_OR_PATH`, `--dry-run` and dotlist overrides; add job options to it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="debug", help="preset name or YAML path (default: debug)")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve every input and print the plan, then exit: 0 when everything resolves, 2 if not")
    parser.add_argument("overrides", nargs="*", help="omegaconf dotlist overrides, e.g. train.lr=1e-4")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    """Parse with a `job_parser` (plus any options added to it) -> (validated Config, all arguments),
    with storage and logging configured."""
    args = parser.parse_args(argv)
    try:
        cfg = config_lib.load(args.config, args.overrides)
    except config_lib.ConfigError as err:
        parser.error(str(err))
    storage.configure_from(cfg.storage)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return cfg, args


def parse(argv: list[str] | None, description: str) -> Config:
    """`--config NAME_OR_PATH key=value ...` -> a validated Config, with storage configured."""
    return parse_args(job_parser(description), argv)[0]


def run_job(name: str, work: Callable[[], str | None], errors: tuple[type[Exception], ...],
            cfg: Config | None = None, dry_run: bool = False, **preflight_options) -> int:
    """A job's exit status: 0, with `work()`'s one-line summary (if any) on stdout; or 2, with
    `name: message` on stderr, for the bad-input errors the job names (anything else is a bug and raises).

    With `cfg` (every job passes it), the job's preflight runs first (`preflight.check(cfg, name,
    **preflight_options)`): it prints the plan, and any unresolved input is a PreflightError (2) before
    `work` starts; `dry_run` stops there."""
    try:
        if cfg is not None:
            check(cfg, name, **preflight_options)
        if dry_run:
            return 0
        summary = work()
    except (PreflightError, *errors) as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    if summary is not None:
        print(summary)
    return 0


def save_resolved_config(cfg: Config, job: str) -> str:
    """Write the resolved config next to the job's outputs; returns its URL."""
    url = RunPaths(cfg).config(job)
    config_lib.save(cfg, url)
    return url
