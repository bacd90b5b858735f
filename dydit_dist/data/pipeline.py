"""The prepare job: images (and captions) -> latent (and T5) shards under `data.uri`, fanned out on Ray.

    1. Plan and validate, before any work: list the source (`sources.plan_source`), check the VAE
       (latent channels, downsampling, scale factor) and T5 width against the model config, and
       compare with the manifest already there (a rerun with other settings is an error).
    2. Skip every shard the manifest lists and storage holds: a rerun of a finished job does nothing,
       an interrupted one resumes (a shard written but not yet recorded is removed and encoded again;
       a task's write only creates, so a retried task's copy never replaces the first try's).
    3. Encode the remaining chunks as Ray tasks (`encode_chunk`, one chunk each, on a GPU with
       `ray.use_gpu`; at most `data.prepare_workers` in flight, by default `ray.num_workers`, once
       the cluster has room for them: `capacity.acquire`). Each task writes its shard itself; a
       worker process loads the VAE / T5 once and keeps them for the next chunks (Ray reuses worker
       processes, which also spares each task the imports). The driver records each finished shard in the manifest and
       shows images/s and ETA. A task stuck without an error (a source read hanging on a stale NFS or FUSE
       mount, a hung GPU) is taken for stalled once it ran `ray.stall_factor` x the median finished task (at
       least `faults.STALL_LOAD_FLOOR_S`, as a first task also loads the models): its process is killed and
       the shard encoded again, up to `ray.max_failures` times a run, then a JobFailed names the shard.
    4. Mark the manifest complete, and warn when its shards are class-sorted (a data set prepared
       before samples were permuted, or class-sorted input tars): the reader's batches would then
       hold far fewer classes than i.i.d. ones.

Samples are written in the order `sources` describes (a seeded permutation, or a webdataset
source's own order); each shard's record counts its samples per class (`classes`).

Unreadable or truncated images (and samples without a label or caption) are skipped, counted and
listed (source URL and error) under their shard in the manifest, never silently dropped; more than
`data.max_bad_fraction` of them leaves the data set incomplete with a DataError (a systematic cause), and
so does, early, over half (or `data.max_bad_fraction`) of the inputs a run has read once it read 1000. An
input tar that is not a readable tar is a DataError naming it. Each task writes a done-marker for its
shard under `{uri}/done/` (`shardset.write_marker`), so a driver killed between its manifest writes loses
no finished shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from dataclasses import dataclass

import numpy as np

from dydit_dist import capacity, faults, pretrained, storage
from dydit_dist import config as config_lib
from dydit_dist.capacity import GpuUnavailable, Need, acquire, check_gpu, connect_ray
from dydit_dist.config import Config
from dydit_dist.config_files import JobFailed
from dydit_dist.data import sources
from dydit_dist.data.encoders import ImageEncoder, TextEncoder, text_properties, vae_properties
from dydit_dist.data.manifest import (
    CAPTION_PREPROCESSING,
    Manifest,
    ManifestError,
    conditioning,
    expected_latent_shape,
)
from dydit_dist.data.shards import DataError, nonfinite, sample_files
from dydit_dist.faults import Stalled, StallWatch
from dydit_dist.paths import RunPaths
from dydit_dist.shardset import (
    PeriodicWriter,
    pack,
    remove_shards,
    settings_digest,
    unverified,
    write_marker,
    write_shard,
)

log = logging.getLogger(__name__)
MANIFEST_EVERY_S = 10.0  # how often the driver records finished shards while the job runs, at most (`PeriodicWriter`)
LARGE_TAR = 4  # an input tar of more than this many data.shard_size samples is warned about
# a run stops once, after 1000 inputs or more, over half of those it read (or data.max_bad_fraction) are unusable
EARLY_INPUTS, SYSTEMATIC_BAD = 1000, 0.5


@dataclass
class PrepareResult:
    uri: str
    manifest: Manifest
    encoded: int  # shards encoded by this run
    skipped: int  # shards already done


def config_settings(cfg: Config) -> dict:
    """The manifest settings that follow from the config alone (no listing of the source, no VAE read): what
    `pipeline.data_done` compares with a complete data set before a reproduce run reuses it."""
    d, m = cfg.data, cfg.model
    pixels = d.vae == "none"
    settings = {
        "conditioning": conditioning(m.name), "latent_dtype": d.latent_dtype,
        "latent_storage": "pixels" if pixels else d.latent_storage, "vae": d.vae,
        "scale_factor": 1.0 if pixels else d.vae_scale_factor, "flip": d.flip, "image_size": m.image_size,
        "seed": d.seed, "source": d.source, "source_format": d.source_format,
        "shard_size": None if d.source_format == "webdataset" else d.shard_size,
    }
    if settings["conditioning"] == "class":
        settings["num_classes"] = m.num_classes
    else:
        settings.update(text_encoder=d.text_encoder, tokenizer=d.tokenizer or d.text_encoder,
                        text_len=m.model_max_length, caption_preprocessing=CAPTION_PREPROCESSING,
                        crop="resize-center")  # PixArt-alpha's; class data keeps DiT's ADM crop (no key: "adm")
    return settings


def plan(cfg: Config) -> tuple[dict, sources.SourcePlan]:
    """The manifest settings and the source chunks; DataError for input that does not fit the model."""
    d, m = cfg.data, cfg.model
    cond = conditioning(m.name)
    source_plan = sources.plan_source(cfg, cond)
    if d.vae == "none":
        if m.vae_downsample != 1:
            raise DataError(f"data.vae=none stores pixels: model.vae_downsample must be 1, got {m.vae_downsample}")
        storage_kind = "pixels"
    else:
        vae = vae_properties(pretrained.local(d.vae, cfg.storage.root))
        problems = []
        if vae["downsample"] != m.vae_downsample:
            problems.append(f"downsamples by {vae['downsample']}, model.vae_downsample={m.vae_downsample}")
        if vae["latent_channels"] != m.in_channels:
            problems.append(f"has {vae['latent_channels']} latent channels, model.in_channels={m.in_channels}")
        if not math.isclose(vae["scaling_factor"], d.vae_scale_factor, rel_tol=1e-6):
            problems.append(f"scaling_factor {vae['scaling_factor']} != data.vae_scale_factor={d.vae_scale_factor}")
        if problems:
            raise DataError(f"data.vae={d.vae} does not fit the config: " + "; ".join(problems))
        storage_kind = d.latent_storage
    shape = expected_latent_shape(m)
    settings = {
        **config_settings(cfg), "latent_shape": shape,
        "stored_shape": [2, *shape] if storage_kind == "mean_std" else shape,
        "num_inputs": source_plan.num_inputs, "inputs_digest": source_plan.digest,
        "sample_order": "input" if d.source_format == "webdataset" else "permuted",
    }
    if cond == "class":
        settings["classes"] = list(source_plan.classes)
    else:
        text_dim = text_properties(pretrained.local(d.text_encoder, cfg.storage.root))["text_dim"]
        if text_dim != m.caption_channels:
            raise DataError(f"data.text_encoder={d.text_encoder} gives {text_dim}-wide features, "
                            f"model.caption_channels={m.caption_channels}")
        settings["text_dim"] = text_dim
    return settings, source_plan


def _seed_of(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


class ShardEncoder:
    """The VAE (and T5) of one worker process, and the encoding of a chunk into one whole shard."""

    def __init__(self, cfg_dict: dict, settings: dict):
        import torch

        cfg = config_lib.from_dict(cfg_dict)
        storage.configure_from(cfg.storage)
        if cfg.ray.use_gpu:
            check_gpu("prepare encoder")
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
        self.cfg, self.settings = cfg, settings
        d, root = cfg.data, cfg.storage.root
        self.images = ImageEncoder(pretrained.local(d.vae, root), cfg.model.in_channels, d.latent_storage,
                                   d.latent_dtype, d.seed)
        self.text = None
        if settings["conditioning"] == "caption":
            tokenizer = pretrained.local(d.tokenizer, root) if d.tokenizer else None
            self.text = TextEncoder(pretrained.local(d.text_encoder, root), tokenizer, cfg.model.model_max_length)

    def encode(self, chunk: sources.Chunk, uri: str) -> dict:
        """Encode one chunk into `shard-{index}.tar`; returns its manifest record. Images are decoded one
        `data.encode_batch_size` batch ahead of the encoder, not a whole chunk (1,000 images at 512 px are
        0.8 GB decoded)."""
        cond, num_classes = self.settings["conditioning"], self.cfg.model.num_classes
        batch, bad, samples = [], [], []
        for item, data, error in sources.iter_chunk(chunk, cond):
            image = None
            if error is None and cond == "class" and not 0 <= item.label < num_classes:
                error = f"class {item.label} outside [0, model.num_classes={num_classes})"
            if error is None:
                try:
                    image = sources.load_image(data, self.cfg.model.image_size, self.images.mode,
                                               self.settings.get("crop", "adm"))
                except Exception as err:  # noqa: BLE001 - image decoders raise many types for bad files
                    error = f"unreadable image ({type(err).__name__}: {err})"
            if error is not None:
                bad.append({"source": item.url, "error": error})
                continue
            batch.append((item, image))
            if len(batch) == self.cfg.data.encode_batch_size:
                samples += self._encode_batch(batch, bad)
                batch = []
        if batch:
            samples += self._encode_batch(batch, bad)
        record = write_shard(uri, chunk.index, pack(samples), len(samples))
        record.update(bad=bad, inputs=len(samples) + len(bad), settings_sha256=settings_digest(self.settings))
        if cond == "class":
            values, counts = np.unique([int(s["cls"]) for s in samples], return_counts=True)
            record["classes"] = {str(label): int(count) for label, count in zip(values, counts, strict=True)}
        write_marker(uri, record)  # a driver killed before its next manifest write loses no finished shard
        return record

    def _encode_batch(self, batch: list, bad: list) -> list[dict]:
        """The shard files of a batch of (item, decoded image); an input whose latent or T5 features came out
        NaN or inf (a float16 overflow) is added to `bad` instead, as an unusable input: the reader refuses it."""
        images = np.stack([image for _, image in batch])  # (B, H, W, C) uint8
        seeds = [_seed_of(item.key) for item, _ in batch]
        latents = self.images(images, seeds)
        flipped = self.images(images[:, :, ::-1], seeds, flipped=True) if self.cfg.data.flip else None
        t5, masks = self.text([item.caption for item, _ in batch]) if self.text else (None, None)
        samples = []
        for j, (item, _) in enumerate(batch):
            broken = nonfinite(latent=latents[j], latent_flip=None if flipped is None else flipped[j],
                               t5=None if t5 is None else t5[j])
            if broken:
                bad.append({"source": item.url, "error": f"{' and '.join(broken)} holding NaN or inf after encoding "
                                                         f"(data.latent_dtype={self.cfg.data.latent_dtype})"})
                continue
            samples.append(sample_files(
                item.key, latents[j], label=item.label,
                latent_flip=None if flipped is None else flipped[j],
                t5=None if t5 is None else t5[j], t5_mask=None if masks is None else masks[j],
                meta={"source": item.url, **({"caption": item.caption} if item.caption is not None else {})},
            ))
        return samples


def _concurrency(cfg: Config, num_chunks: int) -> int:
    """Encoder tasks in flight: `data.prepare_workers`, or `ray.num_workers`; waits for their capacity."""
    r = cfg.ray
    count = max(1, min(cfg.data.prepare_workers or r.num_workers, num_chunks))
    keys = "data.prepare_workers or ray.num_workers, ray.cpus_per_worker" + (", ray.gpus_per_worker" if r.use_gpu else "")
    acquire([Need("encoder tasks", count, r.cpus_per_worker, r.gpus_per_worker if r.use_gpu else 0.0, keys)],
            r.use_gpu, r.capacity_timeout_s)
    return count


_ENCODERS: dict[str, ShardEncoder] = {}  # per worker process: loaded once, reused by later chunks


def encode_chunk(cfg_dict: dict, settings: dict, chunk: sources.Chunk, uri: str) -> dict:
    """A Ray task: encode one chunk into its shard with this process's (cached) encoders."""
    key = json.dumps([settings, cfg_dict["data"], cfg_dict["model"], cfg_dict["storage"]], sort_keys=True)
    if key not in _ENCODERS:
        _ENCODERS.clear()  # one set of models per process
        _ENCODERS[key] = ShardEncoder(cfg_dict, settings)
    return _ENCODERS[key].encode(chunk, uri)


