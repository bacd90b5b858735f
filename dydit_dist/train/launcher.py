"""Driver side of fine-tuning: pre-flight checks, then a Ray Train `TorchTrainer` built from the config.

    preflight(cfg)                                   # config + data: fails before Ray is contacted
    preflight_cluster(cfg)                           # waits for the workers' capacity (`capacity.acquire`)
    result = fit(build_trainer(cfg))                 # a bad input in a worker: InputFailure, not retried

Failures: Ray Train restarts the worker group (from the latest checkpoint) up to ray.max_failures
times. That is right for a lost node or a failed upload, and wrong for an input a restart reads
again: a corrupt shard, a checkpoint of another model, a config a worker refuses (`NOT_RETRIED`).
`StopOnInputError`, a callback in Ray Train's controller, sees the workers' exceptions as the
controller collects them and raises on those, which the controller does not retry (it retries worker
failures and its own start-up failures only); `fit` turns that into `InputFailure` naming the rank
and the input, which `jobs.finetune` prints as one line with exit status 2.

Storage: Ray Train's run folder is `{storage.root}/runs/{storage.run}/checkpoints` (storage_path =
the run folder, name = "checkpoints"), so the resumable checkpoints `step-{step:07d}/`, Ray's own
snapshot and the exported EMA weights sit side by side. A second submission with the same
`storage.run` finds Ray's snapshot there and resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import signal
import threading
from collections.abc import Callable

import pyarrow.fs
from ray.train import UserCallback

from dydit_dist import run_config, storage
from dydit_dist.capacity import CapacityError, Need, acquire
from dydit_dist.config import Config, ConfigError, JobFailed
from dydit_dist.data import ManifestError, verify_manifest
from dydit_dist.faults import device_failure
from dydit_dist.network import latest_ema
from dydit_dist.paths import CHECKPOINTS, RunPaths
from dydit_dist.train.checkpoints import has_checkpoint
from dydit_dist.train.deepspeed_setup import check_deepspeed, grad_accumulation
from dydit_dist.train.metrics import progress_line
from dydit_dist.train.worker import NOT_RETRIED, train_loop_per_worker

log = logging.getLogger(__name__)


def preflight(cfg):
    """Config and data checks, before Ray is even contacted; ConfigError / ManifestError with the numbers.
    Returns the data's manifest."""
    r, m = cfg.ray, cfg.model
    # 1. Batch arithmetic and DeepSpeed options
    grad_accumulation(cfg, r.num_workers)
    check_deepspeed(cfg)
    if m.method not in ("static", "dydit", "flexdit"):
        raise ConfigError(f"model.method={m.method!r} cannot be fine-tuned by this job; use 'static', 'dydit' or 'flexdit'")
    paths = RunPaths(cfg)
    if paths.url.startswith("memory://"):
        raise ConfigError(f"storage.root={cfg.storage.root!r}: Ray workers are separate processes; use a folder or s3://")
    # 2. The data
    manifest = verify_manifest(paths.data, m, cfg.data)
    consumers = r.num_workers * max(1, cfg.data.num_workers)
    if manifest.num_samples < consumers:
        raise ManifestError(f"{paths.data} has {manifest.num_samples} samples, fewer than ray.num_workers x "
                          f"data.num_workers = {r.num_workers} x {max(1, cfg.data.num_workers)} = {consumers}")
    return manifest


