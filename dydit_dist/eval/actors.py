"""The features of a samples folder, shard by shard, in Ray actors (or in this process).

    feats = sample_features(cfg, url, manifest, captions, local)   # {layer: (N, D)}, "clip": (N,)

`eval.num_actors` actors (1 CPU share of `ray.cpus_per_worker` and, with `ray.use_gpu`, a GPU share of
`ray.gpus_per_worker` each) are started once the cluster has room for them (`capacity.acquire`: a job
configured for GPUs waits for them and never falls back to CPU). Each pulls one shard of the samples
folder at a time and returns its features: the extractor's layers, sFID's spatial tap and the CLIP
scores of the same forward. The driver only puts the shards' rows back in index order.
`eval.num_actors: 0` runs the same shards one after the other in this process, with the driver's
extractor (no Ray): tests, and a machine without a cluster.

Both paths cut the images into the same batches (from the start of each shard), so they give the same
features row for row and the same metrics. Inside a shard the PNGs are decoded by a thread while the
extractor runs on the batch before (`prefetched`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dydit_dist import storage
from dydit_dist.capacity import ActorPool, Need, check_gpu, connect_ray, death_cause
from dydit_dist.config import Config
from dydit_dist.faults import Stalled, StallWatch, on_device_error
from dydit_dist.sample.shards import iter_shard, to_rgb

from .clip import ClipScorer
from .extractors import resolve_extractor
from .features import extract_features
from .metrics import EvalInputError

log = logging.getLogger(__name__)
CLIP = "clip"  # the key of the CLIP scores (N,) among the features


def prefetched(items: Iterable, depth: int = 2) -> Iterator:
    """`items`, produced by a background thread up to `depth` ahead of the consumer; an exception of the
    producer is raised in the consumer."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def fill() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                buffer.put((True, item))
            buffer.put((False, None))
        except Exception as err:  # noqa: BLE001 - handed to the consumer
            buffer.put((False, err))

    thread = threading.Thread(target=fill, name="decode", daemon=True)
    thread.start()
    try:
        while True:
            more, item = buffer.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full buffer
            try:
                buffer.get(timeout=0.1)
            except queue.Empty:
                pass


def _shard_batches(url: str, record: dict, batch_size: int) -> Iterator[tuple[np.ndarray, list, list[str] | None]]:
    """(uint8 (B, H, W, 3) images, their indices, their prompts or None) of one shard of a samples folder,
    checked against its record (`iter_shard`: its samples and its bytes)."""
    images, indices, prompts = [], [], []
    for s in iter_shard(storage.join(url, record["name"]), record):
        images.append(to_rgb(s.image))
        indices.append(s.index)
        prompts.append(s.meta.get("prompt"))
        if len(images) == batch_size:
            yield np.stack(images), indices, prompts
            images, indices, prompts = [], [], []
    if images:
        yield np.stack(images), indices, prompts


@dataclass
class FeaturePass:
    """One process's extractor (and CLIP scorer): the features of one shard at a time."""

    module: torch.nn.Module
    device: str
    batch_size: int
    spatial: object = None  # extractors.SpatialTap for sFID, else None
    scorer: object = None  # clip.ClipScorer for the clip metric, else None
    prompts: bool = False  # eval.protocol=coco: every sample must record its prompt

    def __call__(self, url: str, record: dict, captions: list[str] | None) -> dict[str, torch.Tensor]:
        """{layer: (n, D)} of the shard's n images (+ CLIP: (n,) scores); with `captions` (the reference's
        caption of each of the shard's indices, in order) every sample's prompt is checked against it."""
        scores: list[torch.Tensor] = []

        def images() -> Iterator[np.ndarray]:
            for batch, indices, prompts in prefetched(_shard_batches(url, record, self.batch_size)):
                if self.prompts and None in prompts:
                    raise EvalInputError(f"{url}: sample {indices[prompts.index(None)]} records no prompt; a "
                                         "text-to-image evaluation needs samples of a text-to-image model "
                                         "(sample.prompts)")
                if captions is not None:
                    for i, prompt in zip(indices, prompts, strict=True):
                        caption = captions[i - record["start"]]
                        if prompt != caption:
                            raise EvalInputError(f"{url}: sample {i} was drawn from {prompt!r}, the reference's image "
                                                 f"{i} has the caption {caption!r}; sample with sample.prompts set to "
                                                 "the captions file made with the reference")
                if self.scorer is not None:
                    scores.append(self.scorer(batch, prompts))
                yield batch

        feats = extract_features(images(), self.module, self.device, spatial=self.spatial)
        if self.scorer is not None:
            feats[CLIP] = torch.cat(scores)
        return feats


def make_pass(cfg: Config, device: str, module: torch.nn.Module | None = None) -> FeaturePass:
    """The FeaturePass of `cfg.eval` on `device` (with `module`, the extractor already made)."""
    e = cfg.eval
    extractor = resolve_extractor(e)
    module = module if module is not None else extractor.create(device, e.metrics)
    scorer = ClipScorer.load(e.clip_model, cfg.storage.root, device) if "clip" in e.metrics else None
    return FeaturePass(module, device, e.batch_size, extractor.spatial if "sfid" in e.metrics else None, scorer,
                       prompts=e.protocol == "coco")