def prepare(cfg: Config) -> PrepareResult:
    """Encode `data.source` into shards under `RunPaths(cfg).data` (`data.uri`, or the run's data folder)."""
    import ray
    from tqdm import tqdm

    paths = RunPaths(cfg)
    uri = paths.data
    # 1. Plan and validate (the manifest there: same settings, only the shards storage still holds)
    pretrained.mirror(cfg, captions=conditioning(cfg.model.name) == "caption")
    settings, source_plan = plan(cfg)
    manifest = _resume(uri, settings, len(source_plan.chunks))
    done = manifest.done()
    todo = [c for c in source_plan.chunks if c.index not in done]
    if not todo:
        if not manifest.complete:
            check_bad_inputs(uri, manifest, cfg.data.max_bad_fraction)
            manifest.complete = True
            manifest.write(uri)
        log.info("%s: all %d shards already prepared", uri, manifest.num_shards)
        warn_if_class_sorted(uri, manifest)
        return PrepareResult(uri, manifest, 0, len(done))
    manifest.complete = False
    manifest.write(uri)
    config_lib.save(cfg, paths.data_config)
    remove_shards(uri, [c.index for c in todo])  # written but not recorded: the tasks' writes only create
    # 2. Fan out
    connect_ray(cfg.ray.address)
    concurrency = _concurrency(cfg, len(todo))
    task = ray.remote(encode_chunk).options(
        num_cpus=cfg.ray.cpus_per_worker, num_gpus=cfg.ray.gpus_per_worker if cfg.ray.use_gpu else 0, max_retries=2,
        retry_exceptions=[GpuUnavailable])  # a host whose GPU is unusable: another try (capacity.py)
    cfg_ref, queue, running = ray.put(cfg.to_dict()), list(reversed(todo)), []
    log.info("%s: encoding %d shards, %d at a time (%d already done)", uri, len(todo), concurrency, len(done))
    write_manifest, warned_large, seen_inputs, seen_bad = PeriodicWriter(manifest, uri, MANIFEST_EVERY_S), False, 0, 0
    # a task's clock runs from its submission: the capacity for `concurrency` tasks was there before; its floor
    # is the load floor, since a worker process's first task also loads the VAE (and T5-XXL, maybe over a cold cache)
    watch, chunks, stalls = StallWatch(cfg.ray.stall_factor, faults.STALL_LOAD_FLOOR_S, "shard"), {}, 0
    images = sum(c.size_hint for c in todo)  # 0 for input tars, whose image counts are not known before
    systematic = max(SYSTEMATIC_BAD, cfg.data.max_bad_fraction)  # the bad share that stops the run early
    try:
        with tqdm(total=images or len(todo), unit="img" if images else "shard", desc=f"prepare {uri}",
                  mininterval=2.0) as bar:
            while queue or running:
                while queue and len(running) < concurrency:
                    chunk = queue.pop()
                    ref = task.remote(cfg_ref, settings, chunk, uri)
                    running.append(ref)
                    chunks[ref] = chunk
                    watch.start(ref, None)
                finished, running = ray.wait(running, num_returns=1, timeout=capacity.POLL_S)
                for ref in finished:  # before the stall check, which also runs while other tasks keep finishing
                    watch.finish(ref)
                    chunks.pop(ref)
                stalled = watch.stalled()
                if stalled is not None:
                    stalls += 1
                    watch.forget(stalled.ref)
                    running.remove(stalled.ref)
                    _stalled_task(stalled, chunks.pop(stalled.ref), queue, uri, stalls, cfg.ray.max_failures)
                if not finished:
                    continue
                record = ray.get(finished[0])  # a bad input tar: DataError (cli prints its cause's message)
                manifest.add(record)
                if record["inputs"] > LARGE_TAR * cfg.data.shard_size and not warned_large:
                    warned_large = True
                    log.warning("%s: the input tar of %s holds %d samples, data.shard_size=%d: every output shard is "
                                "one input tar, and each reader worker holds up to 3 shards in memory (PixArt's T5 "
                                "features are ~1 MB a sample); re-shard the input tars to about data.shard_size",
                                uri, record["name"], record["inputs"], cfg.data.shard_size)
                bar.update(record["inputs"] if images else 1)
                seen_inputs += record["inputs"]
                seen_bad += len(record["bad"])
                if seen_inputs >= EARLY_INPUTS and seen_bad > systematic * seen_inputs:
                    raise DataError(f"{uri}: {seen_bad} of the {seen_inputs} inputs read so far this run are unusable, "
                                    f"e.g. {_bad_examples(manifest)}: stopped early; fix the source, or accept them "
                                    "with a higher data.max_bad_fraction (the finished shards are kept and listed in "
                                    "the manifest)")
                if record["bad"]:
                    log.warning("%s: %d unreadable inputs, e.g. %s", record["name"], len(record["bad"]),
                                record["bad"][0])
                write_manifest()
    finally:
        # what finished survives an interruption, also tasks done beside the one that failed
        for ref in ray.wait(running, num_returns=len(running), timeout=0)[0] if running else []:
            with contextlib.suppress(Exception):
                manifest.add(ray.get(ref, timeout=0))
        manifest.write_in_finally(uri)
        for ref in running:
            ray.cancel(ref)
    # 3. Complete
    check_bad_inputs(uri, manifest, cfg.data.max_bad_fraction)
    manifest.complete = True
    manifest.write(uri)
    log.info("%s: %d samples in %d shards, %d unreadable inputs", uri, manifest.num_samples,
             manifest.num_shards, manifest.bad_inputs)
    warn_if_class_sorted(uri, manifest)
    return PrepareResult(uri, manifest, len(todo), len(done))


