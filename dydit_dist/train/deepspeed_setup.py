"""The one place where the typed config becomes a DeepSpeed config and `deepspeed.initialize` is called.

    engine = initialize(DiffusionObjective(network, cfg), cfg, world_size)

- ZeRO stage 0/1/2/3, optimizer offload (stage >= 1) and parameter offload (stage 3) to CPU; the
  communication settings (`deepspeed.overlap_comm`, bucket sizes); a warning when ZeRO-3 is chosen for
  a model whose ZeRO-2 state fits in half a device (`zero3_unneeded`).
- Precision: fp32, or bf16 / fp16 through DeepSpeed's `torch_autocast` (fp32 master parameters,
  matmuls in low precision, the diffusion loss math - q_sample, MSE, variational bound - in fp32).
  DeepSpeed's pure bf16 mode would also quantize x_t and the noise target to bf16, which loses the
  small-t noise the network must learn to predict.
- AdamW from torch, handed to DeepSpeed: the same code runs on CPU (DS_ACCELERATOR=cpu, gloo), where
  DeepSpeed's fused Adam kernels do not exist, and on GPUs. The learning rate warms up linearly over
  `train.warmup_steps` from 0 at the first step, then stays constant (PixArt-alpha's recipe: 1000
  scheduler steps; DiT and DyDiT: none).
- Gradient norm: clipped at `train.grad_clip` by DeepSpeed, or (DyDiT) the update skipped when it
  reaches `train.skip_grad_norm` (`skip_on_grad_norm`).
- global batch = world size x micro-batch x gradient accumulation, checked against the actual world.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import types
from collections.abc import Callable

import torch
from torch import nn

from dydit_dist.config import ConfigError

from .ema import collective_ready

log = logging.getLogger(__name__)
_AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def grad_accumulation(cfg, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank; ConfigError with the numbers when they do not divide."""
    t = cfg.train
    per_step = world_size * t.micro_batch_size
    if t.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of world size x "
                          f"train.micro_batch_size = {world_size} x {t.micro_batch_size} = {per_step}")
    return t.global_batch_size // per_step


def check_deepspeed(cfg) -> None:
    """Combinations DeepSpeed refuses, as ConfigErrors naming the keys."""
    z = cfg.deepspeed
    if z.offload_params and z.zero_stage != 3:
        raise ConfigError(f"deepspeed.offload_params needs deepspeed.zero_stage=3, got {z.zero_stage}")
    if z.offload_optimizer and z.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1, got 0")
    if cfg.train.precision == "fp16" and cfg.train.grad_clip and z.zero_stage >= 1:
        # DeepSpeed (0.19) clips ZeRO 1-3's gradients against their norm *with* torch_autocast's fp16 loss
        # scale in it (2^16 times too large), so every step would be clipped
        raise ConfigError(f"train.precision=fp16 with train.grad_clip={cfg.train.grad_clip} needs "
                          f"deepspeed.zero_stage=0 (got {z.zero_stage}): DeepSpeed clips ZeRO's fp16 gradients "
                          "against their loss-scaled norm; use train.precision=bf16, or train.grad_clip=null")
    if cfg.train.stage1_update == "official" and cfg.train.skip_grad_norm is None:
        raise ConfigError("train.stage1_update=official repeats a step whose gradient norm is below "
                          "train.skip_grad_norm: set that threshold (DyDiT: --clip_max_norm), or stage1_update=skip")
    if cfg.train.skip_grad_norm is not None:
        if z.zero_stage == 3:
            raise ConfigError("train.skip_grad_norm works with deepspeed.zero_stage 0-2 (ZeRO-3 steps its optimizer "
                              "per parameter sub-group, so no single step sees the global norm); got 3")
        if cfg.train.grad_clip:
            raise ConfigError(f"train.skip_grad_norm={cfg.train.skip_grad_norm} replaces clipping: set "
                              f"train.grad_clip=null (got {cfg.train.grad_clip})")


def ds_config(cfg, world_size: int) -> dict:
    """The DeepSpeed config dict for `cfg` on `world_size` ranks."""
    check_deepspeed(cfg)
    t, z = cfg.train, cfg.deepspeed
    pin = torch.cuda.is_available()
    zero: dict = {"stage": z.zero_stage}
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if z.zero_stage >= 1:
        zero.update(overlap_comm=z.overlap_comm, reduce_bucket_size=z.reduce_bucket_size)
        if z.zero_stage <= 2:
            zero["allgather_bucket_size"] = z.allgather_bucket_size
    conf = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accumulation(cfg, world_size),
        "gradient_clipping": t.grad_clip or 0.0,  # DeepSpeed: 0 = no clipping
        "zero_optimization": zero,
        # The optimizer is torch's AdamW (see the module docstring), also under offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the trainer reports its own metrics
        "wall_clock_breakdown": False,
    }
    if t.precision in _AUTOCAST_DTYPES:
        conf["torch_autocast"] = {"enabled": True, "dtype": _AUTOCAST_DTYPES[t.precision]}
    return conf


def zero3_unneeded(num_params: int, world_size: int, device_bytes: int, share: float = 0.5) -> str | None:
    """A warning when ZeRO-2 would hold the model's training state in `share` of a device's memory: ZeRO-3
    then only adds a parameter all-gather per forward and backward (1.5x ZeRO-2's traffic). ZeRO-2 state
    per rank with fp32 master weights: 4 bytes of weights + (4 of gradients + 8 of Adam moments) / world
    size, per parameter; activations take the rest."""
    zero2 = num_params * (4 + 12 / world_size)
    if zero2 > share * device_bytes:
        return None
    return (f"deepspeed.zero_stage=3 for a model of {num_params / 1e6:.0f}M parameters: under ZeRO-2 its weights, "
            f"gradients and Adam state take {zero2 / 2**30:.1f} GiB per rank of {device_bytes / 2**30:.0f} GiB on "
            f"{world_size} ranks, so ZeRO-3's extra all-gathers buy nothing; set deepspeed.zero_stage=2")