class FeatureWorker:
    """A Ray actor's FeaturePass, on its GPU (`ray.use_gpu`) or its CPUs; the driver keeps a second shard
    queued on it, so it starts the next one as soon as one is returned."""

    def __init__(self, cfg_dict: dict, use_gpu: bool):
        from dydit_dist import config as config_lib

        cfg = config_lib.from_dict(cfg_dict)
        storage.configure_from(cfg.storage)
        if use_gpu:
            check_gpu("evaluation actor")
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
        self.batch_size = cfg.eval.batch_size
        self.run = make_pass(cfg, "cuda" if use_gpu else "cpu")

    def features(self, url: str, record: dict, captions: list[str] | None) -> dict[str, torch.Tensor]:
        try:
            return self.run(url, record, captions)
        except Exception as err:  # noqa: BLE001 - device errors handled, the others re-raised
            on_device_error(err, f"evaluation actor on {record['name']}", (
                f"eval.batch_size={self.batch_size} does not fit; lower it (the features do not depend on it)"),
                EvalInputError)
            raise


def sample_features(cfg: Config, url: str, records: list[dict], captions: list[str] | None,
                    local: FeaturePass) -> dict[str, torch.Tensor]:
    """{layer: (N, D)} (and CLIP: (N,)) of every shard of `records` (a samples manifest's, in index order),
    from `eval.num_actors` actors, or from `local` in this process when it is 0."""

    def caption_slice(record: dict) -> list[str] | None:
        return None if captions is None else captions[record["start"] : record["start"] + record["count"]]

    expected = 0
    for record in records:
        if record["start"] != expected:
            raise EvalInputError(f"{url}: samples {expected}..{record['start'] - 1} are missing")
        expected += record["count"]
    if cfg.eval.num_actors == 0:
        parts = [local(url, r, caption_slice(r)) for r in records]
    else:
        parts = _on_actors(cfg, url, records, caption_slice)
    if not parts:
        raise EvalInputError(f"{url}: no images to extract features from")
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def _on_actors(cfg: Config, url: str, records: list[dict], caption_slice,
               on_part: Callable[[list], None] | None = None) -> list[dict[str, torch.Tensor]]:
    """Every shard's features from the actors, pulled one shard at a time (two in flight per actor).

    An actor that is lost (a lost node, or only unreachable for a while) is killed and replaced
    (`capacity.ActorPool.replace`), and every shard it held goes back to the queue once: its calls leave `pending`
    together, so a late answer of the lost actor is never read. An error of the feature code itself (a
    corrupt shard, a wrong prompt) stops the job. on_part(actors): called after each shard's features
    arrive (tests kill an actor there)."""
    import ray
    from ray.exceptions import ObjectLostError, RayActorError

    connect_ray(cfg.ray.address)
    r = cfg.ray
    keys = "eval.num_actors, ray.cpus_per_worker" + (", ray.gpus_per_worker" if r.use_gpu else "")
    need = Need("evaluation actors", min(cfg.eval.num_actors, len(records)), r.cpus_per_worker,
                r.gpus_per_worker if r.use_gpu else 0.0, keys)
    pool = ActorPool(FeatureWorker, (cfg.to_dict(), r.use_gpu), need, r.use_gpu, r.capacity_timeout_s, r.max_failures,
                     "evaluation actor", r.stall_factor)
    watch = StallWatch(r.stall_factor)  # each actor's running call: the one queued behind it starts after it
    try:  # no barrier on `ready`: an actor that dies starting (GpuUnavailable, a lost node) is replaced below
        todo = list(enumerate(records))[::-1]  # popped from the end: index order
        parts: dict[int, dict] = {}
        pending: dict = {}  # ObjectRef -> (actor, shard k)

        def top_up() -> None:
            for actor in pool.actors:
                while todo and sum(a == actor for a, _ in pending.values()) < 2:
                    k, record = todo.pop()
                    ref = actor.features.remote(url, record, caption_slice(record))
                    if not any(a == actor for a, _ in pending.values()):
                        watch.start(ref, actor)
                    pending[ref] = (actor, k)

        def lose(actor, k: int | None, err: Exception) -> None:
            """The actor dead, unreachable or stuck (its result's node lost): its shards back in the queue."""
            its = [ref for ref, (a, _) in pending.items() if a == actor]
            for ref in its:
                watch.forget(ref)
            lost = ([k] if k is not None else []) + [pending.pop(ref)[1] for ref in its]
            todo.extend((j, records[j]) for j in sorted(lost, reverse=True))
            log.warning("evaluation actor lost (%s); %d shards go back to the queue", death_cause(err), len(lost))
            pool.replace(actor, err)

        top_up()
        while pending:
            try:
                done = pool.wait(list(pending), watch)
            except Stalled as err:
                lose(pending[err.ref][0], None, err)
                top_up()
                continue
            actor, k = pending.pop(done)
            try:
                parts[k] = ray.get(done)
            except (RayActorError, ObjectLostError) as err:  # the actor, or the node holding its result, lost
                watch.forget(done)
                lose(actor, k, err)
            else:
                watch.finish(done)
                for ref in [ref for ref, (a, _) in pending.items() if a == actor]:  # its queued shard starts now
                    watch.start(ref, actor)
                if on_part is not None:
                    on_part(pool.actors)
            top_up()
        log.info("features of %d shards from %d evaluation actors (%d replaced)", len(records), need.count, pool.failures)
        return [parts[k] for k in range(len(records))]
    finally:
        pool.shutdown()