def _stalled_task(stalled: Stalled, chunk: sources.Chunk, queue: list, uri: str, stalls: int,
                  max_failures: int) -> None:
    """An encoder task stuck (a source read that hangs on an NFS or FUSE mount, a hung GPU): its worker
    process is killed, so it writes nothing later, and its chunk goes back to the queue's head; the
    `max_failures + 1`-th stall of the job is a JobFailed naming the shard."""
    import ray

    ray.cancel(stalled.ref, force=True)
    where = f"{uri}: the encoder task of shard {chunk.index} ({_chunk_source(chunk)})"
    if stalls > max_failures:
        raise JobFailed(f"{where}: {stalled}; that is {stalls} stalled tasks this run (ray.max_failures="
                        f"{max_failures}): look for a source read that hangs (a stale NFS or FUSE mount) or a "
                        "hung GPU on its node; a rerun resumes with the shards recorded")
    log.warning("%s: %s; its process is killed and the shard encoded again (%d of ray.max_failures=%d)", where,
                stalled, stalls, max_failures)
    queue.append(chunk)


def _chunk_source(chunk: sources.Chunk) -> str:
    if chunk.tar is not None:
        return chunk.tar
    return f"{len(chunk.items)} inputs from {chunk.items[0].url}" if chunk.items else "no inputs"


