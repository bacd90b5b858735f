"""The streaming reader the trainer iterates: `LatentStream`, infinite batches from shards on any storage URL.

    stream = LatentStream(cfg.data.uri, batch_size=32, rank=rank, world_size=world, seed=cfg.train.seed,
                          num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
                          on_error=cfg.data.on_error, max_bad_fraction=cfg.data.max_bad_fraction)
    stream.load_state_dict(checkpoint["data"])     # or LatentStream(..., start_step=step)
    for batch in stream:                           # batch["x"]: (B, C, H, W) float32, ready for the model
        ...                                        # batch["y"]: (B,) int64, or batch["t5"]: (B, 1, L, C) as stored (fp16)
        checkpoint["data"] = stream.state_dict()   # and batch["t5_mask"]: (B, L) int64

`batch["index"]` (B,) int64 is each sample's position in the manifest's order (shard by shard), for
bookkeeping.

Shards are read whole through `storage` (fsspec: file://, s3://, memory://), checked against the
manifest's size and sha256, and split over ranks and DataLoader workers as `order` describes, so
every rank yields the same number of batches per epoch and training runs by steps, forever, over
reshuffled shards. Batch i of a rank comes from its worker i mod num_workers; a batch's samples are
a pure function of (seed, rank, step): `start_step` (or `load_state_dict`) resumes exactly.

Per sample, with `default_rng([seed, epoch, index, 2])`: the flipped latent is taken with
probability 1/2 (when prepared with `data.flip`), a `mean_std` latent is sampled as
mean + std * noise, and the result is multiplied by the manifest's scale factor (1 for pixel data,
which is therefore yielded unchanged).

`metrics()` reports the skipped shards and samples (counters) and, for class labels, the distinct
labels per batch, averaged over the batches yielded since the previous call (the trainer calls it
once per log window): about as many as i.i.d. draws when the shards are mixed (see
`data.sources`), far fewer when they are class-sorted.

A missing or corrupt shard raises `ShardError` naming it; with `on_error="skip"` it is skipped,
logged and counted, and later batches fill up from the next samples. Skipping is bounded, as prepare
bounds unusable inputs: a consumer that skips more than `max_bad_fraction` of the data set's samples in
one epoch (that share of the data is then unusable: a systematic cause), or a whole epoch's worth of
samples in a row without yielding one (its shards are gone: skipping would spin forever), raises a
`ShardError` naming the last shards it skipped. The counters count a skipped
sample where the stream passes its position (and a shard at the first of its samples), so they ride
with the batches and a resume, which starts after the positions passed, never counts one twice. A resume is
exact with skips too when it goes through `state_dict`, which records each worker's position and
the layout those positions hold under (the split over ranks and workers, the seed, the shuffle
buffer, the shards' counts and the settings that made them); `load_state_dict` refuses another layout
with a DataError.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dydit_dist.data.manifest import Manifest, read_manifest
from dydit_dist.data.order import per_consumer, segment, shuffle_order
from dydit_dist.data.shards import DataError, Decoded, check_sample, decode_sample
from dydit_dist.shardset import ShardError, read_shard, shard_url, unpack

log = logging.getLogger(__name__)

# Each layout key of `LatentStream.state_dict`, and the setting it comes from (named when a resume refuses it).
_SETTING = {"batch_size": "train.micro_batch_size", "rank": "ray.num_workers", "world_size": "ray.num_workers",
            "num_workers": "data.num_workers", "seed": "train.seed", "shuffle_buffer": "data.shuffle_buffer",
            "num_samples": "the shards at data.uri", "shards": "the shards at data.uri"}


class _Consumer:
    """The sample stream of one DataLoader worker of one rank: (position, sample) pairs, forever."""

    def __init__(self, uri: str, manifest: Manifest, seed: int, consumer: int, num_consumers: int,
                 shuffle_buffer: int, on_error: str, prefetch: int, max_bad_fraction: float):
        self.uri, self.settings, self.shards = uri, manifest.settings, manifest.records()
        self.counts = np.array([s["count"] for s in self.shards], dtype=np.int64)
        self.first_index = np.cumsum(self.counts) - self.counts  # global index of each shard's first sample
        self.q = per_consumer(int(self.counts.sum()), num_consumers)
        self.seed, self.consumer, self.num_consumers = seed, consumer, num_consumers
        self.shuffle_buffer, self.on_error, self.prefetch = shuffle_buffer, on_error, max(1, prefetch)
        self.skipped = (0, 0)  # (shards, samples) passed over since the last take_skipped()
        # on_error=skip's bound: more skipped samples in one epoch than max_bad_fraction of the data set
        self.max_bad_fraction = max_bad_fraction
        self.max_skipped = math.floor(max_bad_fraction * int(self.counts.sum()))
        self.unyielded = 0  # positions passed in a row without a sample yielded (across epochs)
        self.last_skipped: deque[str] = deque(maxlen=3)  # the last shards skipped, and why the last one was
        self.last_error = ""

    def take_skipped(self) -> tuple[int, int]:
        skipped, self.skipped = self.skipped, (0, 0)
        return skipped

    def samples(self, start: int):
        epoch, position = divmod(start, self.q)
        with ThreadPoolExecutor(max_workers=self.prefetch) as pool:
            while True:
                yield from self._epoch(pool, epoch, position)
                epoch, position = epoch + 1, 0

    def _fetch(self, shard: int) -> bytes:
        return read_shard(self.uri, self.shards[shard])

    def _epoch(self, pool: ThreadPoolExecutor, epoch: int, start: int):
        q = self.q
        order = shuffle_order(q, self.shuffle_buffer, self.seed, epoch, self.consumer)
        emitted_at = np.empty(q, dtype=np.int64)
        emitted_at[order] = np.arange(q)
        pieces = [p for p in segment(self.counts, self.seed, epoch, self.consumer, self.num_consumers)
                  if emitted_at[p.first : p.first + p.stop - p.start].max() >= start]
        futures = deque(pool.submit(self._fetch, p.shard) for p in pieces[: self.prefetch])
        pending: dict[int, tuple[Decoded, int]] = {}
        missing: set[int] = set()  # the slots of the shards skipped
        first_missing: set[int] = set()  # the slot of each skipped piece emitted first: its shard counts there
        position, skipped = start, 0
        for i, piece in enumerate(pieces):
            future = futures.popleft()
            if i + self.prefetch < len(pieces):
                futures.append(pool.submit(self._fetch, pieces[i + self.prefetch].shard))
            positions = range(piece.first, piece.first + piece.stop - piece.start)
            try:
                pending.update(self._load(future.result(), piece, positions, start, emitted_at))
            except ShardError as err:
                if self.on_error != "skip":
                    raise
                lost = sum(1 for p in positions if emitted_at[p] >= start)
                log.warning("skipping %s (%d samples): %s", shard_url(self.uri, piece.shard), lost, err)
                self.last_skipped.append(shard_url(self.uri, piece.shard))
                self.last_error = str(err)
                missing.update(positions)
                first_missing.add(min(positions, key=lambda p: emitted_at[p]))
            while position < q and (int(order[position]) in pending or int(order[position]) in missing):
                item = pending.pop(int(order[position]), None)
                if item is not None:
                    self.unyielded = 0
                    yield epoch * q + position, self._transform(*item, epoch)
                else:  # counted where the stream passes it, so a resume (which starts after it) never counts it again
                    shards, samples = self.skipped
                    self.skipped = (shards + (int(order[position]) in first_missing), samples + 1)
                    skipped, self.unyielded = skipped + 1, self.unyielded + 1
                    self._bound_skips(skipped, epoch)
                position += 1
        assert position == q, f"consumer {self.consumer} stopped at {position} of {q} in epoch {epoch}"

    def _bound_skips(self, skipped: int, epoch: int) -> None:
        """ShardError once `skipped` samples of this epoch exceed max_bad_fraction of the data set, or a whole
        epoch's worth of positions passed without a sample: without it on_error=skip would loop forever over
        shards that are all gone, yielding nothing and raising nothing."""
        remedy = "rerun the prepare job with the same config to remake them"
        if self.unyielded >= self.q:
            why = f"no sample in {self.unyielded} positions in a row, a whole epoch of its {self.q}"
        elif skipped > self.max_skipped:
            why = (f"{skipped} of its {self.q} samples of epoch {epoch} skipped, over data.max_bad_fraction="
                   f"{self.max_bad_fraction:g} of the {int(self.counts.sum())} samples of the data set")
            remedy += ", or set data.max_bad_fraction higher to train without them"
        else:
            return
        raise ShardError(f"data.on_error=skip: reader {self.consumer} of {self.num_consumers} (rank x data.num_workers "
                         f"+ worker) gave up: {why}; last shards skipped: {', '.join(self.last_skipped)} (the last: "
                         f"{self.last_error}); {remedy}")

    def _load(self, data: bytes, piece, positions: range, start: int, emitted_at: np.ndarray) -> dict:
        url = shard_url(self.uri, piece.shard)
        samples = unpack(data, url)
        if len(samples) != self.counts[piece.shard]:
            raise ShardError(f"corrupt shard {url}: {len(samples)} samples, the manifest says "
                             f"{self.counts[piece.shard]}")
        first = int(self.first_index[piece.shard])
        out = {}
        for k, p in enumerate(positions):
            if emitted_at[p] >= start:
                files = samples[piece.start + k]
                sample = decode_sample(files, url)
                check_sample(sample, self.settings, url, files.get("__key__", b"?").decode())
                out[p] = (sample, first + piece.start + k)
        return out

    def _transform(self, sample: Decoded, index: int, epoch: int) -> dict:
        s = self.settings
        rng = None
        if s["flip"] or s["latent_storage"] == "mean_std":
            rng = np.random.default_rng([self.seed, epoch, index, 2])
        latent = sample.latent_flip if s["flip"] and rng.random() < 0.5 else sample.latent
        x = latent.astype(np.float32)
        if s["latent_storage"] == "mean_std":
            x = x[0] + x[1] * rng.standard_normal(x.shape[1:], dtype=np.float32)  # (C, h, w)
        if s["scale_factor"] != 1.0:
            x *= np.float32(s["scale_factor"])
        out = {"x": x, "index": index}
        if sample.label is not None:
            out["y"] = sample.label
        if sample.t5 is not None:
            out["t5"], out["t5_mask"] = sample.t5, sample.t5_mask
        return out


def _collate(samples: list[dict], settings: dict) -> dict:
    out = {"x": torch.from_numpy(np.stack([s["x"] for s in samples])),  # (B, C, H, W)
           "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64)}
    if settings["conditioning"] == "class":
        out["y"] = torch.tensor([s["y"] for s in samples], dtype=torch.int64)
    else:
        # In the stored dtype (fp16: 1 MB per 120-token caption): the train step casts on its device. A float32
        # batch was twice the bytes through the workers' shared memory and a cast per element here, which
        # capped a DataLoader worker at ~125 samples/s (benchmarks/data_throughput.py).
        t5 = np.zeros((len(samples), 1, settings["text_len"], settings["text_dim"]), dtype=samples[0]["t5"].dtype)
        for i, s in enumerate(samples):
            t5[i, 0, : len(s["t5"])] = s["t5"]  # stored without the padding rows
        out["t5"] = torch.from_numpy(t5)  # (B, 1, L, C)
        out["t5_mask"] = torch.from_numpy(np.stack([s["t5_mask"] for s in samples]).astype(np.int64))  # (B, L)
    return out


class _Batches(IterableDataset):
    """Batches of one rank's workers; DataLoader worker j plays logical worker (j + rotation) mod W."""

    def __init__(self, uri, manifest, batch_size, rank, num_workers, world_size, seed, shuffle_buffer,
                 on_error, prefetch, positions, rotation, max_bad_fraction):
        super().__init__()
        self.uri, self.manifest, self.batch_size = uri, manifest, batch_size
        self.rank, self.num_workers, self.world_size, self.seed = rank, num_workers, world_size, seed
        self.shuffle_buffer, self.on_error, self.prefetch = shuffle_buffer, on_error, prefetch
        self.positions, self.rotation, self.max_bad_fraction = positions, rotation, max_bad_fraction

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.num_workers
        consumer = _Consumer(self.uri, self.manifest, self.seed, self.rank * self.num_workers + worker,
                             self.world_size * self.num_workers, self.shuffle_buffer, self.on_error, self.prefetch,
                             self.max_bad_fraction)
        batch = []
        for position, sample in consumer.samples(self.positions[worker]):
            batch.append(sample)
            if len(batch) == self.batch_size:
                out = _collate(batch, self.manifest.settings)
                out.update(_worker=worker, _position=position + 1, _skipped=consumer.take_skipped())
                yield out
                batch = []


