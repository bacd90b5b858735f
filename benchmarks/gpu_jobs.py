"""The GPU check's sections that run the project's own jobs and checks on the device (see `gpu_check.py`;
the shared helpers and the speed sections are in `gpu_sections.py`).

- train_step: one DeepSpeed ZeRO-2 bf16 step of DyDiT-XL/2 stage 1 at micro-batch 32 and 16 on one
  GPU: step time, peak memory, whether it fits (skipped with a note without DeepSpeed).
- host_syncs: synchronising calls per model call of each runner under CUDA's sync debug mode, against
  the budgets tests/test_sync_budget.py enforces on the CPU (counted on CUDA only).
- determinism: the counter noise bit for bit across batch splits and repeats; a bf16 DDIM run repeated
  and split into two batches (bitwise, and the distance when not).
- sample_job: the sampling actors' ShardGenerator on this device (bf16, counter noise, the VAE in bf16)
  with the debug network and a small random VAE, static and DyDiT.
- train_job: the training job's Trainer on this device without Ray (shard reader, DeepSpeed ZeRO-2 bf16,
  EMA, background checkpoints, EMA export) on the debug DyDiT, then a resume from its checkpoint.
"""

from __future__ import annotations

import gc
import statistics
import time
import warnings

import torch
from gpu_sections import dit, guided_ddim, guided_inputs, method_options, precision, sync

from dydit_dist.accel import build_runner
from dydit_dist.accel.synthetic import randomize_routers, randomize_zero_init
from dydit_dist.diffusion import CounterNoise, cfg_class_batch, cfg_model_fn, sample
from dydit_dist.dynamic import DyDiT, flexdit_from_static


def train_step(s, device, results) -> list[dict] | dict:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return {"skipped": "DeepSpeed is not installed"}
    from dydit_dist.train.deepspeed_setup import init_single_process

    init_single_process()
    rows = []
    for micro in s["micro_batches"]:
        cuda = torch.device(device).type == "cuda"
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        row = {"micro_batch": micro, "memory_before_gib": torch.cuda.memory_allocated(device) / 2**30 if cuda else None}
        try:
            row.update(**_deepspeed_step(s, device, micro), fits=True)
        except torch.cuda.OutOfMemoryError as err:
            row.update(fits=False, error=str(err).splitlines()[0])
        if cuda:
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30  # what the allocator held
        rows.append(row)
    return rows


def _deepspeed_step(s, device, micro: int) -> dict:
    """Median seconds of the two micro-batches of a ZeRO-2 bf16 step of the stage-1 DyDiT at `micro` with
    gradient accumulation 2: `micro_step_s`, a forward and backward alone, and `step_s`, the one at the
    accumulation boundary with the gradient reduction and the optimizer step (the engine is freed on
    return). A step of global batch G at `micro` takes G / micro - 1 of the first and one of the second."""
    from dydit_dist import config as config_lib
    from dydit_dist.network import build_network
    from dydit_dist.train.deepspeed_setup import initialize
    from dydit_dist.train.step import DiffusionObjective, draw_inputs, step_generator

    cfg = config_lib.load(s["train_preset"], [
        "ray.num_workers=1", f"train.micro_batch_size={micro}", f"train.global_batch_size={2 * micro}",
        "train.precision=bf16", "deepspeed.zero_stage=2", "model.method=dydit", "model.dynamic.stage=1"])
    network = build_network(cfg.model).to(device)
    engine = initialize(DiffusionObjective(network, cfg), cfg, 1)
    m = cfg.model
    batch = {"x": torch.randn(micro, m.in_channels, m.input_size, m.input_size, device=device),
             "y": torch.arange(micro, device=device) % m.num_classes,
             "index": torch.arange(micro)}

    def micro_step():
        g = step_generator(0, 0, 0, 0, device)
        terms = engine(**draw_inputs(batch, network, cfg, g, device), step=0, generator=g)
        engine.backward(terms["loss"])
        engine.step()  # the optimizer steps at the accumulation boundary only

    try:
        micro_step(), micro_step()  # warm-up: one whole step
        times = {"micro_step_s": [], "step_s": []}
        for _ in range(s["repeats"]):
            for key in times:  # the first micro-batch, then the boundary's
                sync(device)
                start = time.perf_counter()
                micro_step()
                sync(device)
                times[key].append(time.perf_counter() - start)
        return {key: statistics.median(values) for key, values in times.items()}
    finally:
        engine.destroy()


