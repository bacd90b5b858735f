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


def test_the_gradient_norm_of_an_offloaded_optimizer_is_reduced_on_the_gpu(monkeypatch):
    """Under optimizer offload ZeRO-1/2 hands the optimizer CPU gradients; the DyDiT skip rule all-reduced
    their squared norm as a CPU tensor, which an NCCL group refuses at the first step (no CPU backend).
    Here the NCCL group is simulated: the reduced tensor must have been moved to the process's GPU."""
    import torch

    from dydit_dist.train import deepspeed_setup, ema

    moved, reduced = [], []
    monkeypatch.setattr(ema.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ema.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(ema.torch.cuda, "current_device", lambda: 0)
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            moved.append(args[0])
            return self.clone()  # stands for the copy on the GPU
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(deepspeed_setup.torch.distributed, "all_reduce", lambda t: reduced.append(t))
    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.full((4,), 3.0)
    optimizer = torch.optim.SGD([param], lr=0.1)
    deepspeed_setup.skip_on_grad_norm(optimizer, threshold=100.0, partitioned=True)
    optimizer.step()
    assert moved == [torch.device("cuda", 0)] and len(reduced) == 1  # moved, then reduced
    assert torch.equal(param.detach(), torch.full((4,), 0.7))  # norm 6 < 100: the step was taken