def warmup_then_constant(warmup_steps: int):
    """LR factor for optimizer step s (0-based): s / warmup during warm-up, then 1. As PixArt-alpha's
    (diffusers' `get_constant_schedule_with_warmup`, factor current_step / num_warmup_steps): its first
    update runs at lr 0, which still moves Adam's moments."""

    def factor(step: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)

    return factor


def init_single_process(backend: str | None = None) -> None:
    """A one-rank process group for running the engine outside Ray (tests, benchmarks), and the
    environment DeepSpeed reads (set again when the group exists: a caller may have cleared it)."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.setdefault(key, "1" if key == "WORLD_SIZE" else "0")
    if torch.distributed.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def initialize(objective: nn.Module, cfg, world_size: int):
    """`deepspeed.initialize` on the objective (network + loss) with torch AdamW; returns the engine.

    The process group must exist (Ray Train's TorchTrainer, or `init_single_process`).
    """
    import deepspeed

    conf = ds_config(cfg, world_size)
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    actual = torch.distributed.get_world_size()
    if actual != world_size:
        raise ConfigError(f"ray.num_workers={world_size} but the process group has {actual} ranks")
    t = cfg.train
    params = [p for p in objective.parameters() if p.requires_grad]
    if cfg.deepspeed.zero_stage == 3 and torch.cuda.is_available():
        unneeded = zero3_unneeded(sum(p.numel() for p in objective.parameters()), world_size,
                                  torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
        if unneeded:
            log.warning(unneeded)
    optimizer = torch.optim.AdamW(params, lr=t.scaled_lr, betas=(0.9, 0.999), eps=t.adam_eps, weight_decay=t.weight_decay)
    if t.skip_grad_norm is not None:
        repeat = None
        if t.stage1_update == "official" and cfg.model.method == "dydit":
            def repeat() -> bool:  # the step being taken (the objective's last forward) is in stage 1
                return objective.last_step is not None and cfg.model.dynamic.stage_at(objective.last_step) == 1
        skip_on_grad_norm(optimizer, t.skip_grad_norm, partitioned=cfg.deepspeed.zero_stage > 0, repeat=repeat)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(t.warmup_steps))
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=scheduler, config=conf)
    if cfg.deepspeed.zero_stage == 3:
        _register_unhooked_parameters(engine.module)
    return engine


def skip_on_grad_norm(optimizer: torch.optim.Optimizer, threshold: float, partitioned: bool,
                      repeat: Callable[[], bool] | None = None) -> None:
    """DyDiT's rule (`train_without_completemodel.py`): an optimizer step whose global gradient norm is
    `threshold` or more, or not finite, is skipped (parameters and Adam moments unchanged; the EMA still
    updates: a NaN norm compares false with any threshold, and its update would make every weight NaN). While
    `repeat()` is true, DyDiT's stage-1 rule instead (`train.py:284-287`): a step with the gradient
    whatever its finite norm, then a second step with the same gradient when the norm is below `threshold`
    (two Adam updates; the official clipping that follows the first step changes no gradient it repeats);
    a non-finite norm is skipped there too, never repeated.

    Wraps `optimizer.step` before DeepSpeed sees the optimizer. Under ZeRO-1/2 DeepSpeed calls it with
    this rank's partition of the averaged gradients in the optimizer's parameters, so the squared norms
    are summed over the ranks (`partitioned`); under ZeRO-0 every rank holds the whole averaged
    gradient. Every rank takes the same decision. `optimizer.skipped_steps` counts the skips,
    `optimizer.repeated_steps` the second steps."""
    step = optimizer.step
    optimizer.skipped_steps = optimizer.repeated_steps = 0

    def step_by_the_norm(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        squared = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
        if partitioned:  # under optimizer offload the gradients are CPU tensors, the group NCCL
            squared = collective_ready(squared)
            torch.distributed.all_reduce(squared)
        norm = float(squared.sqrt())
        if not math.isfinite(norm):
            self.skipped_steps += 1
            log.warning("gradient norm %s: update skipped (a NaN or inf in the loss, the data or the weights)", norm)
            return None
        if repeat is not None and repeat():
            out = step(*args, **kwargs)
            if norm < threshold:
                self.repeated_steps += 1
                out = step(*args, **kwargs)
            return out
        if norm >= threshold:
            self.skipped_steps += 1
            log.warning("gradient norm %.4g >= train.skip_grad_norm=%g: update skipped", norm, threshold)
            return None
        return step(*args, **kwargs)

    # A bound method, as torch's LR schedulers expect of `optimizer.step`.
    optimizer.step = types.MethodType(step_by_the_norm, optimizer)


def _register_unhooked_parameters(root: nn.Module) -> None:
    """ZeRO-3 gathers a module's own parameters in that module's forward hooks. DyDiT's masked path
    and the complete-model pass call block and network methods directly (`block.modulation`,
    `DiT.forward(self, ...)`), so parameters owned by a module that also has submodules (DiT's
    `pos_embed`, PixArt's `scale_shift_table`s) would be read while partitioned. They are small:
    register them with the root, which holds them gathered for its whole forward."""
    import deepspeed

    for module in root.modules():
        if module is root or not any(True for _ in module.children()):
            continue
        for param in module.parameters(recurse=False):
            deepspeed.zero.register_external_parameter(root, param)
