"""The training step without DeepSpeed or Ray: random draws, conditioning dropout, loss terms,
the DeepSpeed config, the partitioned EMA and the trainer state."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from dydit_dist import config as config_lib
from dydit_dist.config import ConfigError
from dydit_dist.network import build_network
from dydit_dist.train.deepspeed_setup import ds_config, grad_accumulation, warmup_then_constant
from dydit_dist.train.ema import PartitionedEMA
from dydit_dist.train.state import TrainerState
from dydit_dist.train.step import DiffusionObjective, draw_inputs, step_generator

PIXART = ["model.name=PixArt-debug", "model.caption_channels=32", "model.model_max_length=8"]


def _cfg(*overrides):
    return config_lib.load("debug", ["ray.num_workers=1", *overrides])


def _dit_batch(b=8):
    return {"x": torch.randn(b, 4, 16, 16), "y": torch.arange(b) % 10, "index": torch.arange(b)}


def _pixart_batch(b=8):
    mask = (torch.arange(8)[None] < torch.randint(1, 9, (b, 1))).long()
    return {"x": torch.randn(b, 4, 16, 16), "t5": torch.randn(b, 1, 8, 32) * mask[:, None, :, None], "t5_mask": mask}


def test_step_generator_is_a_function_of_seed_rank_step_micro():
    draw = lambda *key: torch.rand(4, generator=step_generator(*key, "cpu"))  # noqa: E731
    # Literals, computed once: pin the draws of (seed 0, rank 1, step 5, micro 0) across processes and
    # versions (the seed derivation and torch's CPU generator), so a resumed run redraws the same inputs.
    pinned = [0.894511342048645, 0.726905107498169, 0.08050620555877686, 0.6627742648124695]
    assert draw(0, 1, 5, 0).tolist() == pinned
    others = [draw(1, 1, 5, 0), draw(0, 0, 5, 0), draw(0, 1, 6, 0), draw(0, 1, 5, 1)]
    assert all(not torch.equal(draw(0, 1, 5, 0), o) for o in others)


def test_draw_inputs_dydit_stratified_and_reproducible():
    cfg = _cfg("model.method=dydit")
    net = build_network(cfg.model)
    a = draw_inputs(_dit_batch(), net, cfg, step_generator(0, 0, 3, 0, "cpu"), "cpu")
    b = draw_inputs(_dit_batch(), net, cfg, step_generator(0, 0, 3, 0, "cpu"), "cpu")
    assert all(torch.equal(a[k], b[k]) for k in ("t", "noise", "y"))
    quarter = (a["t"] // 250).tolist()
    assert quarter == [i % 4 for i in range(8)]  # sample i from quarter i mod 4


def test_label_dropout_uses_the_null_class():
    cfg = _cfg("model.class_dropout_prob=1.0")
    net = build_network(cfg.model)
    out = draw_inputs(_dit_batch(), net, cfg, step_generator(0, 0, 0, 0, "cpu"), "cpu")
    assert out["y"].tolist() == [10] * 8
    cfg = _cfg("model.class_dropout_prob=0.0")
    out = draw_inputs(_dit_batch(), build_network(cfg.model), cfg, step_generator(0, 0, 0, 0, "cpu"), "cpu")
    assert torch.equal(out["y"], _dit_batch()["y"])


def test_caption_dropout_uses_the_null_caption_and_keeps_the_mask():
    cfg = _cfg(*PIXART, "train.caption_dropout=0.5")
    net = build_network(cfg.model)
    batch = _pixart_batch(64)
    out = draw_inputs(batch, net, cfg, step_generator(0, 0, 0, 0, "cpu"), "cpu")
    null = net.y_embedder.y_embedding
    dropped = torch.tensor([torch.equal(out["y"][i, 0], null) for i in range(64)])
    kept = torch.tensor([torch.equal(out["y"][i], batch["t5"][i]) for i in range(64)])
    assert bool((dropped ^ kept).all()) and 10 < int(dropped.sum()) < 54
    assert torch.equal(out["mask"], batch["t5_mask"])


@pytest.mark.parametrize("stage", [1, 2])
def test_dydit_objective_terms(stage):
    cfg = _cfg("model.method=dydit", f"model.dynamic.stage={stage}")
    torch.manual_seed(0)
    objective = DiffusionObjective(build_network(cfg.model), cfg)
    g = step_generator(0, 0, 0, 0, "cpu")
    terms = objective(**draw_inputs(_dit_batch(), objective.network, cfg, g, "cpu"), step=0, generator=g)
    assert set(terms) == {"loss", "diffusion", "complete", "flops", "flops_ratio", "lambda_t"}
    assert (float(terms["complete"]) > 0) == (stage == 1)
    expected = terms["diffusion"] + terms["complete"] + terms["flops"]
    assert torch.allclose(terms["loss"], expected)
    terms["loss"].backward()
    router = objective.network.blocks[0].attn_rate.router.bias
    assert router.grad is not None


def test_the_routers_gumbel_noise_comes_from_the_step_generator():
    """Whatever the global random state (a DataLoader's seed draw after a resume shifted it): the same step
    generator gives the same loss and router gradients. The routers drew from the global state, and so
    every data-parallel rank drew the same noise (the official code seeds each rank apart)."""
    cfg = _cfg("model.method=dydit", "model.dynamic.stage=2", "model.dynamic.router_bias_init=0")
    torch.manual_seed(0)
    objective = DiffusionObjective(build_network(cfg.model), cfg)
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        objective.zero_grad()
        g = step_generator(0, 0, 0, 0, "cpu")
        terms = objective(**draw_inputs(_dit_batch(), objective.network, cfg, g, "cpu"), step=0, generator=g)
        terms["loss"].backward()
        results.append((terms["loss"].detach(), objective.network.blocks[0].attn_rate.router.weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    other_rank = step_generator(0, 1, 0, 0, "cpu")
    torch.manual_seed(1)
    terms = objective(**draw_inputs(_dit_batch(), objective.network, cfg, other_rank, "cpu"), step=0,
                      generator=other_rank)
    assert not torch.equal(terms["loss"].detach(), results[0][0])


def test_static_objective_and_embedder_dropout_switched_off():
    cfg = _cfg("model.class_dropout_prob=0.1")
    net = build_network(cfg.model)
    objective = DiffusionObjective(net, cfg)
    assert net.y_embedder.dropout_prob == 0.0  # the step draws label dropout itself
    assert net.y_embedder.embedding_table.num_embeddings == 11  # the null class stays
    g = step_generator(0, 0, 0, 0, "cpu")
    terms = objective(**draw_inputs(_dit_batch(), net, cfg, g, "cpu"), step=0, generator=g)
    assert set(terms) == {"loss", "mse", "vb"}
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])


def test_ds_config():
    cfg = _cfg("train.global_batch_size=16", "train.micro_batch_size=4", "deepspeed.zero_stage=3",
               "deepspeed.offload_params=true", "deepspeed.offload_optimizer=true", "train.precision=bf16")
    conf = ds_config(cfg, world_size=2)
    assert conf["train_batch_size"] == 16 and conf["gradient_accumulation_steps"] == 2
    assert conf["zero_optimization"]["stage"] == 3
    assert conf["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert conf["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "torch_autocast" not in ds_config(_cfg("train.precision=fp32"), 1)


def test_ds_config_errors_name_the_numbers():
    with pytest.raises(ConfigError, match=r"global_batch_size=8 .* 3 x 4 = 12"):
        grad_accumulation(_cfg("train.global_batch_size=8", "train.micro_batch_size=4"), world_size=3)
    with pytest.raises(ConfigError, match="offload_params needs deepspeed.zero_stage=3, got 2"):
        ds_config(_cfg("deepspeed.offload_params=true", "deepspeed.zero_stage=2"), 1)


def test_warmup_then_constant():
    """PixArt-alpha's schedule (diffusers' get_constant_schedule_with_warmup): step s at s / warmup, from 0."""
    f = warmup_then_constant(4)
    assert [f(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_then_constant(0)(0) == 1.0


def test_partitioned_ema_slices_assemble_to_the_full_ema():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))  # sizes not divisible by 3
    world = 3
    emas = [PartitionedEMA(net, decay=0.9, rank=r, world_size=world) for r in range(world)]
    reference = {n: p.detach().clone() for n, p in net.named_parameters()}
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        for ema in emas:
            ema.update()
        for n, p in net.named_parameters():
            reference[n].lerp_(p.detach(), 0.1)
    for i, (name, p) in enumerate(net.named_parameters()):
        size = math.ceil(p.numel() / world)
        assert all(e.shadow[i].numel() == size for e in emas)
        full = torch.cat([e.shadow[i] for e in emas])[: p.numel()].reshape(p.shape)
        assert torch.allclose(full, reference[name], atol=1e-6), name
    single = PartitionedEMA(net, 0.9)
    assert set(single.gather()) == {n for n, _ in net.named_parameters()}


def test_trainer_state_round_trip(tmp_path):
    net = torch.nn.Linear(4, 4)
    state = TrainerState(ema=PartitionedEMA(net, 0.99, rank=1, world_size=2), step=7, data={"step": 14})
    state.save(str(tmp_path / "s.pt"))
    expected = (torch.rand(3), np.random.rand(), random.random())
    other = TrainerState(ema=PartitionedEMA(torch.nn.Linear(4, 4), 0.99, rank=1, world_size=2))
    other.load(str(tmp_path / "s.pt"))
    assert other.step == 7 and other.data == {"step": 14}
    assert all(torch.equal(a, b) for a, b in zip(other.ema.shadow, state.ema.shadow, strict=True))
    assert torch.equal(torch.rand(3), expected[0]) and np.random.rand() == expected[1] and random.random() == expected[2]
    with pytest.raises(ValueError, match="resume with ray.num_workers=2"):
        TrainerState(ema=PartitionedEMA(net, 0.99, rank=0, world_size=1)).load(str(tmp_path / "s.pt"))


def test_workers_are_sized_from_the_config():
    from dydit_dist.train.launcher import worker_needs

    cfg = _cfg("ray.num_workers=8", "ray.use_gpu=true", "ray.gpus_per_worker=1", "train.global_batch_size=32")
    assert worker_needs(cfg)[0].describe() == ("8 training workers x 1 CPU + 1 GPU (ray.num_workers, ray.cpus_per_worker, "
                                               "ray.gpus_per_worker) = 8 CPUs, 8 GPUs")
    assert worker_needs(_cfg())[0].bundle() == {"CPU": 1}  # ray.use_gpu=false: no GPU asked for
