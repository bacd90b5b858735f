"""The one-command GPU check (issue 15): what the project's GPU paths cost on the machine it runs on.

    python benchmarks/gpu_check.py            # one H100 / H200, at most ~8 minutes
    python benchmarks/gpu_check.py --smoke    # CPU, tiny shapes, seconds: keeps the script from rotting

Writes benchmarks/results/gpu_check.{json,md} (`--out` to change the folder). Sections (`--skip NAME`):

- matmul_peak: the chip's bf16 (and TF32, fp32) matmul TFLOP/s, the "FLOPs limit" below.
- static: DiT-XL/2 256, batch 64 with CFG (128 rows), one DDPM step timed and scaled to 250 steps, in
  fp32, TF32 and bf16; model TFLOP/s against the matmul peak; diffusers' DiTTransformer2DModel with
  the same architecture, batch and precision (random weights: the weights do not change the work).
- dydit: DyDiT-XL/2 with routers set to ~half the width (as benchmarks/dynamic_speed.py does), fast
  path vs static at batch 8, 64, 256 (bf16): measured speedup against the FLOPs-ideal one.
- training_free: FORA, EB-Cache (released 50-step table), AT-EDM and FlexDiT, 50 steps, bf16:
  measured speedup against the FLOPs-ideal one.
- train_step: one DeepSpeed ZeRO-2 bf16 step of DyDiT-XL/2 stage 1 at micro-batch 32 and 16 on one
  GPU: step time, peak memory, whether it fits (skipped with a note without DeepSpeed).
- vae: decode of 64 latents at 256 and 512 px, fp32 and bf16 (SD VAE architecture, random weights).
- bf16_distance: DiT-XL/2 with random weights, 50 DDIM steps, final-latent relative L2 of bf16 vs fp32.

Needs torch, numpy and diffusers (for the diffusers baseline and the VAE; those sections are skipped
without it), never Ray, s3fs or webdataset.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dydit_dist.accel import RELEASED_TABLE_50, build_runner
from dydit_dist.accel.synthetic import randomize_routers, randomize_zero_init
from dydit_dist.diffusion import CounterNoise, cfg_class_batch, cfg_model_fn, sample
from dydit_dist.dynamic import DyDiT, FlexOptions, flexdit_from_static
from dydit_dist.models import build_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def shapes(smoke: bool) -> dict:
    """Sizes of every section: the real ones, or tiny CPU ones."""
    if smoke:
        return dict(model="debug", input_size=8, batch=2, dydit_batches=(2,), steps=2, matmul=256, vae_size=(32,),
                    vae_batch=1, micro_batches=(2,), train_preset="debug", repeats=1)
    return dict(model="DiT-XL/2", input_size=32, batch=64, dydit_batches=(8, 64, 256), steps=50, matmul=8192,
                vae_size=(256, 512), vae_batch=64, micro_batches=(32, 16), train_preset="dydit_xl2_256_lambda0.5",
                repeats=5)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def precision(name: str, device):
    """(autocast context, tf32 flag) for fp32 / tf32 / bf16."""
    tf32 = name != "fp32"
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    dtype = torch.bfloat16 if name == "bf16" else None
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def dit(s, device, seed=0):
    model = build_model(s["model"], input_size=s["input_size"], num_classes=1000 if s["model"] != "debug" else 10)
    randomize_zero_init(model, torch.Generator().manual_seed(seed))
    return model.to(device).eval()


def guided_inputs(model, batch, device, seed=0):
    """A doubled (CFG) batch: x (2B, C, h, w) counter noise, y (2B,) labels then the null class."""
    size = model.x_embedder.img_size
    x = CounterNoise.from_seeds(range(seed, seed + batch), device).draw(0, (batch, model.in_channels, size, size))
    y = torch.arange(batch, device=device) % model.num_classes
    return cfg_class_batch(x, y, model.num_classes)


def matmul_peak(s, device) -> dict:
    n, out = s["matmul"], {}
    for name in ("fp32", "tf32", "bf16"):
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        with precision(name, device):
            seconds = timed(lambda a=a, b=b: a @ b, device, s["repeats"] * 4)
        out[f"{name}_tflops"] = 2 * n**3 / seconds / 1e12
    return out


def static(s, device, peak: dict) -> dict:
    model = dit(s, device)
    x, y = guided_inputs(model, s["batch"], device)
    t = torch.full((x.shape[0],), 500, device=device)
    runner = build_runner("static", model)
    rows = {}
    diffusers_model = _diffusers_dit(model, device)
    for name in ("fp32", "tf32", "bf16"):
        with precision(name, device), torch.no_grad():
            step = timed(lambda: runner(x, t, y=y), device, s["repeats"])
            row = {"step_s": step, "images_per_s_250_steps": s["batch"] / (250 * step)}
            macs = runner.mean_flops() * x.shape[0]
            row["model_tflops"] = 2 * macs / step / 1e12
            row["fraction_of_peak"] = row["model_tflops"] / peak.get(f"{name}_tflops", float("nan"))
            if diffusers_model is not None:
                ref = timed(lambda: diffusers_model(x, timestep=t, class_labels=y), device, s["repeats"])
                row["diffusers_step_s"] = ref
                row["speedup_vs_diffusers"] = ref / step
        rows[name] = row
    return rows


def _diffusers_dit(model, device):
    """diffusers' DiTTransformer2DModel of the same architecture (None without diffusers)."""
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        return None
    heads, hidden = model.num_heads, model.blocks[0].attn.proj.weight.shape[0]
    return DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=model.in_channels,
        out_channels=model.out_channels, num_layers=len(model.blocks), sample_size=model.x_embedder.img_size,
        patch_size=model.patch_size, num_embeds_ada_norm=model.num_classes,
    ).to(device).eval()