class LatentStream:
    """Infinite batches of one rank, deterministic for (seed, rank, step); see the module docstring."""

    def __init__(self, uri: str, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_step: int = 0, num_workers: int = 2, shuffle_buffer: int = 1000, on_error: str = "raise",
                 prefetch_shards: int = 2, pin_memory: bool = False, multiprocessing_context: str | None = None,
                 max_bad_fraction: float = 0.01):
        if batch_size < 1 or not 0 <= rank < world_size or num_workers < 0 or start_step < 0:
            raise ValueError(f"need batch_size >= 1, 0 <= rank < world_size, num_workers >= 0, start_step >= 0; "
                             f"got {batch_size}, {rank}, {world_size}, {num_workers}, {start_step}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r} is not one of ['raise', 'skip']")
        self.uri, self.manifest = uri, read_manifest(uri)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.num_workers, self.loader_workers = max(1, num_workers), num_workers
        self.shuffle_buffer, self.on_error, self.prefetch = shuffle_buffer, on_error, prefetch_shards
        self.max_bad_fraction = max_bad_fraction  # on_error=skip: the share of the data an epoch may skip
        self.pin_memory, self.multiprocessing_context = pin_memory, multiprocessing_context
        self.samples_per_epoch = self.num_workers * per_consumer(self.manifest.num_samples,
                                                                 world_size * self.num_workers)
        self.skipped_shards, self.skipped_samples = 0, 0
        # the counts and what made them, not the bytes: a shard remade as the sha256 mismatch says (on another GPU,
        # maybe not bit for bit) holds the same samples at the same positions
        shards = json.dumps([[r["count"] for r in self.manifest.records()], self.manifest.settings], sort_keys=True)
        self._shards_digest = hashlib.sha256(shards.encode()).hexdigest()[:16]
        self._classes, self._batches = 0, 0  # distinct labels summed over the batches since metrics()
        self.seek(start_step)

    def seek(self, step: int) -> None:
        """Continue at `step` (exact when no shard was skipped before it; else use load_state_dict)."""
        self.step = step
        self.positions = [(step - w + self.num_workers - 1) // self.num_workers * self.batch_size
                          for w in range(self.num_workers)]

    def _layout(self) -> dict:
        """What the saved positions mean something under: the split over ranks and workers, the sample
        order (`shuffle_order(q, shuffle_buffer, seed, ...)`) and the shards (a digest of their counts, in
        order, and of the data settings that made them)."""
        return {"batch_size": self.batch_size, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.num_workers, "seed": self.seed, "shuffle_buffer": self.shuffle_buffer,
                "num_samples": self.manifest.num_samples, "shards": self._shards_digest}

    def state_dict(self) -> dict:
        return {"step": self.step, "positions": list(self.positions), "skipped_shards": self.skipped_shards,
                "skipped_samples": self.skipped_samples, "layout": self._layout()}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the positions of `state`; DataError naming each layout key that changed since.
        Only the keys `state` has are compared: a checkpoint saved before the layout held
        `shuffle_buffer` and `shards` resumes as it did then."""
        saved = state["layout"]
        changed = [f"{k} ({_SETTING[k]}): {saved[k]!r} -> {v!r}" for k, v in self._layout().items()
                   if k in saved and saved[k] != v]
        if changed:
            raise DataError("the data stream cannot resume from the checkpoint: its positions only hold under the "
                            f"layout they were saved with, which changed (checkpoint -> now: {'; '.join(changed)}); "
                            "restore those settings, or start a new storage.run")
        self.step, self.positions = state["step"], list(state["positions"])
        self.skipped_shards, self.skipped_samples = state["skipped_shards"], state["skipped_samples"]

    def metrics(self) -> dict:
        """Skip counters, and `data/classes_per_batch` over the batches since the last call (class labels)."""
        out = {"data/skipped_shards": self.skipped_shards, "data/skipped_samples": self.skipped_samples}
        if self._batches:
            out["data/classes_per_batch"] = self._classes / self._batches
        self._classes, self._batches = 0, 0
        return out

    def __iter__(self):
        dataset = _Batches(self.uri, self.manifest, self.batch_size, self.rank, self.num_workers, self.world_size,
                           self.seed, self.shuffle_buffer, self.on_error, self.prefetch, list(self.positions),
                           rotation=self.step % self.num_workers, max_bad_fraction=self.max_bad_fraction)
        if self.loader_workers == 0:
            batches = iter(dataset)
        else:
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.loader_workers,
                                      pin_memory=self.pin_memory, multiprocessing_context=self.multiprocessing_context))
        for batch in batches:
            worker = batch.pop("_worker")
            assert worker == self.step % self.num_workers, f"batch of worker {worker} at step {self.step}"
            self.positions[worker] = batch.pop("_position")
            shards, samples = batch.pop("_skipped")
            self.skipped_shards, self.skipped_samples = self.skipped_shards + int(shards), self.skipped_samples + int(samples)
            if "y" in batch:
                self._classes, self._batches = self._classes + len(torch.unique(batch["y"])), self._batches + 1
            self.step += 1
            yield batch
