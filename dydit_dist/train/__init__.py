"""Fine-tuning: the training step, DeepSpeed engine wiring, partitioned EMA, checkpoints, Ray Train glue.

- `launcher.build_trainer(cfg)`: the driver's Ray Train `TorchTrainer` (`jobs/finetune.py`).
- `worker.train_loop_per_worker(config_dict)`: what Ray Train runs on every worker.
- `loop.Trainer(cfg, session)`: the trainer of one rank; `step`: one step's math; `metrics`: its log
  window; `checkpoints`: resumable checkpoints and the exported EMA weights.

The network and its weights (`build_network`, `init_weights`, `latest_ema`) are `dydit_dist.network`'s.
"""
