"""What every job shares: `--config NAME_OR_PATH` plus dotlist overrides and `--dry-run`, the preflight
(`dydit_dist.preflight`) before any work, the run's lease, signals, the exit status, the resolved config.

    def main(argv=None) -> int:
        cfg, args = cli.parse_args(cli.job_parser("finetune", DESCRIPTION), argv)  # exit 2 on a bad config
        ...                                                     # the job's heavy imports, after the config
        return cli.run_job("finetune", work, (DataError,), cfg, args.dry_run)

Exit status: 0 done (or nothing left to do); 2 bad input, one line `job: message` on stderr (config and
YAML errors, preflight, storage errors about a user-given URL, the errors a job names, a run held by
another job); 143 / 130 stopped by SIGTERM / SIGINT, with what was kept and how to resume (also 143: the
run's lease taken over by another job after this one did not renew it for storage.lease_ttl_s); 1 with one
line for work that failed after its retries for a reason outside its input (`JobFailed`: the training
failure budget spent); anything else is a bug: its traceback, exit 1. A config is checked before ray, deepspeed and diffusers import
(this module and `config` import none of them; the schema itself still imports torch).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable

import yaml
from omegaconf.errors import OmegaConfBaseException

from dydit_dist import config as config_lib
from dydit_dist import run_config, storage
from dydit_dist.config import Config
from dydit_dist.config_files import remote_cause
from dydit_dist.lease import Lease, LeaseHeld, acquire_for_job, held
from dydit_dist.paths import RunPaths

# What a job stopped midway leaves, and how it resumes (the signal handler prints it).
KEPT = {
    "finetune": "every finished checkpoint under {run}/checkpoints (with its EMA export); resubmit the same "
                "command (same storage.run) to resume from the latest",
    "sample": "every finished shard under {run}/samples (a shard is written whole or not at all); rerun the "
              "same command to make only the missing ones",
    "prepare": "every finished shard under {data}; rerun the same command to encode only the missing ones",
    "evaluate": "nothing new (metrics.json is written at the end); rerun the same command",
    "calibrate": "nothing new (the table is written at the end); rerun the same command",
    "reproduce": "the outputs of every finished stage and the finished checkpoints / shards of the current one "
                 "under {run}; rerun the same command to continue where it stopped",
}
USER_ERRORS = (config_lib.ConfigError, yaml.YAMLError, OmegaConfBaseException, storage.StorageError, LeaseHeld)

_lease: Lease | None = None  # the lease this process holds, released by the signal handler too


def job_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The parser every job shares: `--config NAME_OR_PATH`, `--dry-run` and dotlist overrides; add job options to it."""
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{name}", description=description)
    parser.set_defaults(job=name)
    parser.add_argument("--config", default="debug", help="preset name or YAML path (default: debug)")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve every input and print the plan, then exit: 0 when everything resolves, 2 if not")
    parser.add_argument("overrides", nargs="*", help="omegaconf dotlist overrides, e.g. train.lr=1e-4")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    """Parse with a `job_parser` (plus any options added to it) -> (validated Config, all arguments),
    with storage and logging configured; a bad config or YAML file is `job: message` and SystemExit(2)."""
    args = parser.parse_intermixed_args(argv)  # options may follow overrides: `... key=value --dry-run key=value`
    try:
        cfg = config_lib.load(args.config, args.overrides)
        storage.configure_from(cfg.storage)  # refuses a root the job's writers could not share (memory://)
    except (config_lib.ConfigError, yaml.YAMLError, OmegaConfBaseException, storage.StorageError) as err:
        print(f"{args.job}: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return cfg, args


def parse(argv: list[str] | None, name: str, description: str) -> Config:
    """`--config NAME_OR_PATH key=value ...` -> a validated Config, with storage configured."""
    return parse_args(job_parser(name, description), argv)[0]


def run_job(name: str, work: Callable[[], str | None], errors: tuple[type[Exception], ...],
            cfg: Config | None = None, dry_run: bool = False, finished: Callable[[], str | None] | None = None,
            **preflight_options) -> int:
    """A job's exit status (see the module docstring), with `work()`'s one-line summary (if any) on stdout.

    With `cfg` (every job passes it): the job's preflight first (`preflight.check(cfg, name,
    **preflight_options)`); then `finished()`, a message when there is nothing left to do (exit 0,
    nothing written), which may also refuse the run's state with an input error (nothing written
    either; a resume with changed settings) — `dry_run` stops after both, so that a dry run refuses
    what the job would; then the run's lease (`dydit_dist.lease`), held while `work` runs. `errors` are
    the job's own bad-input errors (exit 2); any other exception is a bug."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    install_signal_handlers(name, cfg)
    # preflight resolves checkpoints and data with torch, ray and deepspeed: imported once the config is known good
    from dydit_dist.preflight import PreflightError, check

    global _lease
    try:
        if cfg is not None:
            check(cfg, name, **preflight_options)
            if finished is not None and (message := finished()):
                print(f"{name}: {message}; nothing to do")
                return 0
            if dry_run:
                return 0
            _lease = acquire_for_job(_lease_url(cfg, name), name, cfg.storage)
        summary = work()
    except (PreflightError, *USER_ERRORS, *errors) as err:
        # the preflight's message lists every unresolved input, one per line
        print(f"{name}: {err if isinstance(err, PreflightError) else _one_line(err)}", file=sys.stderr)
        return 2
    except config_lib.JobFailed as err:
        print(f"{name}: {_one_line(err)}", file=sys.stderr)
        return 1
    finally:
        if _lease is not None:
            try:
                _lease.release()
            except OSError as err:  # the job's outcome stands; the lease expires on its own
                print(f"{name}: could not release the lease {_lease.url} ({_one_line(err)}); it expires "
                      f"{_lease.holder.ttl_s:g} s after its last renewal", file=sys.stderr, flush=True)
            _lease = None
        for sig, handler in previous.items():  # a caller that goes on (a test, a notebook) gets its own back
            signal.signal(sig, handler)
    if summary is not None:
        print(summary)
    return 0


def save_resolved_config(cfg: Config, job: str) -> str:
    """Write the resolved config into the run folder (`run_config.save`: history kept); returns its URL."""
    return run_config.save(cfg, job)


def connect_ray(cfg: Config, job: str) -> None:
    """Start or join Ray (`ray.address`) with this job's SIGTERM / SIGINT handlers in force afterwards."""
    from dydit_dist.capacity import connect_ray  # heavy (torch, ray): after the config is checked

    connect_ray(cfg.ray.address)
    install_signal_handlers(job, cfg)


def install_signal_handlers(job: str, cfg: Config | None) -> None:
    """SIGTERM / SIGINT: print what was kept and how to resume, release the lease, exit 143 / 130.

    The process ends with `os._exit`: nothing half-written can follow (objects are written whole), and
    Ray's own shutdown path is what turned a SIGTERM into rc 134. Ray's processes started by this driver
    are stopped first (`stop_own_ray`), and the actors it owns end with it. Ray Train's `fit` installs its own SIGINT handler (a graceful
    abort) while it runs; SIGTERM stays here."""
    paths = RunPaths(cfg) if cfg is not None else None
    kept = KEPT.get(job, "every object written so far (each whole); rerun the same command")
    if paths is not None:
        kept = kept.format(run=paths.url, data=paths.data)

    def stop(signum, frame) -> None:
        name = signal.Signals(signum).name
        print(f"{job}: stopped by {name}; kept: {kept}", file=sys.stderr, flush=True)
        for lease in held():  # the job's own, and those of the folders its stages write (jobs.reproduce)
            try:
                lease.release()
            except OSError as err:
                print(f"{job}: could not release the lease {lease.url} ({err}); it expires after "
                      f"{lease.holder.ttl_s:g} s", file=sys.stderr, flush=True)
        stop_own_ray()
        sys.stdout.flush()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def stop_own_ray() -> None:
    """Stop the Ray processes this driver started (a local instance, `ray.address` unset), raylet first so that
    it ends its workers and agents: left to `os._exit`, the driver took its raylet down abruptly and Ray's
    dashboard agent outlived it (an orphan per stopped job). A cluster the driver joined is left alone (this
    process started none of its processes)."""
    worker = sys.modules.get("ray._private.worker")
    node = getattr(worker, "_global_node", None)
    if node is None or not getattr(node, "all_processes", None):
        return
    try:
        node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
    except Exception as err:  # noqa: BLE001 - stopping anyway: say so, exit with the signal's status
        print(f"could not stop the local Ray instance ({type(err).__name__}: {err})", file=sys.stderr, flush=True)


def _lease_url(cfg: Config, job: str) -> str:
    """prepare writes the data folder; every other job the run folder."""
    paths = RunPaths(cfg)
    return paths.data_lease if job == "prepare" else paths.lease


def _one_line(err: BaseException) -> str:
    """The error's message on one line (an error raised in a Ray task or actor: its own message, without the
    remote traceback, `remote_cause`)."""
    return " ".join(str(remote_cause(err)).split())
