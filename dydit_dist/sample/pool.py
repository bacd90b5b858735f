"""The sampling fan-out: a pool of Ray actors pulling units (shards) from the driver, and the driver
that keeps books.

    manifest = run_sampling(cfg)            # writes {run}/samples/shard-*.tar and manifest.json

`sample.num_actors` actors, each with `sample.gpus_per_actor` of a GPU under `ray.use_gpu` (else CPU
actors), started once the cluster has room for all of them (`capacity.acquire`). Each actor loads
the network, method, sampler and decoder once, then samples one unit at a time
(a shard of `sample.shard_size` samples); the driver hands it the next as soon as it is done
(`dispatch.Dispatcher`: the queue's head, or once the queue is empty, a speculative copy of the
oldest running unit). The first copy of a unit to finish sampling is written (the shard as one
object, then its done-marker, see `dydit_dist.shardset`) by a second concurrent method of the same
actor, so PNG encoding and upload overlap the next unit's sampling; later copies are discarded. A
shard object is only created, never replaced: when an actor taken for lost still writes its copy
after its replacement's, the first stays and the manifest records that one (GPU copies may differ). The
driver merges the records into the manifest (it alone writes it), shows samples/s and ETA, and
writes the manifest only once the actors are ready, so a failed start leaves nothing behind.

Shards already recorded, whose object is there at its recorded size, are skipped. The units of an
actor that died go back to the queue and the actor is killed (it may only be unreachable) and replaced,
`ray.max_failures` times at most (one that dies starting, on a host whose GPU is unusable, say, is
replaced the same way; so is one whose device fails with a CUDA error: its process ends,
`faults.on_device_error`; so is one stuck in a unit, `faults.StallWatch`); an error raised by the sampling code itself (a bad checkpoint or config, in a
first actor or a replacement; a wrong shape; a unit out of GPU memory, named with sample.batch_size) stops
the job, once the shards being written are recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable

import torch

from dydit_dist import config as config_lib
from dydit_dist import pretrained, storage
from dydit_dist.accel.options import parse_eps_scale
from dydit_dist.capacity import ActorPool, Need, check_gpu, connect_ray, death_cause
from dydit_dist.config import Config, ConfigError, JobFailed
from dydit_dist.config_files import remote_cause
from dydit_dist.data.manifest import CAPTION_PREPROCESSING
from dydit_dist.diffusion.noise import stream_kind
from dydit_dist.faults import Stalled, StallWatch, on_device_error
from dydit_dist.models import CheckpointError, family
from dydit_dist.network import resolve_checkpoint
from dydit_dist.paths import RunPaths
from dydit_dist.sample.generate import ShardGenerator
from dydit_dist.sample.sdxl import SCHEDULERS as SDXL_SCHEDULERS
from dydit_dist.sample.sdxl import SDXLShardGenerator
from dydit_dist.shardset import PeriodicWriter, remove_shards, settings_digest, write_marker, write_shard

from .dispatch import Dispatcher
from .manifest import SamplesError, SamplesManifest
from .plan import ShardSpec, parse_prompts, plan_shards
from .shards import pack

log = logging.getLogger(__name__)
# What stops an actor from loading that a new actor would meet again: the job stops with it (exit 2).
LOAD_ERRORS = (CheckpointError, ConfigError, SamplesError)  # SamplesError: a malformed prompts file
MANIFEST_EVERY_S = 5.0  # markers keep every finished shard in between


def absolute_root(cfg: Config) -> Config:
    """`cfg` with a relative local `storage.root` (`file://./outputs`, `outputs`) made absolute, so that
    Ray workers, whose working directory may differ, write where the driver reads."""
    root = cfg.storage.root
    if "://" in root and not root.startswith("file://"):
        return cfg
    path = os.path.abspath(root.removeprefix("file://"))
    return dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, root=f"file://{path}"))


def sampling_settings(cfg: Config) -> dict:
    """Everything that decides the bytes of the samples; a folder never mixes two of these.

    What only some networks read is None for the others, so that it does not change their settings:
    `dynamic` (model.method dydit), `flexdit` (model.method flexdit; its schedule has no weights, so
    another one still loads the checkpoint), `text` (PixArt's caption length, positional scale and T5),
    and what this package's network and decoder read where an SD-XL pipeline uses its own folder.
    `model.class_dropout_prob` is left out: sampling zeroes it, and the null-class row it adds is a
    weights shape the strict checkpoint load checks. A text-to-image model's `prompts` are the file's URL
    and the sha256 of its bytes: a prompts file rewritten in place (another caption subset) is other
    settings, not a folder of two caption lists. Values are as JSON keeps them (lists, not tuples), so
    that the settings read back from a manifest compare equal.
    """
    s, m, d = cfg.sample, cfg.model, cfg.data
    fam = family(m.name)
    ours = fam != "sdxl"  # this package's network and ImageDecoder
    flexdit = {**dataclasses.asdict(m.flexdit), "grid_sizes": list(m.flexdit.grid_sizes)}
    text = {"caption_channels": m.caption_channels, "model_max_length": m.model_max_length,
            "lewei_scale": m.lewei_scale, "text_encoder": d.text_encoder,
            "tokenizer": d.tokenizer or d.text_encoder, "caption_preprocessing": CAPTION_PREPROCESSING,
            "text_encoder_dtype": "fp32"}  # `generate.conditioner`
    return {
        "model": m.name, "image_size": m.image_size, "in_channels": m.in_channels, "num_classes": m.num_classes,
        "vae_downsample": m.vae_downsample if ours else None, "learn_sigma": m.learn_sigma if ours else None,
        "checkpoint": m.checkpoint, "dynamic": dataclasses.asdict(m.dynamic) if m.method == "dydit" else None,
        "flexdit": flexdit if m.method == "flexdit" else None,
        "text": text if fam not in ("dit", "sdxl") else None,
        "vae": d.vae, "vae_scale_factor": d.vae_scale_factor if ours else None, "method": s.method,
        "method_options": _method_identity(s),
        "sampler": s.sampler, "steps": s.steps, "cfg_scale": s.cfg_scale, "guidance_channels": s.guidance_channels,
        "seed": s.seed, "labels": s.labels if fam == "dit" else None, "num_samples": s.num_samples, "shard_size": s.shard_size, "batch_size": s.batch_size,
        "precision": s.precision, "tf32": s.tf32, "vae_precision": s.vae_precision, "compile": s.compile,
        "noise": stream_kind(s.noise, "cuda" if cfg.ray.use_gpu else "cpu"),
        "prompts": _prompts_identity(s.prompts) if fam != "dit" else None,
        # SD-XL's DDIM only (a key no other folder had): what its scheduler takes besides the folder's config
        **({"scheduler": SDXL_SCHEDULERS[s.sampler][1]} if fam == "sdxl" and SDXL_SCHEDULERS[s.sampler][1] else {}),
        # under autocast the network's output is made fp32 before the guidance mix and EB-Cache's correction
        # (they were in bf16 before): the bytes of an fp32 run did not change, so neither do its settings
        **({"guidance_dtype": "fp32"} if s.precision != "fp32" else {}),
    }  # fmt: skip


def _prompts_identity(url: str | None) -> dict | None:
    """{"url", "sha256"} of a prompts file (FileNotFoundError naming it when there is none; SamplesError
    naming the line of a malformed one, here in the driver rather than in every actor)."""
    if not url:
        return None
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"sample.prompts: no prompts file at {url}") from None
    parse_prompts(url, data)
    return {"url": url, "sha256": hashlib.sha256(data).hexdigest()}


def _method_identity(s) -> dict:
    """The method's options; an EB-Cache calibration table (a `.json` schedule) also by the schedule it
    holds (`schedule_steps`): each actor reads the table when it loads, so a table rewritten at the same
    URL with another schedule (a calibration run again) is other settings, not a folder of two
    schedules. Its other numbers (errors, FLOPs) do not decide a sample's bytes. FORA's schedule is
    recorded too: it is derived from the interval, and the derivation changed once (aligned to the last
    step, as the official code). EB-Cache's "paper" correction by its factors: it was read the other way once."""
    options = dataclasses.asdict(s.method_options) if s.method_options else {}
    if s.method == "fora":
        options["schedule_steps"] = s.fora.schedule_for(s.steps)
    if s.method == "eb_cache" and s.eb_cache.eps_scale == "paper":  # its reading changed once (accel/options.py)
        options["eps_scale_factors"] = [list(k) for k in parse_eps_scale("paper")]
    if s.method == "eb_cache" and s.eb_cache.schedule.endswith(".json"):
        try:
            options["schedule_steps"] = s.eb_cache.schedule_for(s.steps)
        except FileNotFoundError:
            raise FileNotFoundError(f"sample.eb_cache.schedule: no calibration table at {s.eb_cache.schedule}") from None
    return options


def sampling_config(cfg: Config) -> Config:
    """`cfg` as the sample job runs it: an absolute storage.root, model.checkpoint pinned to its weights file
    (`resolve_checkpoint`; an SD-XL checkpoint is a pipeline folder, used as it is)."""
    cfg = absolute_root(cfg)
    return cfg if family(cfg.model.name) == "sdxl" else resolve_checkpoint(cfg)


def shard_generator(cfg: Config, device: str) -> ShardGenerator | SDXLShardGenerator:
    """What makes a worker's samples: diffusers' SD-XL pipeline for model.family sdxl, else this package's
    network, method and sampler."""
    return (SDXLShardGenerator if family(cfg.model.name) == "sdxl" else ShardGenerator)(cfg, device)


class SamplingWorker:
    """One sampling actor's state: a `ShardGenerator` on its device, the units it sampled and not yet
    wrote or dropped, and where shards go. Two methods run at once (`max_concurrency=2`): `sample` on
    the device while `write` encodes and uploads the unit before."""

    def __init__(self, cfg_dict: dict, url: str, use_gpu: bool):
        self.url = url
        self.load_error: Exception | None = None
        self.made: dict[int, tuple[ShardSpec, list, dict, dict]] = {}  # sampled units, until written or dropped
        try:  # raised by `ready` and `sample`: the driver gets the error itself, not a dead actor
            cfg = config_lib.from_dict(cfg_dict)
            storage.configure_from(cfg.storage)
            if use_gpu:
                check_gpu("sampling actor")
            torch.set_num_threads(max(1, int(cfg.sample.cpus_per_actor)))
            self.digest = settings_digest(sampling_settings(cfg))
            self.generator = shard_generator(cfg, "cuda" if use_gpu else "cpu")
        except LOAD_ERRORS as err:
            self.load_error = err

    def ready(self) -> float:
        """Seconds the network, method and decoder took to load (or the input error that stopped them)."""
        if self.load_error is not None:
            raise self.load_error
        return self.generator.load_seconds

    def sample(self, unit: ShardSpec) -> dict:
        """Make the samples of `unit` and hold them for `write` or `discard`; returns their timing. A
        replacement actor's first call: it raises the input error that stopped its load, as `ready`."""
        self.ready()
        try:
            samples, timing = self.generator.generate(unit)
        except Exception as err:  # noqa: BLE001 - device errors handled, the others re-raised
            s = self.generator.cfg.sample
            on_device_error(err, f"sampling actor on shard {unit.index}", (
                f"sample.batch_size={s.batch_size} does not fit; lower it (a sampling setting: in another "
                f"storage.run, or remove {self.url}), or give each actor more of a GPU (sample.gpus_per_actor="
                f"{s.gpus_per_actor})"), SamplesError)
            raise
        # every unit's GFLOPs; the width per timestep (the same for every unit) once, with shard 0
        stats = self.generator.stats() if unit.index == 0 else {"gflops": self.generator.gflops()}
        self.made[unit.index] = (unit, samples, timing, stats)
        return timing

    def write(self, index: int) -> dict:
        """Encode, write and mark the sampled unit `index` (the shard, then its done-marker); returns its
        manifest record, which holds the unit's GFLOPs per forward of one image (`SamplesManifest.gflops`),
        and for shard 0 the method's active width per timestep (the same for every shard)."""
        unit, samples, timing, stats = self.made.pop(index)
        start = time.perf_counter()
        data = pack(samples)
        timing["encode_s"] = time.perf_counter() - start
        start = time.perf_counter()
        record = write_shard(self.url, unit.index, data, unit.count)
        record.update(start=unit.start, settings_sha256=self.digest, actor=_actor_id(), gflops=stats["gflops"],
                      timing=timing)
        if unit.index == 0 and "width_by_timestep" in stats:
            record["width_by_timestep"] = stats["width_by_timestep"]
        write_marker(self.url, record)
        record["timing"]["write_s"] = time.perf_counter() - start  # the manifest's copy adds the write time
        return record

    def discard(self, index: int) -> None:
        """Drop a sampled unit that another copy wrote."""
        self.made.pop(index, None)


def _actor_id() -> str:
    import ray

    return ray.get_runtime_context().get_actor_id() or "local"


class SamplingPool(ActorPool):
    """The sampling actors, every one ready before the first unit; replaces those that die (see the module
    docstring)."""

    def __init__(self, cfg: Config, url: str, num_todo: int):

        s, self.use_gpu = cfg.sample, cfg.ray.use_gpu
        self.num_actors = min(s.num_actors, num_todo)
        keys = "sample.num_actors, sample.cpus_per_actor" + (", sample.gpus_per_actor" if self.use_gpu else "")
        need = Need("sampling actors", self.num_actors, s.cpus_per_actor, s.gpus_per_actor if self.use_gpu else 0.0, keys)
        super().__init__(SamplingWorker, (cfg.to_dict(), url, self.use_gpu), need, self.use_gpu,
                         cfg.ray.capacity_timeout_s, cfg.ray.max_failures, "sampling actor", cfg.ray.stall_factor,
                         max_concurrency=2)  # `sample` and `write` at once
        # Every actor ready before the first unit. An input error (a bad checkpoint) stops the job; an actor
        # that died starting (its host's GPU unusable, `GpuUnavailable`; a lost node) is replaced, as later.
        self.load_seconds = []
        try:
            self._start_all()
        except BaseException:  # an input error, the failure budget spent, no room (CapacityError), a signal
            self.shutdown()  # the actors started so far would hold their GPUs while this process goes on
            raise

    def _start_all(self) -> None:
        import ray
        from ray.exceptions import RayActorError

        starting = {actor.ready.remote(): actor for actor in self.actors}
        while starting:
            ref = self.wait(list(starting))
            actor = starting.pop(ref)
            try:
                self.load_seconds.append(ray.get(ref))
            except LOAD_ERRORS as err:
                raise remote_cause(err) from None
            except RayActorError as err:
                log.warning("sampling actor died starting: %s", death_cause(err))
                if self.failures >= self.max_failures:
                    raise JobFailed(f"sampling actors could not start ({self.failures + 1} failures > "
                                    f"ray.max_failures={self.max_failures}), the last with {death_cause(err)}") from None
                self.replace(actor, err)
                starting[self.actors[-1].ready.remote()] = self.actors[-1]


def run_sampling(cfg: Config, url: str | None = None,
                 on_shard: Callable[[SamplingPool, dict], None] | None = None) -> SamplesManifest:
    """Make every missing shard of `cfg.sample` under `url` (default `RunPaths(cfg).samples`); returns the
    complete manifest. `on_shard(pool, record)` runs on the driver after each written shard."""
    cfg = sampling_config(cfg)
    url = url or RunPaths(cfg).samples
    # 1. Plan, and what is already done (a record whose object is missing or of another size is made again)
    units = plan_shards(cfg.sample.num_samples, cfg.sample.shard_size)
    manifest = SamplesManifest.resume(url, sampling_settings(cfg), len(units), drop_missing=True)
    todo = [u for u in units if u.index not in manifest.shards]
    if not todo:
        if _method_stats(manifest) or not manifest.is_stored(url):  # a driver that died before its last write
            manifest.write(url)
        log.info("%s: all %d samples already made", url, manifest.num_samples)
        return manifest
    remove_shards(url, [u.index for u in todo])  # a lost run's unrecorded objects: this run's writes create
    # 2. Actors; the manifest is written once they are ready, so a failed start leaves none behind
    start = time.monotonic()
    pretrained.mirror(cfg, captions=family(cfg.model.name) != "dit")  # a Hub id: once here, not once per actor
    connect_ray(cfg.ray.address)
    pool = SamplingPool(cfg, url, len(todo))
    manifest.stats["model_load_s"] = pool.load_seconds
    manifest.stats["startup_s"] = time.monotonic() - start
    manifest.write(url)
    log.info("%s: %d shards to make on %d actors (%s), %d already done", url, len(todo), pool.num_actors,
             "GPU" if pool.use_gpu else "CPU", len(manifest.shards))
    # 3. Fan out
    sampling_start = time.monotonic()
    dispatch = Dispatcher(todo, speculate=cfg.sample.speculate)
    try:
        _fan_out(pool, dispatch, manifest, url, cfg.sample.num_samples, on_shard, StallWatch(cfg.ray.stall_factor))
    finally:
        manifest.write_in_finally(url)  # what finished survives an interruption
        pool.shutdown()
    # 4. Complete
    manifest.stats["sampling_wall_s"] = time.monotonic() - sampling_start  # actors ready to last shard
    manifest.stats["wall_s"] = time.monotonic() - start
    manifest.stats["actors"] = pool.num_actors
    manifest.stats["actor_failures"] = pool.failures
    manifest.stats["speculative_copies"] = dispatch.copies_started
    manifest.write(url)
    log.info("%s: %d samples in %d shards", url, manifest.num_samples, manifest.num_shards)
    return manifest


def _record_writes(writes: list, manifest: SamplesManifest, digest: str, timeout_s: float = 120.0) -> None:
    """Record in `manifest` the shards whose `write` calls finish within `timeout_s` (a job about to stop
    keeps what its actors were writing); the others, and failed writes, are made again by a rerun."""
    import ray

    done, _ = ray.wait(writes, num_returns=len(writes), timeout=timeout_s) if writes else ([], [])
    for write in done:
        with contextlib.suppress(Exception):  # its actor lost, or storage failing: nothing to record
            if (written := ray.get(write))["settings_sha256"] == digest:
                manifest.add(written)


def _method_stats(manifest: SamplesManifest) -> bool:
    """Set the stats the report reads of the method from the records, where the done-markers keep them:
    the GFLOPs as the mean over every shard's samples, and the width per timestep that shard 0's record
    holds. Whether that changed them (shards made before their records held these leave what is there)."""
    found = {"gflops": manifest.gflops(), "width_by_timestep": manifest.shards.get(0, {}).get("width_by_timestep")}
    changed = {k: v for k, v in found.items() if v is not None and manifest.stats.get(k) != v}
    manifest.stats.update(changed)
    return bool(changed)


def _fan_out(pool: SamplingPool, dispatch: Dispatcher, manifest: SamplesManifest, url: str, num_samples: int,
             on_shard: Callable[[SamplingPool, dict], None] | None, watch: StallWatch) -> None:
    """Drive the actors until every unit of `dispatch` is written; records go into `manifest`. `watch`
    times the `sample` calls: an actor whose call stalls is lost (`faults.StallWatch`)."""
    import ray
    from ray.exceptions import RayActorError
    from tqdm import tqdm

    pending: dict = {}  # ObjectRef -> (actor, "sample" | "write", unit index)
    digest = settings_digest(manifest.settings)  # every record's, as each actor works it out

    def lose(actor, err: Exception) -> None:
        """An actor dead, unreachable or stuck: its calls dropped, its units back in the queue, replaced."""
        for lost in [r for r, (a, _, _) in pending.items() if a == actor]:
            del pending[lost]
            watch.forget(lost)
        back = dispatch.lost(actor)
        log.warning("sampling actor lost (%s); %d units go back to the queue", death_cause(err), len(back))
        pool.replace(actor, err)

    def feed() -> None:
        """Every actor that samples nothing and has fewer than two writes queued pulls a unit."""
        for actor in pool.actors:
            calls = [kind for a, kind, _ in pending.values() if a == actor]
            if "sample" not in calls and calls.count("write") < 2:
                unit = dispatch.assign(actor)
                if unit is not None:
                    ref = actor.sample.remote(unit)
                    pending[ref] = (actor, "sample", unit.index)
                    watch.start(ref, actor)

    write_manifest = PeriodicWriter(manifest, url, MANIFEST_EVERY_S)
    with tqdm(total=num_samples, initial=manifest.num_samples, unit="img", desc="sample",
              mininterval=1.0, smoothing=0.1) as bar:
        feed()
        while not dispatch.finished:
            try:
                ref = pool.wait(list(pending), watch)
            except Stalled as err:
                lose(pending[err.ref][0], err)
                feed()
                continue
            actor, kind, index = pending.pop(ref)
            try:
                result = ray.get(ref)
            except LOAD_ERRORS as err:  # a replacement that could not load (no `ready` before its first unit), or
                # a unit the actors cannot make (out of GPU memory): the writes under way land and are recorded first
                _record_writes([r for r, (_, k, _) in pending.items() if k == "write"], manifest, digest)
                raise remote_cause(err) from None
            except RayActorError as err:
                watch.forget(ref)
                lose(actor, err)
                feed()
                continue
            watch.finish(ref)
            if kind == "sample":
                if dispatch.sampled(actor, index):
                    pending[actor.write.remote(index)] = (actor, "write", index)
                else:
                    actor.discard.remote(index)  # another copy of this unit is written: the first wins
            else:
                if result["settings_sha256"] != digest:  # the actor read an input that changed under the job
                    raise SamplesError(f"{url}: {result['name']} was made with other settings than this job's: "
                                       "sample.prompts or an EB-Cache table was rewritten while it ran; remove "
                                       "that folder (or use another storage.run) and rerun")
                dispatch.written(actor, index)
                manifest.add(result)
                bar.update(result["count"])
                if on_shard is not None:
                    on_shard(pool, result)
                write_manifest()
            feed()
    _method_stats(manifest)
