"""Resumable checkpoints (DeepSpeed state + trainer state) and the exported EMA weights.

A checkpoint is a folder that every rank writes its own part of, then reports to Ray Train, which
merges the parts into `{run}/checkpoints/step-{step:07d}/`:

    deepspeed/...               DeepSpeed's files: model, ZeRO optimizer partitions, LR scheduler
    trainer/rank-{r:05d}.pt     TrainerState of rank r: step, data position, RNG, EMA slice
    meta.json                   step, world size, ZeRO stage, precision, tensor shapes (rank 0)

The EMA weights are exported next to them, once per checkpoint, for the sampling job:

    {run}/checkpoints/ema-{step:07d}.safetensors    fp32, keys of `build_network(cfg.model)`
    {run}/checkpoints/ema-latest.json               {"step", "file", "url", "model": cfg.model}

Neither stops training for its upload (`train.async_checkpoint`): the DeepSpeed state is written to a
local folder and the session uploads it in the background (a checkpoint is committed, and resumable,
only once every rank's part is uploaded: `ray_session`); the EMA is gathered into host memory and
written by a `Background` thread. The newest `train.keep_checkpoints` of each are kept.

The pointer names an export only once that step's checkpoint is committed (`publish_ema`, at the next
checkpoint or the end of the run; so with train.async_checkpoint it is up to one train.checkpoint_every
behind while training runs): an export written by an attempt that was lost before its commit is never
named, and the resumed run writes that step's file again, from the same state, before naming it.
A worker can die after its checkpoint is committed but before the pointer names its export: the
resumed run exports it (`exported_step` is behind the checkpoint's step).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from dydit_dist import storage
from dydit_dist.faults import device_failure, process_alive
from dydit_dist.models import CheckpointError
from dydit_dist.network import read_ema_pointer, save_weights
from dydit_dist.paths import EMA_POINTER, RunPaths
from dydit_dist.train.state import TrainerState

log = logging.getLogger(__name__)

DS_TAG = "deepspeed"
EMA_NAME = re.compile(r"ema-(\d{7})\.safetensors$")
STEP_NAME = re.compile(r"step-\d{7}")  # `checkpoint_name`
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of committed checkpoints (ray is optional here)


def due(step: int, train_cfg) -> bool:
    """A checkpoint is written every `train.checkpoint_every` steps and at the last step."""
    return step % train_cfg.checkpoint_every == 0 or step == train_cfg.max_steps


STAGING_PREFIX = "dydit-ckpt-"  # + "{host}-{pid}-": a rank's local checkpoint folder until the session uploads it


def staging_folder() -> str:
    """A new local folder for this rank's part of a checkpoint, named after this host and process (see
    `remove_stale_staging`); the session deletes it once uploaded."""
    return tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-")


def remove_stale_staging() -> list[str]:
    """Remove this host's and this user's staging folders whose process no longer runs (a worker killed before
    its upload ended: a preemption, a restart after a lost node): each holds a rank's DeepSpeed state, GBs,
    and restarts of a multi-day run would fill the node's disk. Folders of live processes (another job's
    too), of other hosts (a temp folder shared between nodes) and of other users stay. Returns those removed."""
    removed, temp = [], tempfile.gettempdir()
    mine = re.compile(rf"{re.escape(STAGING_PREFIX + socket.gethostname())}-(\d+)-.+")
    for name in os.listdir(temp):
        path, found = os.path.join(temp, name), mine.fullmatch(name)
        with contextlib.suppress(OSError):  # gone meanwhile: its process cleaned up
            if found and os.stat(path).st_uid == os.getuid() and not process_alive(int(found.group(1))):
                shutil.rmtree(path)
                removed.append(path)
    if removed:
        log.info("removed %d checkpoint staging folders of processes that ended before uploading them",
                 len(removed))
    return removed


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def save(engine, state: TrainerState, directory: str, cfg, rank: int, world_size: int) -> None:
    """Write this rank's part of the checkpoint of `state.step` into a local `directory` (collective)."""
    engine.save_checkpoint(directory, tag=DS_TAG, save_latest=False)
    os.makedirs(os.path.join(directory, "trainer"), exist_ok=True)
    state.save(os.path.join(directory, "trainer", f"rank-{rank:05d}.pt"))
    if (scaler := grad_scaler(engine)) is not None:  # DeepSpeed's own checkpoint leaves it out
        torch.save(scaler.state_dict(), os.path.join(directory, "trainer", f"grad-scaler-{rank:05d}.pt"))
    if rank == 0:
        meta = {"step": state.step, "world_size": world_size, "zero_stage": cfg.deepspeed.zero_stage,
                "precision": cfg.train.precision, "shapes": tensor_shapes(engine.module)}
        with open(os.path.join(directory, "meta.json"), "w") as f:
            json.dump(meta, f)


