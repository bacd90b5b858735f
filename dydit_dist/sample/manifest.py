"""`{run}/samples/manifest.json`: which shards of a sampling job are finished, and how they were made.

    {
      "format": "dydit_dist.samples/1",
      "complete": true,                  # every planned shard is in "shards"
      "settings": {...},                 # everything that decides the samples (model, checkpoint,
                                         # method, sampler, steps, guidance, seed, N, S, batch size)
      "settings_sha256": "...",
      "num_shards": 391, "num_samples": 50000,  # planned shards; samples in finished shards
      "shards": [{"index": 0, "name": "shard-000000.tar", "start": 0, "count": 128, "sha256": ...,
                  "bytes": ..., "settings_sha256": ..., "actor": ..., "gflops": ...,
                  "timing": {"sample_s": .., "encode_s": .., "write_s": ..}}],
      "stats": {"gflops": ..., "model_load_s": [...], "width_by_timestep": ..., "speculative_copies": ...}
    }

A shard's "gflops" is the method's GFLOPs per network forward of one image, averaged over its samples
(DyDiT's token count, and so its FLOPs, differ from batch to batch); the stats' "gflops" is their
mean over every sample of the folder (`SamplesManifest.gflops`). Shard 0's record also holds a
DyDiT's "width_by_timestep" (the same for every shard), which the stats take from there. Both come
from the records, which the done-markers keep, so a driver that died after the last marker loses
neither. The other stats are the driver's own.

A samples folder is a `dydit_dist.shardset` shard set: an actor writes each shard it finishes, then
its done-marker; the driver alone writes the manifest, merging the markers (`SamplesManifest.resume`),
and writes it only once its actors are ready. Readers check each shard's sha256 as they stream it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dydit_dist.shardset import ShardManifest, settings_digest


class SamplesError(ValueError):
    """A samples folder that does not hold what was asked for (named in the message)."""


@dataclass
class SamplesManifest(ShardManifest):
    FORMAT: ClassVar[str] = "dydit_dist.samples/1"
    error: ClassVar[type[ValueError]] = SamplesError
    ELSEWHERE: ClassVar[str] = "sample into another storage.run"
    LEGACY: ClassVar[dict] = {"labels": "balanced"}  # classes were k % num_classes before `sample.labels`

    stats: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.num_shards

    def gflops(self) -> float | None:
        """GFLOPs per network forward of one image, the mean over the samples of every recorded shard that
        holds its own (None when none does)."""
        counted = [(r["gflops"], r["count"]) for r in self.records() if r.get("gflops") is not None]
        if not counted:
            return None
        return sum(g * n for g, n in counted) / sum(n for _, n in counted)

    def _extra_json(self) -> dict:
        return {"settings_sha256": settings_digest(self.settings), "stats": self.stats}

    @classmethod
    def _extra_fields(cls, value: dict) -> dict:
        return {"stats": value.get("stats", {})}
