"""DeepSpeed's communication settings come from the config; ZeRO-3 for a model that fits without it warns."""

from __future__ import annotations

from dydit_dist import config as config_lib
from dydit_dist.train.deepspeed_setup import ds_config, zero3_unneeded


def test_comm_settings_reach_the_deepspeed_config():
    cfg = config_lib.load("dit_xl2_256")
    zero = ds_config(cfg, 8)["zero_optimization"]
    assert zero == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 200_000_000,
                    "allgather_bucket_size": 200_000_000}
    three = ds_config(config_lib.load("debug", ["deepspeed.zero_stage=3", "deepspeed.overlap_comm=true"]), 2)
    assert "allgather_bucket_size" not in three["zero_optimization"]  # ZeRO-3 gathers by its own prefetch buckets
    assert "overlap_comm" not in ds_config(config_lib.load("debug", ["deepspeed.zero_stage=0"]), 2)["zero_optimization"]


def test_zero3_warns_for_dit_xl2_on_a_large_gpu_only():
    h200 = 141 * 2**30
    message = zero3_unneeded(675_000_000, 8, h200)
    assert message.startswith("deepspeed.zero_stage=3 for a model of 675M parameters: under ZeRO-2")
    assert "3.5 GiB per rank of 141 GiB on 8 ranks" in message and "set deepspeed.zero_stage=2" in message
    assert zero3_unneeded(675_000_000, 8, 4 * 2**30) is None  # a 4 GiB device: ZeRO-3 is worth it