def check_settings(cfg) -> list[str]:
    """A run that resumes from a checkpoint keeps what decides its weights (`run_config.WEIGHTS`: the model
    and its method's options, the diffusion, the training recipe, the data) as its last config had them,
    train.max_steps and train.init_from aside: ConfigError listing each change `key: old -> new`, unless
    train.allow_changed_settings=true, which applies them (the optimizer's lr, weight decay and eps too, `checkpoints.apply_optimizer_settings`)
    and logs them; the changed config becomes the run's next config-history entry. Returns the changes."""
    paths = RunPaths(cfg)
    if not has_checkpoint(paths.checkpoints):
        return []  # nothing to resume: the settings are free
    changes = run_config.weights_changes(run_config.previous(cfg, "finetune"), cfg,
                                         ignore=("train.max_steps", "train.init_from"))
    if changes and not cfg.train.allow_changed_settings:
        raise ConfigError(f"{paths.url} resumes from a checkpoint made with other settings ({'; '.join(changes)}); "
                          "rerun with train.allow_changed_settings=true to apply them from the checkpoint on "
                          "(a change of the network's tensors cannot resume: model.name, image_size, method, "
                          "learn_sigma, num_classes, ...), or use a new storage.run (with train.init_from set to "
                          "this run to start from its EMA weights)")
    if changes:
        log.warning("%s: resuming with changed settings (train.allow_changed_settings=true): %s", paths.url,
                    "; ".join(changes))
    return changes


def worker_needs(cfg) -> list[Need]:
    """The training workers as the config sizes them: `ray.num_workers` x (CPUs, GPUs when ray.use_gpu)."""
    r = cfg.ray
    keys = "ray.num_workers, ray.cpus_per_worker" + (", ray.gpus_per_worker" if r.use_gpu else "")
    return [Need("training workers", r.num_workers, r.cpus_per_worker, r.gpus_per_worker if r.use_gpu else 0.0,
                 keys)]


def preflight_cluster(cfg) -> None:
    """Wait (at most ray.capacity_timeout_s) until the cluster can place the workers (`capacity.acquire`),
    or CapacityError naming the resource (the cluster's size when the job starts says nothing about what
    the autoscaler will bring)."""
    acquire(worker_needs(cfg), cfg.ray.use_gpu, cfg.ray.capacity_timeout_s)


def latest_ema_url(cfg) -> str:
    """Where the newest exported EMA weights of this run are."""
    return latest_ema(RunPaths(cfg).url)


def ray_storage(url: str):
    """(storage_path, storage_filesystem) for Ray Train: a local path, or an s3 path with a pyarrow
    filesystem wrapping an fsspec client like `storage`'s (endpoint, credentials) whose requests botocore
    retries (`storage.retrying_filesystem`): Ray's downloads and run snapshot do not go through `storage`.
    Checkpoints are uploaded through `storage` instead (`ray_session.upload_checkpoint`)."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    fs, path = storage.retrying_filesystem(url)
    if protocol == "file":  # Ray rewrites its run snapshot in place: a full disk cut it (`checkpoints.has_checkpoint`)
        return path, pyarrow.fs.PyFileSystem(_ReplacingLocalHandler(fs))
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


class _ReplacingLocalHandler(pyarrow.fs.FSSpecHandler):
    """A local file system for Ray Train whose written files appear whole or not at all: an output stream is
    kept in memory (Ray writes only its small run snapshot and markers here; checkpoints go through
    `storage`) and written on close with `storage.write_bytes`, a temporary file renamed over the target."""

    def open_output_stream(self, path, metadata):
        from pyarrow import PythonFile

        return PythonFile(_WrittenOnClose(path), mode="w")


class _WrittenOnClose(io.BytesIO):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()
            storage.write_bytes(self.path, data)


def worker_start_retries(capacity_timeout_s: float) -> int:
    """How often Ray Train may restart a worker group that did not start (each try waits
    `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`, 60 s by default): about `ray.capacity_timeout_s` in all.
    Its default is forever, and a lost node whose GPUs never come back would hold the job and its lease."""
    start_s = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0))
    return max(1, math.ceil(capacity_timeout_s / start_s))


def build_trainer(cfg, wrap_session: Callable | None = None):
    """A `TorchTrainer` running `train_loop_per_worker` on `ray.num_workers` workers.

    wrap_session: session -> session, applied in every worker (tests: `ray_session.FaultySession`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer


    # Ray Train moves each worker into a working folder of its own by default: a relative model.checkpoint,
    # train.init_from, data.uri or storage.root, which the driver's preflight found, would then be looked for
    # there. The workers stay where the job runs, like the sampling actors and the prepare tasks.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    r = cfg.ray
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {})}
    path, filesystem = ray_storage(RunPaths(cfg).url)
    env = {} if r.use_gpu else {"DS_ACCELERATOR": "cpu"}
    run_config = RunConfig(
        name=CHECKPOINTS, storage_path=path, storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=r.max_failures, max_preemption_failures=r.max_preemptions,
                                     controller_failure_limit=worker_start_retries(r.capacity_timeout_s)),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        worker_runtime_env={"env_vars": env} if env else None,
        callbacks=[ProgressCallback(cfg.train.max_steps), StopOnInputError(oom_advice(cfg))],
    )
    loop = train_loop_per_worker if wrap_session is None else functools.partial(train_loop_per_worker,
                                                                                 wrap_session=wrap_session)
    return TorchTrainer(
        loop, train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources),
        run_config=run_config, torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo",
                                                        timeout_s=math.ceil(r.collective_timeout_s)),
    )


