"""`{run}/samples/manifest.json`: which shards of a sampling job are finished, and how they were made.

    {
      "format": "dydit_dist.samples/1",
      "complete": true,                  # every planned shard is in "shards"
      "settings": {...},                 # everything that decides the samples (model, checkpoint,
                                         # method, sampler, steps, guidance, seed, N, S, batch size)
      "settings_sha256": "...",
      "num_shards": 50, "num_samples": 50000,   # planned shards; samples in finished shards
      "shards": [{"index": 0, "name": "shard-000000.tar", "start": 0, "count": 1000, "sha256": ...,
                  "bytes": ..., "actor": ..., "timing": {"sample_s": .., "encode_s": .., "write_s": ..}}],
      "stats": {"gflops": ..., "model_load_s": [...], "width_by_timestep": ...}
    }

Only the driver writes the manifest. An actor that finishes a shard writes the shard, then one marker
object `done/shard-{i:06d}.json` holding its record; the driver merges markers into the manifest. Two
actors finishing at once never touch the same object, so no update is lost, and a driver that died
before writing the manifest loses nothing: the next run merges the markers it finds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from dydit_dist import storage

FORMAT = "dydit_dist.samples/1"
MANIFEST = "manifest.json"
MARKERS = "done"


class SamplesError(ValueError):
    """A samples folder that does not hold what was asked for (named in the message)."""


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass
class SamplesManifest:
    settings: dict
    num_shards: int
    shards: dict[int, dict] = field(default_factory=dict)  # index -> record
    stats: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.num_shards

    @property
    def num_samples(self) -> int:
        return sum(r["count"] for r in self.shards.values())

    def add(self, record: dict) -> None:
        self.shards[int(record["index"])] = record

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "complete": self.complete,
            "settings": self.settings,
            "settings_sha256": settings_digest(self.settings),
            "num_shards": self.num_shards,
            "num_samples": self.num_samples,
            "shards": [self.shards[i] for i in sorted(self.shards)],
            "stats": self.stats,
        }

    @classmethod
    def from_json(cls, value: dict, url: str) -> SamplesManifest:
        if not isinstance(value, dict) or value.get("format") != FORMAT:
            raise SamplesError(f"{url} is not a {FORMAT} manifest (format: {value.get('format')!r})")
        shards = {int(r["index"]): r for r in value["shards"]}
        return cls(value["settings"], value["num_shards"], shards, value.get("stats", {}))


def manifest_url(samples_url: str) -> str:
    return storage.join(samples_url, MANIFEST)


def marker_url(samples_url: str, index: int) -> str:
    return storage.join(samples_url, MARKERS, f"shard-{index:06d}.json")


def write_marker(samples_url: str, record: dict) -> None:
    storage.write_json(marker_url(samples_url, record["index"]), record)


def read_manifest(samples_url: str) -> SamplesManifest:
    """The manifest of a samples folder (FileNotFoundError when there is none)."""
    url = manifest_url(samples_url)
    return SamplesManifest.from_json(storage.read_json(url), url)


def _differences(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} there vs {b.get(k)!r} now" for k in keys if a.get(k) != b.get(k)]


def resume(samples_url: str, settings: dict, num_shards: int) -> SamplesManifest:
    """The manifest to continue: what the folder's manifest and markers say is done.

    Raises SamplesError when the folder holds samples made with other settings (they would mix).
    """
    digest = settings_digest(settings)
    try:
        manifest = read_manifest(samples_url)
    except FileNotFoundError:
        manifest = SamplesManifest(settings, num_shards)
    if manifest.settings != settings:
        diff = "; ".join(_differences(manifest.settings, settings))
        raise SamplesError(f"{samples_url} holds samples made with other settings ({diff}); "
                           "sample into another storage.run or remove that folder")
    for url in storage.listdir(storage.join(samples_url, MARKERS)):
        if not url.endswith(".json"):
            continue
        record = storage.read_json(url)
        if record.get("settings_sha256") != digest:
            raise SamplesError(f"{url} records a shard made with other settings; "
                               "sample into another storage.run or remove that folder")
        manifest.add(record)
    return manifest


def write_manifest(samples_url: str, manifest: SamplesManifest) -> None:
    storage.write_json(manifest_url(samples_url), manifest.to_json())
