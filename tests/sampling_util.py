"""Helpers of the sampling and evaluation tests: tiny configs and checkpoints with non-trivial weights."""

from __future__ import annotations

import torch

from dydit_dist import config
from dydit_dist.network import sampling_network
from dydit_dist.sample import pack, plan_shards, sampling_settings
from dydit_dist.sample.manifest import SamplesManifest
from dydit_dist.shardset import write_shard

# A few steps and samples of the debug model (16x16x4 pixels, 10 classes): a shard in ~0.1 s.
TINY = ["sample.steps=4", "sample.batch_size=4", "sample.shard_size=4", "sample.num_samples=16", "ray.max_failures=3"]


def tiny_config(root: str, *overrides: str) -> config.Config:
    return config.load("debug", [f"storage.root={root}", "storage.run=t", *TINY, *overrides])


def random_checkpoint(path: str, *overrides: str, seed: int = 0) -> str:
    """The debug network (with routers for model.method=dydit) with every weight drawn at random,
    so outputs depend on inputs and some DyDiT heads, groups and tokens are switched off."""
    cfg = config.load("debug", list(overrides))
    model = sampling_network(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.5 if "rate" in name or "token" in name else 0.05))
    from dydit_dist.network import save_weights

    save_weights(model, path)
    return path


def write_samples(cfg: config.Config, url: str) -> None:
    """Every shard of `cfg.sample` generated in this process (no Ray) and written to `url` with its manifest."""
    from dydit_dist.sample.generate import ShardGenerator

    gen = ShardGenerator(cfg)
    shards = plan_shards(cfg.sample.num_samples, cfg.sample.shard_size)
    manifest = SamplesManifest(sampling_settings(cfg), len(shards))
    for shard in shards:
        samples, timing = gen.generate(shard)
        record = write_shard(url, shard.index, pack(samples), shard.count, replace=True)  # a rewrite replaces
        manifest.add({**record, "start": shard.start, "timing": timing})
    manifest.stats.update(gen.stats())
    manifest.write(url)