class ProgressCallback(UserCallback):
    """A progress line per report, printed by Ray Train's controller (its output reaches the driver)."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and "step" in metrics[0]:
            saved = f" | checkpoint {checkpoint.path}" if checkpoint is not None else ""
            print(f"[finetune] {progress_line(metrics[0], self.max_steps)}{saved}", flush=True)


class InputFailure(ValueError):
    """Workers stopped on an input error (`NOT_RETRIED`): {world rank: the worker's exception}; `why` it is not
    retried."""

    def __init__(self, errors: dict[int, Exception], why: str = "a restart would read the same input"):
        self.errors, self.why = errors, why
        rank, first = min(errors.items())
        others = f" (and {len(errors) - 1} more ranks)" if len(errors) > 1 else ""
        super().__init__(f"training worker {rank}{others}: {type(first).__name__}: {first}; not retried, {why}")

    def __reduce__(self):
        return (type(self), (self.errors, self.why))


class DeviceOutOfMemory(ConfigError):
    """A training worker ran out of GPU memory again after a restart: the config does not fit the GPU."""


class StopOnInputError(UserCallback):
    """Ends the run, without Ray Train's retries, when a worker failed on an input error, or ran out of GPU
    memory again before the run got past the step where it did so the last time (the first may be
    fragmentation, which a restart from the checkpoint clears; the second is the config: `advice` names
    the keys that size a step).

    Runs in Ray Train's controller after each poll of the workers that found errors: raising here is a
    controller error of a kind the controller's failure policy does not retry, so the run ends and
    `fit()` raises it."""

    def __init__(self, advice: str = ""):
        self.advice = advice
        self.step = -1  # the last step reported
        self.out_of_memory_after: int | None = None  # the last step reported before the last OOM

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and "step" in metrics[0]:
            self.step = int(metrics[0]["step"])

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]):
        errors = {rank: e for rank, e in worker_exceptions.items() if isinstance(e, NOT_RETRIED)}
        if errors:
            quiet_input_failure_tracebacks()
            raise InputFailure(errors)
        oom = {rank: e for rank, e in worker_exceptions.items() if device_failure(e) == "oom"}
        if oom:
            if self.out_of_memory_after is not None and self.step <= self.out_of_memory_after:
                quiet_input_failure_tracebacks()
                raise InputFailure({rank: DeviceOutOfMemory(f"{str(e).strip().splitlines()[0]}; {self.advice}")
                                    for rank, e in oom.items()},
                                   why=f"out of GPU memory again before the run got past step "
                                       f"{self.out_of_memory_after}, after which it ran out the time before (a restart "
                                       "meets it again)")
            self.out_of_memory_after = self.step


def oom_advice(cfg: Config) -> str:
    """What to change when a training step does not fit the GPU."""
    t, zero = cfg.train, cfg.deepspeed.zero_stage
    return (f"train.micro_batch_size={t.micro_batch_size} does not fit; lower it with the same "
            f"train.global_batch_size={t.global_batch_size} (more accumulation steps; a new storage.run: the data "
            "order depends on it)" + (f", or shard more state (deepspeed.zero_stage={zero} -> 3)" if zero < 3 else ""))


class _NoInputFailureTraceback(logging.Filter):
    """Drops the traceback from a log record about an `InputFailure` (also wrapped in Ray Train's
    ControllerError): its message is the worker's error, its frames are Ray Train's controller loop."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if isinstance(getattr(err, "controller_failure", err), InputFailure):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_input_failure_tracebacks() -> None:
    """In Ray Train's controller, before it logs an `InputFailure` twice with ~25 lines of its own frames
    each (forwarded to the driver above the job's one-line message): the records keep their message only.
    A filter on every handler of the root and `ray` loggers, added once."""
    loggers = [logging.getLogger()] + [logger for name, logger in logging.Logger.manager.loggerDict.items()
                                       if isinstance(logger, logging.Logger) and name.split(".")[0] == "ray"]
    for handler in {h for logger in loggers for h in logger.handlers}:
        if not any(isinstance(f, _NoInputFailureTraceback) for f in handler.filters):
            handler.addFilter(_NoInputFailureTraceback())


class TrainingFailed(JobFailed):
    """Ray Train gave up on the run: its failure budget is spent (the message names the last errors)."""


@contextlib.contextmanager
def _own_sigint():
    """The process's SIGINT handler as it was before `trainer.fit()`: Ray Train installs its own (aborting
    the run's controller) and never removes it, so after the run its closure kept the finished controller
    actor alive, and the job's handler (lease release, exit 130) was gone. A controller released only when a
    later job replaced that handler died while the next run's controller was starting, and that run was
    seen to wait forever for its controller (the start notice lost); the handler restored, the controller
    ends with its own run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler not installed from Python, which Python cannot restore
            signal.signal(signal.SIGINT, previous)


def fit(trainer, capacity_timeout_s: float | None = None):
    """`trainer.fit()`, with an input error in a worker raised as `InputFailure` (one line, no retry), and
    workers that never started again within `ray.capacity_timeout_s` as `CapacityError`."""
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    with _own_sigint():
        try:
            return trainer.fit()
        except ControllerError as err:
            if isinstance(err.controller_failure, InputFailure):
                raise err.controller_failure from None
            if isinstance(err.controller_failure, WorkerGroupStartupTimeoutError) and capacity_timeout_s is not None:
                tries = worker_start_retries(capacity_timeout_s)
                raise CapacityError(f"the training workers ({err.controller_failure.num_workers}) did not start: the "
                                    f"run's {tries} start attempts (about ray.capacity_timeout_s={capacity_timeout_s:g} s, "
                                    "counted over the whole run by Ray) are spent (a node lost, or its GPUs taken by "
                                    "another job); rerun to resume from the last checkpoint") from None
            raise
        except WorkerGroupError as err:  # the failure budget spent: one line naming it, not Ray's traceback
            causes = {type(e).__name__: str(e).splitlines()[0] if str(e) else "" for e in err.worker_failures.values()}
            died = any(name == "ActorDiedError" or "health check" in text for name, text in causes.items())
            raise TrainingFailed(f"training stopped: the workers failed more than ray.max_failures times (preemptions "
                                 f"count apart, ray.max_preemptions); the last: "
                                 f"{'; '.join(f'{k}: {v}' for k, v in causes.items()) or err}"
                                 + ("; a worker process died or stopped answering (a collective hung past "
                                    "ray.collective_timeout_s, a GPU fault, the host out of memory: the worker's log in "
                                    "the Ray dashboard says which)" if died else "")
                                 + "; a rerun resumes from the last committed checkpoint") from err
