"""Where a run's outputs and its data live: the one place that knows the layout under `storage.root`.

    paths = RunPaths(cfg)
    {root}/runs/{run}/                      paths.url (run = storage.run)
        config.{job}.yaml                   paths.config(job): the resolved config of the job's latest run
        config-history/{job}-{n:03d}.yaml   paths.config_version(job, n): every distinct config it ran with
        lease/NNNNNNNNNN.json               paths.lease: the one writer's lease (`dydit_dist.lease`)
        checkpoints/                        paths.checkpoints: DeepSpeed checkpoints + exported EMA weights
        tensorboard/                        paths.tensorboard
        batches/rank-R/step-S.json          paths.batch_record(rank, step): the samples of a step (debugging)
        faults/rank-R-step-S.json           paths.fault_marker(rank, step): an injected fault, fired once
        samples/                            paths.samples: generated shards + manifest (`shardset`)
        metrics.json                        paths.metrics
        report.md, plots/                   paths.report, paths.plot(name)
        eb_cache/{name}                     paths.eb_cache(name): calibrated EB-Cache tables
        {name}.safetensors                  paths.weights(name): weights a run trains on the side
    {root}/data/{run}/  (or data.uri)       paths.data: prepared shards + manifest (`shardset`)
        prepare.config.yaml                 paths.data_config
        lease/NNNNNNNNNN.json               paths.data_lease: the lease of whoever prepares it
    {root}/sources/{name}/                  paths.source(name): built-in sources, materialized
    {root}/references/{key}/features.npz    paths.reference_features(key): cached reference features
"""

from __future__ import annotations

from dataclasses import dataclass

from dydit_dist import storage
from dydit_dist.config import Config

CHECKPOINTS = "checkpoints"  # the checkpoints folder's name in a run folder (Ray Train's run name)
EMA_POINTER = "ema-latest.json"  # in {run}/checkpoints/: {"step", "file", "url"} of the newest EMA export


def ema_pointer(run_url: str) -> str:
    """`{run_url}/checkpoints/ema-latest.json`: the newest EMA export of any run folder."""
    return storage.join(run_url, CHECKPOINTS, EMA_POINTER)


@dataclass(frozen=True, init=False)
class RunPaths:
    """The URLs of one run (`storage.root`, `storage.run`) and its data (`data.uri`); see the module docstring."""

    root: str
    url: str  # {root}/runs/{run}
    data: str  # data.uri, or {root}/data/{run}

    def __init__(self, cfg: Config):
        root, run = cfg.storage.root, cfg.storage.run
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "url", storage.join(root, "runs", run))
        object.__setattr__(self, "data", cfg.data.uri or storage.join(root, "data", run))

    def config(self, job: str) -> str:
        return storage.join(self.url, f"config.{job}.yaml")

    def config_version(self, job: str, n: int) -> str:
        return storage.join(self.url, "config-history", f"{job}-{n:03d}.yaml")

    @property
    def lease(self) -> str:
        return storage.join(self.url, "lease")

    @property
    def checkpoints(self) -> str:
        return storage.join(self.url, CHECKPOINTS)

    @property
    def ema_pointer(self) -> str:
        return ema_pointer(self.url)

    @property
    def tensorboard(self) -> str:
        return storage.join(self.url, "tensorboard")

    def batch_record(self, rank: int, step: int) -> str:
        return storage.join(self.url, "batches", f"rank-{rank:05d}", f"step-{step:07d}.json")

    def fault_marker(self, rank: int, step: int) -> str:
        return storage.join(self.url, "faults", f"rank-{rank:05d}-step-{step:07d}.json")

    @property
    def samples(self) -> str:
        return storage.join(self.url, "samples")

    @property
    def metrics(self) -> str:
        return storage.join(self.url, "metrics.json")

    @property
    def report(self) -> str:
        return storage.join(self.url, "report.md")

    def plot(self, name: str) -> str:
        return storage.join(self.url, "plots", name)

    def relative(self, url: str) -> str:
        """`url` (inside the run folder) relative to it: how report.md links its plots."""
        prefix = self.url.rstrip("/") + "/"
        if not url.startswith(prefix):
            raise ValueError(f"{url} is not inside the run folder {self.url}")
        return url[len(prefix) :]

    def eb_cache(self, name: str) -> str:
        return storage.join(self.url, "eb_cache", name)

    def weights(self, name: str) -> str:
        return storage.join(self.url, f"{name}.safetensors")

    @property
    def data_config(self) -> str:
        return storage.join(self.data, "prepare.config.yaml")

    @property
    def data_lease(self) -> str:
        return storage.join(self.data, "lease")

    def source(self, name: str) -> str:
        return storage.join(self.root, "sources", name)

    def reference_features(self, key: str) -> str:
        return storage.join(self.root, "references", key, "features.npz")