def host_syncs(s, device, results) -> list[dict] | dict:
    """Synchronising calls per model call under CUDA's sync debug mode (every host read of a device value,
    every blocking copy), 4 DDIM steps at batch 8 with CFG, run twice (the second meets known timesteps):
    the GPU's count beside the budgets tests/test_sync_budget.py holds the runners to on the CPU."""
    watch = torch.device(device).type == "cuda"  # on the CPU (smoke) the same runs, nothing to count
    static_model = dit(s, device)
    dydit_model = DyDiT.from_static(static_model)
    randomize_routers(dydit_model, torch.Generator().manual_seed(1))
    dydit_model = dydit_model.to(device).eval()
    depth, steps = len(static_model.blocks), 4
    options = method_options(s, steps)
    x, y = guided_inputs(static_model, min(s["batch"], 8), device)
    cases = [("static", static_model, "static", None, 0, 0),
             ("dydit", dydit_model, "dydit", None, 1 + depth, depth),
             ("fora", static_model, "fora", options["fora"], 0, 0),
             ("eb_cache", static_model, "eb_cache", options["eb_cache"], 0, 0),
             ("flexdit", flexdit_from_static(static_model, options["flexdit"]).to(device).eval(), "flexdit", None, 0, 0),
             ("at_edm", static_model, "at_edm", options["at_edm"], 1, 1)]
    rows = []
    for name, model, method, options, first_budget, budget in cases:
        runner = build_runner(method, model, options)
        per_run = []
        for _ in range(2):
            counts = []

            def counted(x, t, runner=runner, counts=counts, **cond):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    if watch:
                        torch.cuda.set_sync_debug_mode("warn")
                    try:
                        out = runner(x, t, **cond)
                    finally:
                        if watch:
                            torch.cuda.set_sync_debug_mode("default")
                counts.append(sum("synchroniz" in str(w.message) for w in caught))
                return out

            guided_ddim(runner, x, y, steps, device, model_fn=counted)
            per_run.append(counts)
        rows.append({"method": name, "first_run": per_run[0] if watch else "not counted on the CPU",
                     "second_run": per_run[1] if watch else None, "budget_first": first_budget,
                     "budget_known": budget,
                     "within_budget": max(per_run[0]) <= first_budget and max(per_run[1]) <= budget if watch else None})
    return rows