STAGING_LOW_BYTES = 256 * 2**20  # free space under which a failed staging write is taken for a full disk
# how torch's zip writer reports a write that failed (measured on a full tmpfs: "[enforce fail at
# inline_container.cc:672] . unexpected pos 576 vs 534"), or a file it could not write
_WRITE_FAILED = ("inline_container", "unexpected pos", "PytorchStreamWriter failed", "No space left")


def staging_failed(folder: str, err: BaseException) -> BaseException:
    """The error to raise for `save` failing into the staging `folder`, which is removed (nothing half
    written stays on the node). A full disk is an OSError(ENOSPC) naming the folder, the free space and
    TMPDIR: torch says only "[enforce fail at inline_container.cc] unexpected pos ..." and DeepSpeed
    nothing better. Any other error is returned as it is."""
    free = shutil.disk_usage(os.path.dirname(folder)).free
    shutil.rmtree(folder, ignore_errors=True)
    if isinstance(err, OSError):
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    else:  # a write torch or DeepSpeed report in their own words, on a disk nearly full (a device error stays one)
        full = free < STAGING_LOW_BYTES and device_failure(err) is None and any(
            words in str(err) for words in _WRITE_FAILED)
    if not full:
        return err
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return OSError(errno.ENOSPC, f"staging this rank's part of a checkpoint in {folder} failed ({first}): "
                                 f"{free / 2**20:.0f} MiB free in {os.path.dirname(folder)}; set TMPDIR on the "
                                 "workers to a local disk with room for a rank's DeepSpeed state")


OTHER_NETWORK = "Error(s) in loading state_dict"  # torch's strict load: keys or shapes other than the network's


def tensor_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """Every parameter's and buffer's shape (a ZeRO-3 partitioned parameter's whole shape)."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return {name: list(getattr(t, "ds_shape", t.shape)) for name, t in tensors}


def shape_differences(saved: dict[str, list[int]], now: dict[str, list[int]]) -> str:
    """'' when the two networks' tensors agree; else the first differences, `name [saved] -> [now]`."""
    changed = [f"{k} {saved[k]} -> {now[k]}" for k in saved if k in now and saved[k] != now[k]]
    changed += [f"{k} {saved[k]} -> none" for k in saved if k not in now]
    changed += [f"{k} none -> {now[k]}" for k in now if k not in saved]
    return "; ".join(changed[:3]) + (f"; ... ({len(changed)} in all)" if len(changed) > 3 else "")


def other_network(where: str, differences: str) -> CheckpointError:
    """A resume whose model settings make another network (`train.allow_changed_settings` let the change
    through): every restart would fail to load it."""
    return CheckpointError(f"checkpoint {where} holds another network than this run's model settings make "
                           f"({differences[:300]}): a resume keeps the network's tensors (train.allow_changed_settings "
                           "applies only changes that keep them); resume with the model settings the run was written "
                           "with, or start a new storage.run with train.init_from set to this run (its EMA weights)")