def dynamic(s, device) -> list[dict]:
    static_model = dit(s, device)
    dydit = DyDiT.from_static(static_model)
    randomize_routers(dydit, torch.Generator().manual_seed(1))
    dydit = dydit.to(device).eval()
    rows = []
    for batch in s["dydit_batches"]:
        x, y = guided_inputs(dydit, batch, device)
        t = torch.full((x.shape[0],), 500, device=device)
        times, flops = {}, {}
        for method in ("static", "dydit"):
            runner = build_runner(method, dydit)
            runner.step_callback(0, 500)
            with precision("bf16", device), torch.no_grad():
                def call(runner=runner, x=x, t=t, y=y):
                    runner.step_callback(0, 500)
                    return runner(x, t, y=y)
                times[method] = timed(call, device, s["repeats"])
            flops[method] = runner.mean_flops()
        ideal = flops["static"] / flops["dydit"]
        measured = times["static"] / times["dydit"]
        rows.append({"batch": batch, "static_s": times["static"], "fast_s": times["dydit"], "speedup": measured,
                     "flops_ideal_speedup": ideal, "ratio_to_ideal": measured / ideal})
    return rows


def training_free(s, device) -> list[dict]:
    static_model = dit(s, device)
    steps = 50 if not s["model"] == "debug" else 4
    methods = {"fora": {"interval": 3}, "eb_cache": {"schedule": RELEASED_TABLE_50 if steps == 50 else "0120"},
               "at_edm": {} if s["model"] != "debug" else {"score_layer": 0, "dense_last": 1}, "flexdit": None}
    x, y = guided_inputs(static_model, s["batch"], device)
    rows, base = [], None
    for method in ("static", *methods):
        options = None if s["model"] != "debug" else FlexOptions(grid_sizes=(3, 2), num_intervals=2)
        model = flexdit_from_static(static_model, options).to(device).eval() if method == "flexdit" else static_model
        runner = build_runner(method, model, methods.get(method))
        fn = cfg_model_fn(runner, 1.5)

        def run(runner=runner, fn=fn):
            runner.begin(steps)
            with precision("bf16", device):
                sample(fn, x.shape, "ddim", steps, noise=x, model_kwargs={"y": y}, step_callback=runner.step_callback)

        seconds = timed(run, device, max(1, s["repeats"] // 2))
        flops = runner.mean_flops()
        if base is None:
            base = (seconds, flops)
        ideal, measured = base[1] / flops, base[0] / seconds
        rows.append({"method": method, "seconds": seconds, "speedup": measured, "flops_ideal_speedup": ideal,
                     "ratio_to_ideal": measured / ideal})
    return rows


def train_step(s, device) -> list[dict] | dict:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return {"skipped": "DeepSpeed is not installed"}
    from dydit_dist import config as config_lib
    from dydit_dist.network import build_network
    from dydit_dist.train.deepspeed_setup import init_single_process, initialize
    from dydit_dist.train.step import DiffusionObjective, draw_inputs, step_generator

    init_single_process()
    rows = []
    for micro in s["micro_batches"]:
        cfg = config_lib.load(s["train_preset"], [
            "ray.num_workers=1", f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}",
            "train.precision=bf16", "deepspeed.zero_stage=2", "model.method=dydit", "model.dynamic.stage=1"])
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row = {"micro_batch": micro}
        try:
            network = build_network(cfg.model).to(device)
            engine = initialize(DiffusionObjective(network, cfg), cfg, 1)
            m = cfg.model
            batch = {"x": torch.randn(micro, m.in_channels, m.input_size, m.input_size, device=device),
                     "y": torch.arange(micro, device=device) % m.num_classes,
                     "index": torch.arange(micro)}

            def step(engine=engine, network=network, cfg=cfg, batch=batch):
                g = step_generator(0, 0, 0, 0, device)
                terms = engine(**draw_inputs(batch, network, cfg, g, device), step=0, generator=g)
                engine.backward(terms["loss"])
                engine.step()

            row["step_s"] = timed(step, device, s["repeats"])
            row["fits"] = True
        except torch.cuda.OutOfMemoryError as err:
            row.update(fits=False, error=str(err).splitlines()[0])
        if torch.device(device).type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(row)
    return rows


def vae(s, device) -> list[dict] | dict:
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        return {"skipped": "diffusers is not installed"}
    # The SD VAE's architecture (stabilityai/sd-vae-ft-ema), random weights.
    blocks = ("DownEncoderBlock2D",) * 4, ("UpDecoderBlock2D",) * 4
    width = (128, 256, 512, 512) if s["model"] != "debug" else (8, 8, 8, 8)
    rows = []
    for size in s["vae_size"]:
        for name in ("fp32", "bf16"):
            model = AutoencoderKL(down_block_types=blocks[0], up_block_types=blocks[1], block_out_channels=width,
                                  latent_channels=4, layers_per_block=2, norm_num_groups=min(32, width[0]))
            model = model.to(device, DTYPES[name]).eval()
            z = torch.randn(s["vae_batch"], 4, size // 8, size // 8, device=device, dtype=DTYPES[name])
            with torch.no_grad():
                seconds = timed(lambda model=model, z=z: model.decode(z).sample, device, max(1, s["repeats"] // 2))
            rows.append({"size": size, "precision": name, "seconds": seconds,
                         "images_per_s": s["vae_batch"] / seconds})
    return rows


def bf16_distance(s, device) -> dict:
    model = dit(s, device)
    x, y = guided_inputs(model, min(s["batch"], 8), device)
    out = {}
    for name in ("fp32", "bf16"):
        with precision("fp32" if name == "fp32" else "bf16", device):
            out[name] = sample(cfg_model_fn(model, 1.5), x.shape, "ddim", s["steps"], noise=x, model_kwargs={"y": y})
    return {"steps": s["steps"], "relative_l2": float((out["bf16"] - out["fp32"]).norm() / out["fp32"].norm())}


SECTIONS = ("matmul_peak", "static", "dydit", "training_free", "train_step", "vae", "bf16_distance")


def run(smoke: bool, skip: set[str], device: str) -> dict:
    s = shapes(smoke)
    result = {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else (platform.processor() or platform.machine()),
              "torch": torch.__version__, "smoke": smoke, "sections": {}}
    out = result["sections"]
    timings = {}
    for name in SECTIONS:
        if name in skip:
            out[name] = {"skipped": "--skip"}
            continue
        start = time.perf_counter()
        if name == "matmul_peak":
            out[name] = matmul_peak(s, device)
        elif name == "static":
            out[name] = static(s, device, out.get("matmul_peak", {}))
        elif name == "dydit":
            out[name] = dynamic(s, device)
        else:
            out[name] = globals()[name](s, device)
        timings[name] = time.perf_counter() - start
        print(f"{name}: {timings[name]:.1f} s", flush=True)
    result["section_seconds"] = timings
    return result


def to_markdown(result: dict) -> str:
    lines = [f"# GPU check ({result['device']}, torch {result['torch']}{', SMOKE: tiny CPU shapes' if result['smoke'] else ''})",
             "", "Made by `benchmarks/gpu_check.py`; every section's numbers as measured.", ""]
    for name, value in result["sections"].items():
        lines += [f"## {name}", ""]
        rows = value if isinstance(value, list) else [{"setting": k, **v} for k, v in value.items()] \
            if value and all(isinstance(v, dict) for v in value.values()) else [value]
        keys = list(dict.fromkeys(k for row in rows for k in row))
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for row in rows:
            cells = [f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, seconds")
    parser.add_argument("--skip", action="append", default=[], choices=SECTIONS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --smoke")
    device = "cpu" if args.smoke else "cuda"
    result = run(args.smoke, set(args.skip), device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_check.md").write_text(to_markdown(result) + "\n")
    print(to_markdown(result))


if __name__ == "__main__":
    main()
