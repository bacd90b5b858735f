"""The sample job's SD-XL path on a local Ray instance: the actors build the pipeline from the folder and
write the same samples as one process does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sdxl_util import tiny_sdxl
from test_sdxl import sdxl_config

from dydit_dist.sample import iter_samples, plan_shards, run_sampling
from dydit_dist.sample.sdxl import SDXLShardGenerator

pytestmark = pytest.mark.integration


def test_sdxl_samples_through_the_actor_pool(ray_local, tmp_path):
    folder = tiny_sdxl(str(tmp_path / "pipeline"))
    cfg = sdxl_config(tmp_path, folder, "sample.method=at_edm", "sample.at_edm.ratio=0.5", "sample.num_actors=1")
    manifest = run_sampling(cfg)
    assert manifest.complete and manifest.num_samples == 4 and manifest.stats["gflops"] > 0
    made = {s.index: s for s in iter_samples(f"file://{tmp_path}/runs/t/samples")}
    assert sorted(made) == [0, 1, 2, 3]
    torch.set_num_threads(1)
    local = SDXLShardGenerator(cfg)
    for shard in plan_shards(4, cfg.sample.shard_size):
        samples, _ = local.generate(shard)
        for s in samples:  # uint8 images: the actor's and this process's agree to a rounding step
            assert s.meta == made[s.index].meta
            assert np.abs(s.image.astype(int) - made[s.index].image.astype(int)).max() <= 1