def load(engine, state: TrainerState, directory: str, cfg, rank: int, world_size: int) -> None:
    """Restore DeepSpeed (model, optimizer, LR schedule) and the trainer state from a checkpoint folder."""
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    now = {"world_size": world_size, "zero_stage": cfg.deepspeed.zero_stage}
    changed = [f"{k}: checkpoint {meta[k]}, now {v}" for k, v in now.items() if meta[k] != v]
    if changed:
        raise CheckpointError(f"checkpoint {directory} cannot be resumed by this run ({'; '.join(changed)}): keep "
                         f"ray.num_workers={meta['world_size']} and deepspeed.zero_stage={meta['zero_stage']}, "
                         "or start a new storage.run with train.init_from set to this run")
    where = storage.join(RunPaths(cfg).checkpoints, checkpoint_name(meta["step"]))
    if "shapes" in meta and (differences := shape_differences(meta["shapes"], tensor_shapes(engine.module))):
        raise other_network(where, differences)
    try:
        path, _ = engine.load_checkpoint(directory, tag=DS_TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{directory}/{DS_TAG}: no DeepSpeed checkpoint to resume from")
        state.load(os.path.join(directory, "trainer", f"rank-{rank:05d}.pt"))
        _load_grad_scaler(engine, os.path.join(directory, "trainer", f"grad-scaler-{rank:05d}.pt"))
    except Exception as err:  # a file of the committed checkpoint went bad: every restart would meet it again
        if isinstance(err, RuntimeError) and str(err).startswith(OTHER_NETWORK):  # a checkpoint without shapes
            raise other_network(where, "; ".join(line.strip() for line in str(err).splitlines()[1:4])) from None
        bad = unreadable_files(directory)
        if not bad:
            raise  # not the files (a lost peer in a collective, say): retried like any other failure
        cause = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise CheckpointError(f"checkpoint {where} is unreadable: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} "
                              f"not a whole torch file ({cause[:200]}); a restart would read the same bytes: to "
                              "resume from the checkpoint before it, remove the folder and its entries in "
                              f"{storage.join(RunPaths(cfg).checkpoints, RAY_SNAPSHOT)} "
                              "(checkpoint_results, latest_checkpoint_result: Ray refuses a snapshot naming a "
                              "missing folder), or start a new storage.run with train.init_from set to an "
                              "earlier EMA export") from None
    if state.step != meta["step"]:
        raise CheckpointError(f"checkpoint {directory}: trainer state at step {state.step}, meta.json says {meta['step']}")
    apply_optimizer_settings(engine, cfg.train)


def grad_scaler(engine) -> torch.amp.GradScaler | None:
    """The loss scaler of fp16 training under DeepSpeed's torch_autocast (ZeRO 0: the engine's; 1-3: the
    optimizer's); None for fp32 and bf16."""
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    return scaler if scaler is not None else getattr(engine.optimizer, "torch_autocast_gradscaler", None)


def _load_grad_scaler(engine, path: str) -> None:
    """Restore the fp16 loss scale and its growth counter: without them a resume starts again at 2^16 and
    skips other steps for overflow than the run it continues."""
    scaler = grad_scaler(engine)
    if scaler is None:
        return
    if not os.path.exists(path):
        log.warning("%s: no fp16 loss-scaler state (a checkpoint of another precision, or of an earlier version); "
                    "the loss scale starts again", path)
        return
    scaler.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def unreadable_files(directory: str) -> list[str]:
    """The torch files under `directory` (relative paths) that are not whole: not a zip archive (truncated)
    or a member whose CRC-32 does not match (bytes changed). Reads every byte: for errors only."""
    bad = []
    for folder, _, names in sorted(os.walk(directory)):
        for name in sorted(n for n in names if n.endswith(".pt")):
            path = os.path.join(folder, name)
            try:
                with zipfile.ZipFile(path) as archive:
                    whole = archive.testzip() is None
            except (zipfile.BadZipFile, OSError, EOFError):
                whole = False
            if not whole:
                bad.append(os.path.relpath(path, directory))
    return bad


def apply_optimizer_settings(engine, train_cfg) -> None:
    """Make the config's optimizer settings those of every param group after a checkpoint restored the old
    ones with the optimizer and its schedule (torch's `load_state_dict` takes each group's settings from
    the checkpoint; a resume with train.allow_changed_settings=true; a no-op when they agree): weight_decay,
    eps, and `scaled_lr` as the base learning rate, keeping the schedule's factor at the restored step (each
    group's lr is rescaled by lr / old base); and the gradient clip, which ZeRO-1/2 restore from the
    checkpoint into their optimizer (`clip_grad`) whatever the engine was configured with."""
    lr = train_cfg.scaled_lr
    scheduler = engine.lr_scheduler
    groups = (scheduler.optimizer if scheduler is not None else engine.optimizer).param_groups
    bases = scheduler.base_lrs if scheduler is not None else [g["lr"] for g in groups]
    for group, base in zip(groups, bases, strict=True):
        group["lr"] = group["lr"] * lr / base if base else lr
        group["initial_lr"] = lr
        group["weight_decay"], group["eps"] = train_cfg.weight_decay, train_cfg.adam_eps
    if scheduler is not None:
        scheduler.base_lrs = [lr] * len(groups)
        scheduler._last_lr = [g["lr"] for g in groups]
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = train_cfg.grad_clip or 0.0  # DeepSpeed: 0 = no clipping


def gather_ema(state: TrainerState, network: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full EMA weights and the network's buffers as a host copy on rank 0 (collective; None elsewhere):
    what `write_ema` writes while training goes on."""
    weights = state.ema.gather(dst=0)
    if weights is None:
        return None
    keys = network.state_dict(keep_vars=True).keys()
    buffers = {name: b.detach().to("cpu", copy=True) for name, b in network.named_buffers() if name in keys}
    return {**weights, **buffers}


def write_ema(weights: dict[str, torch.Tensor], step: int, checkpoints_url: str, model_cfg: dict) -> str:
    """Write gathered EMA weights as safetensors (not yet named by the pointer: `publish_ema`). Returns
    the URL."""
    url = storage.join(checkpoints_url, ema_name(step))
    save_weights(weights, url, metadata={"step": str(step), "model": json.dumps(model_cfg, sort_keys=True)})
    log.info("exported EMA weights of step %d to %s", step, url)
    return url


def publish_ema(step: int, checkpoints_url: str, model_cfg: dict, keep: int | None) -> None:
    """Point `ema-latest.json` at the export of `step`, whose checkpoint is committed, then keep the newest
    `keep` exports up to it (all when None); exports of later steps stay (written, their checkpoint not
    yet committed)."""
    url = storage.join(checkpoints_url, ema_name(step))
    storage.write_json(storage.join(checkpoints_url, EMA_POINTER),
                       {"step": step, "file": ema_name(step), "url": url, "model": model_cfg})
    if keep:
        named = sorted(u for u in storage.listdir(checkpoints_url)
                       if (m := EMA_NAME.search(u)) and int(m.group(1)) <= step)
        for old in named[:-keep]:
            storage.remove(old)


def ema_name(step: int) -> str:
    return f"ema-{step:07d}.safetensors"


def has_checkpoint(checkpoints_url: str) -> bool:
    """Whether a run's checkpoints folder holds a committed checkpoint: the latest one Ray Train's snapshot
    (`RAY_SNAPSHOT`, written at each commit) names, which is what it resumes from. A `step-NNNNNNN`
    folder the snapshot does not name is an upload cut short (a worker lost before the commit): the next
    run starts from scratch, so its settings are free. CheckpointError for a snapshot that is not JSON
    (Ray Train would fail on it too), or that is gone although the EMA pointer says a checkpoint was
    committed: starting again would discard every committed step folder (`remove_uncommitted`). Ray
    rewrites the file in place; on a local root `launcher.ray_storage` makes that a rename, but a copy,
    another writer or a crash of an older version may still leave it cut."""
    url = storage.join(checkpoints_url, RAY_SNAPSHOT)
    try:
        snapshot = storage.read_json(url)
    except FileNotFoundError:
        step = exported_step(checkpoints_url)
        if step >= 0:
            raise CheckpointError(f"{url} is missing, but {storage.join(checkpoints_url, EMA_POINTER)} names the "
                                  f"export of step {step}, made only once a checkpoint was committed: "
                                  f"{_lost_snapshot_advice(checkpoints_url)}") from None
        return False
    except ValueError as err:
        raise CheckpointError(f"{url} is not the JSON Ray Train writes ({str(err)[:100]}; a full disk or a cut "
                              "write can leave it so): "
                              f"{_lost_snapshot_advice(checkpoints_url)}") from None
    if not isinstance(snapshot, dict):
        raise CheckpointError(f"{url}: expected Ray Train's checkpoint snapshot (a JSON object)")
    return bool(snapshot.get("latest_checkpoint_result"))


def _lost_snapshot_advice(checkpoints_url: str) -> str:
    run = checkpoints_url.rstrip("/").rsplit("/", 1)[0]
    return ("unless a job is writing it now, restore it from a copy (free the disk first); or continue from the "
            f"run's EMA weights in a new storage.run with train.init_from={run}. Do not delete it: the next run "
            "would then discard the committed step-* folders as uploads cut short")


def remove_uncommitted(checkpoints_url: str) -> list[str]:
    """Remove the `step-NNNNNNN` folders Ray Train's snapshot does not list (uploads cut short by a lost
    worker or job) and return their URLs. Ray writes a checkpoint into its folder without clearing it,
    so a later run of another world size would resume from a folder that still holds the old ranks'
    ZeRO files beside its own. Only while this job holds the run's lease (no upload is in flight). Nothing
    is removed without a readable snapshot once the EMA pointer shows a commit (`has_checkpoint` refuses)."""
    try:
        snapshot = storage.read_json(storage.join(checkpoints_url, RAY_SNAPSHOT))
    except FileNotFoundError:
        if exported_step(checkpoints_url) >= 0:
            return []  # the snapshot is lost, not never written: the step folders may be committed ones
        snapshot = {}
    except ValueError:
        return []  # `has_checkpoint` names the file; nothing here can tell which folders are committed
    listed = {r.get("checkpoint_dir_name") for r in snapshot.get("checkpoint_results") or [] if isinstance(r, dict)}
    stale = [url for url in storage.listdir(checkpoints_url)
             if STEP_NAME.fullmatch(url.rstrip("/").rsplit("/", 1)[-1])
             and url.rstrip("/").rsplit("/", 1)[-1] not in listed]
    for url in stale:
        log.warning("%s: a checkpoint upload that never committed; removed before training", url)
        storage.remove(url)
    return stale


def exported_step(checkpoints_url: str) -> int:
    """The step of the EMA export the pointer names; -1 when there is none yet."""
    try:
        return read_ema_pointer(storage.join(checkpoints_url, EMA_POINTER))["step"]
    except FileNotFoundError:
        return -1


class Background:
    """One thread that runs writes in the order they were submitted; `wait()` blocks until they are done and
    raises the first one's error (so a failed export stops training at the next checkpoint, not never)."""

    def __init__(self, name: str):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.pending: list[Future] = []

    def submit(self, fn, *args) -> None:
        self.pending.append(self.pool.submit(fn, *args))

    def wait(self) -> None:
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        self.wait()
        self.pool.shutdown()
