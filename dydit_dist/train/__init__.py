"""Fine-tuning: the training step, DeepSpeed engine wiring, partitioned EMA, checkpoints, Ray Train glue.

- `loop.train_loop_per_worker(config_dict)`: what Ray Train runs on every worker (`jobs/finetune.py`).
- `network.build_network(cfg.model)` + `network.latest_ema(run_url)`: the sampler's way to the
  exported EMA weights (`{run}/checkpoints/ema-{step:07d}.safetensors`, pointer `ema-latest.json`).
"""

from dydit_dist.train.network import build_network, init_weights, latest_ema

__all__ = ["build_network", "init_weights", "latest_ema"]