def determinism(s, device, results) -> dict:
    """What "the same sample whatever the batch and actor count" holds to on this device: the counter
    noise bit for bit; a DDIM run (bf16, DiT with random weights) repeated, and split into two batches
    (kernels are chosen by shape, so a split may differ in the last bits: the distance is reported)."""
    model = dit(s, device)
    batch, steps = 8, min(s["steps"], 10)
    seeds, shape = list(range(batch)), (model.in_channels, model.x_embedder.img_size, model.x_embedder.img_size)
    whole = CounterNoise.from_seeds(seeds, device).draw(3, (batch, *shape))
    halves = torch.cat([CounterNoise.from_seeds(seeds[:4], device).draw(3, (4, *shape)),
                        CounterNoise.from_seeds(seeds[4:], device).draw(3, (4, *shape))])
    again = CounterNoise.from_seeds(seeds, device).draw(3, (batch, *shape))
    y = torch.arange(batch, device=device) % model.num_classes

    def run(rows):
        x, yy = cfg_class_batch(whole[rows], y[rows], model.num_classes)
        with precision("bf16", device):
            out = sample(cfg_model_fn(model, 1.5), x.shape, "ddim", steps, noise=x, model_kwargs={"y": yy})
        return out[: x.shape[0] // 2]  # the guided rows (the second half repeats them)

    first, second = run(slice(None)), run(slice(None))
    split = torch.cat([run(slice(0, 4)), run(slice(4, None))])
    return {"noise_same_split_into_two_batches": torch.equal(whole, halves),
            "noise_same_when_drawn_again": torch.equal(whole, again),
            "ddim_steps": steps, "sample_same_when_run_again": torch.equal(first, second),
            "sample_same_split_into_two_batches": torch.equal(first, split),
            "split_relative_l2": float((split - first).norm() / first.norm())}


def sample_job(s, device, results) -> list[dict]:
    """The sampling actors' own code on this device: `ShardGenerator` (network loaded from a safetensors
    checkpoint, counter noise drawn on the device, bf16 autocast, TF32, the VAE decoding in bf16, the
    shard loop) on the debug network with random weights and a small random VAE, static and DyDiT; and
    whether a sample is the same made alone as in its batch."""
    import tempfile

    from diffusers import AutoencoderKL

    from dydit_dist import config as config_lib
    from dydit_dist.network import sampling_network, save_weights
    from dydit_dist.sample import plan_shards
    from dydit_dist.sample.generate import ShardGenerator

    rows = []
    with tempfile.TemporaryDirectory() as root:
        vae = f"{root}/vae"
        blocks = ("DownEncoderBlock2D",) * 4, ("UpDecoderBlock2D",) * 4
        AutoencoderKL(down_block_types=blocks[0], up_block_types=blocks[1], block_out_channels=(8,) * 4,
                      latent_channels=4, layers_per_block=1, norm_num_groups=8).save_pretrained(vae)
        for method in ("static", "dydit"):
            network = sampling_network(config_lib.load("debug", [f"model.method={method}"]))
            randomize_zero_init(network, torch.Generator().manual_seed(0))
            if method == "dydit":
                randomize_routers(network, torch.Generator().manual_seed(1))
            save_weights(network, f"{root}/{method}.safetensors")
            cfg = config_lib.load("debug", [
                f"storage.root=file://{root}", "storage.run=t", f"model.method={method}", f"sample.method={method}",
                f"model.checkpoint={root}/{method}.safetensors", f"data.vae={vae}", "sample.steps=10",
                "sample.batch_size=8", "sample.shard_size=8", "sample.num_samples=8", "sample.precision=bf16",
                "sample.vae_precision=bf16", "sample.tf32=true", "sample.noise=counter"])
            generator = ShardGenerator(cfg, device=device)
            start = time.perf_counter()
            samples, _ = generator.generate(plan_shards(8, 8)[0])
            seconds = time.perf_counter() - start
            batch, alone = generator.latents(list(range(8))), generator.latents([2])
            rows.append({"method": method, "samples": len(samples), "image_shape": list(samples[0].image.shape),
                         "noise_stream": generator.noise_stream, "seconds": seconds,
                         "gflops_per_forward": generator.stats()["gflops"],
                         "alone_vs_in_batch_max_abs": float((batch[2:3] - alone).abs().max())})
    return rows


def train_job(s, device, results) -> dict:
    """The training job's own loop on this device, one rank without Ray: `Trainer` (shard reader, DeepSpeed
    ZeRO-2 bf16, EMA, checkpoints copied in the background, the EMA export) on the debug DyDiT for 4 steps
    with a checkpoint every 2; then a second Trainer resumes from the last checkpoint and runs 2 more."""
    import tempfile
    import uuid

    from dydit_dist import config as config_lib
    from dydit_dist.data.synthetic import random_dataset
    from dydit_dist.network import latest_ema
    from dydit_dist.train.deepspeed_setup import init_single_process
    from dydit_dist.train.loop import Trainer
    from dydit_dist.train.ray_session import LocalSession

    init_single_process()
    root = f"memory://gpu-check-{uuid.uuid4().hex[:8]}"

    def config(steps):
        return config_lib.load("debug", [
            "ray.num_workers=1", "train.global_batch_size=8", "train.micro_batch_size=8", f"train.max_steps={steps}",
            "train.checkpoint_every=2", "train.log_every=1", "model.method=dydit", "data.num_workers=0",
            "train.precision=bf16", "deepspeed.zero_stage=2", f"storage.root={root}", f"data.uri={root}/data"])

    random_dataset(f"{root}/data", config(4), num_samples=64)
    row = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, steps in (("first", 4), ("resumed", 6)):
            session = LocalSession(folder, device=device)
            start = time.perf_counter()
            trainer = Trainer(config(steps), session)
            trainer.train()
            row[f"{name}_seconds"] = time.perf_counter() - start
            row[f"{name}_from_step"] = trainer.resumed_from
            row[f"{name}_losses"] = [round(float(r["loss"]), 4) for r in session.reports if "loss" in r]
            trainer.engine.destroy()
        row["checkpoints"] = session.checkpoints()
    row["ema_export"] = latest_ema(f"{root}/runs/{config(6).storage.run}").rsplit("/", 1)[-1]
    return row
