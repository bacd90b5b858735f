"""Sampling fan-out: N samples planned into shards, made by a pool of Ray actors, one object per shard.

    manifest = run_sampling(cfg)                              # {run}/samples/shard-*.tar + manifest.json
    export_adm_npz(RunPaths(cfg).samples, "samples.npz")      # the ADM evaluator's format
"""

from .export import export_adm_npz, iter_npz_array, iter_samples
from .manifest import SamplesError, SamplesManifest
from .plan import ShardSpec, class_label, plan_shards, sample_generators, sample_seed
from .pool import run_sampling, sampling_settings
from .shards import GeneratedSample, iter_shard, pack, unpack

__all__ = [
    "GeneratedSample",
    "SamplesError",
    "SamplesManifest",
    "ShardSpec",
    "class_label",
    "export_adm_npz",
    "iter_npz_array",
    "iter_samples",
    "iter_shard",
    "pack",
    "plan_shards",
    "run_sampling",
    "sample_generators",
    "sample_seed",
    "sampling_settings",
    "unpack",
]
