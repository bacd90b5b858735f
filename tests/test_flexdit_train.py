"""FlexDiT in the jobs: the config, the training step with per-rank timestep intervals (no Ray), the
sampling method, and a 2-worker CPU fine-tune of the debug model through `jobs.finetune`."""

from __future__ import annotations

import pytest
import torch

from dydit_dist import config as config_lib
from dydit_dist.accel import FlexDiTRunner, build_runner
from dydit_dist.config import ConfigError
from dydit_dist.dynamic.flexdit import FlexDiT
from dydit_dist.models import build_model, load_into
from dydit_dist.network import build_network, init_weights, latest_ema, read_weights, save_weights
from dydit_dist.train.step import DiffusionObjective, draw_inputs, step_generator

# The debug model has 8x8 tokens: t < 500 -> 6x6 sparse tokens, t >= 500 -> 4x4 (layout "CSRD").
FLEX = ["model.method=flexdit", "model.flexdit.grid_sizes=[6,4]", "model.flexdit.num_intervals=2"]


def _static_checkpoint(path) -> str:
    torch.manual_seed(0)
    static = build_model("debug", input_size=16, in_channels=4, num_classes=10)
    with torch.no_grad():  # a "pretrained" model: the official init zeroes adaLN and the output layer
        for p in static.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_weights(static.state_dict(), str(path))
    return str(path)


def test_config_validates_the_flexdit_section():
    cfg = config_lib.load("debug", ["ray.num_workers=1", *FLEX])
    assert cfg.model.flexdit.grid_sizes == (6, 4)
    with pytest.raises(ConfigError, match=r"model.flexdit: grid_sizes \[10, 9, 8, 7, 6\] must lie in 1..8"):
        config_lib.load("debug", ["ray.num_workers=1", "model.method=flexdit"])
    with pytest.raises(ConfigError, match="layout"):
        config_lib.load("debug", ["ray.num_workers=1", *FLEX, "model.flexdit.layout=CSDD"])
    with pytest.raises(ConfigError, match="unknown config key 'model.flexdit.grids'"):
        config_lib.load("debug", ["ray.num_workers=1", *FLEX, "model.flexdit.grids=[4]"])


def test_training_step_on_a_rank_interval(tmp_path):
    cfg = config_lib.load("debug", ["ray.num_workers=1", *FLEX, f"model.checkpoint={_static_checkpoint(tmp_path / 's.safetensors')}"])
    network = build_network(cfg.model)
    assert isinstance(network, FlexDiT) and network.layout == "CSRD"
    result = init_weights(network, cfg)  # the static checkpoint: only W1 / W2 missing
    assert result.missing and all(k.split(".")[2].startswith("merged_layer") for k in result.missing)
    objective = DiffusionObjective(network, cfg)
    batch = {"x": torch.randn(4, 4, 16, 16), "y": torch.arange(4), "index": torch.arange(4)}
    g = step_generator(0, 1, 0, 0, "cpu")
    inputs = draw_inputs(batch, network, cfg, g, "cpu", t_range=(500, 1000))  # rank 1 of 2
    assert ((inputs["t"] >= 500) & (inputs["t"] < 1000)).all()
    terms = objective(**inputs, step=0, generator=g)
    assert terms["sparse_tokens"].item() == 16.0  # the whole batch on the 4x4 grid
    terms["loss"].backward()
    w1 = network.blocks[2].merged_layer1.weight
    assert w1.grad is not None and w1.grad.abs().sum() > 0  # W1 starts at zero but learns


def test_sampling_method_flexdit(tmp_path):
    cfg = config_lib.load("debug", ["ray.num_workers=1", *FLEX])
    model = build_network(cfg.model).eval()
    runner = build_runner("flexdit", model)
    assert isinstance(runner, FlexDiTRunner)
    with pytest.raises(ValueError, match="takes no options"):
        build_runner("flexdit", model, {"interval": 2})
    with pytest.raises(ValueError, match="FlexDiT / FlexPixArt"):
        build_runner("flexdit", build_model("debug", input_size=16, num_classes=10).eval())


@pytest.mark.integration
@pytest.mark.slow
def test_two_worker_finetune_uses_per_rank_intervals(ray_local, s3_bucket, s3_endpoint, tmp_path):
    from dydit_dist.data.synthetic import random_dataset
    from jobs import finetune

    argv = ["--config", "debug", *FLEX, "ray.num_workers=2", "ray.cpus_per_worker=1", "train.max_steps=4",
            "train.global_batch_size=4", "train.micro_batch_size=2", "train.log_every=2", "train.checkpoint_every=4",
            "data.num_workers=0", f"data.uri={s3_bucket}/data", f"storage.root={s3_bucket}", "storage.run=flex",
            f"storage.endpoint_url={s3_endpoint}", f"train.init_from={_static_checkpoint(tmp_path / 's.safetensors')}"]
    cfg = config_lib.load("debug", argv[2:])
    random_dataset(f"{s3_bucket}/data", cfg, num_samples=16)
    result = finetune.run(argv)
    assert result.metrics["step"] == 4
    # rank 0 trains on t in [0, 500) (6x6 = 36 sparse tokens), rank 1 on [500, 1000) (4x4 = 16): the
    # rank-averaged mean is exactly 26 only if every batch stayed in its rank's interval
    assert result.metrics["sparse_tokens"] == pytest.approx(26.0)
    ema = read_weights(latest_ema(f"{s3_bucket}/runs/flex"))
    assert {"blocks.2.merged_layer1.weight", "blocks.2.merged_layer2.weight"} <= set(ema)
    load_into(build_network(cfg.model), ema)  # strict: the sampler's network takes the export as it is