def _bad_examples(manifest: Manifest, count: int = 3) -> str:
    bad = [b for record in manifest.records() for b in record["bad"]][:count]
    return "; ".join(f"{b['source']}: {b['error']}" for b in bad)


def check_bad_inputs(uri: str, manifest: Manifest, max_fraction: float) -> None:
    """DataError when more than `max_fraction` of the inputs were unusable (a systematic cause: captions
    missing, image paths that do not resolve, a decoder missing); the data set then stays incomplete."""
    inputs = sum(record["inputs"] for record in manifest.records())
    if manifest.bad_inputs > max_fraction * inputs:
        raise DataError(f"{uri}: {manifest.bad_inputs} of {inputs} inputs are unusable (over data.max_bad_fraction="
                        f"{max_fraction:g}), e.g. {_bad_examples(manifest)}; every one is listed under its shard in "
                        f"{uri}/manifest.json. Fix the source and prepare it into another data.uri, or accept them "
                        "with a higher data.max_bad_fraction (the shards are kept: a rerun only completes the data "
                        "set)")


def _resume(uri: str, settings: dict, num_shards: int) -> Manifest:
    """`Manifest.resume`; a complete data set prepared before samples were permuted (settings without
    `sample_order`, otherwise the same) is taken as it is (class order: `warn_if_class_sorted` says so)
    while storage holds all its shards: a missing one cannot be made again in that order (ManifestError)."""
    try:
        return Manifest.resume(uri, settings, num_shards, drop_missing=True)
    except ManifestError:
        old = Manifest.read(uri)
        if not (old.complete and "sample_order" not in old.settings and
                {**old.settings, "sample_order": settings["sample_order"]} == settings):
            raise
        bad = unverified(uri, old.records())
        if bad:
            raise ManifestError(f"{uri} was prepared before samples were permuted, and {len(bad)} of its shards are "
                                f"missing or not of their recorded size ({', '.join(bad[:5])}"
                                f"{' ...' if len(bad) > 5 else ''}); they cannot be made again in that order: prepare "
                                "it again into another data.uri (or remove that folder)") from None
        return old


def warn_if_class_sorted(uri: str, manifest: Manifest) -> None:
    """log.warning naming `uri` when its shards are class-sorted (`Manifest.class_order`)."""
    if (found := manifest.class_order()) is not None:
        log.warning("%s: %s", uri, found)
