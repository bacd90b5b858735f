"""The speed measurements of the GPU check, and the helpers every section shares (`gpu_check.py` runs the
sections, keeps each one's failure to itself and writes the results; `gpu_jobs.py` holds the sections that
run the project's own jobs and checks on the device). A section is a function (shapes, device, results so
far) -> a dict or a list of rows; `shapes(smoke)` gives the real sizes or tiny CPU ones.

- matmul_peak: the chip's bf16 (and TF32, fp32) matmul TFLOP/s, the "FLOPs limit" below.
- static: DiT-XL/2 256, batch 64 with CFG (128 rows), one DDPM step timed and scaled to 250 steps, in
  fp32, TF32 and bf16; model TFLOP/s against the matmul peak; diffusers' DiTTransformer2DModel with
  the same architecture, batch and precision (random weights: the weights do not change the work).
- dydit: DyDiT-XL/2 with routers set to ~half the width (as benchmarks/dynamic_speed.py does), fast
  path vs static at batch 8, 64, 256 (bf16): measured speedup against the FLOPs-ideal one.
- profile: torch.profiler over model calls of the static network and the DyDiT fast path at batch 64:
  GPU busy time against wall time, kernels per call, the ops that take the most time.
- static_512: DiT-XL/2 512, batch 32 with CFG, one bf16 step: the 512 row of the cost table.
- vae: decode of 64 latents at 256 and 512 px, fp32 and bf16 (SD VAE architecture, random weights).
- bf16_distance: DiT-XL/2 with random weights, 50 DDIM steps, final-latent relative L2 of bf16 vs fp32.
- training_free: FORA, EB-Cache (released 50-step table), AT-EDM and FlexDiT, 50 steps, bf16:
  measured speedup against the FLOPs-ideal one.
- compile: `sample.compile` on and off, 10 DDIM steps at batch 64, bf16, for the static network and the
  DyDiT fast path: the first (compiling) run's time and the steady speedup.

Needs torch, numpy and diffusers (for the diffusers baseline and the VAE; those parts are skipped
without it), never Ray, s3fs or webdataset.
"""

from __future__ import annotations

import copy
import statistics
import time

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
                    vae_batch=1, micro_batches=(2, 1), train_preset="debug", repeats=1, batch_512=1, input_512=16,
                    compile_steps=2)
    return dict(model="DiT-XL/2", input_size=32, batch=64, dydit_batches=(8, 64, 256), steps=50, matmul=8192,
                vae_size=(256, 512), vae_batch=64, micro_batches=(32, 16), train_preset="dydit_xl2_256_lambda0.5",
                repeats=5, batch_512=32, input_512=64, compile_steps=10)


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
    return statistics.median(times)


def precision(name: str, device):
    """(autocast context, tf32 flag) for fp32 / tf32 / bf16."""
    tf32 = name != "fp32"
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    dtype = torch.bfloat16 if name == "bf16" else None
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


_BUILT: dict[tuple, torch.nn.Module] = {}


def dit(s, device, seed=0, input_size=None):
    """A DiT of the check's size with random weights (zero-initialised layers re-randomised), on `device`.
    Built once on the CPU per (model, size, seed) and copied: a DiT-XL/2's initialisation takes seconds."""
    key = (s["model"], input_size or s["input_size"], seed)
    if key not in _BUILT:
        model = build_model(key[0], input_size=key[1], num_classes=1000 if key[0] != "debug" else 10)
        randomize_zero_init(model, torch.Generator().manual_seed(seed))
        _BUILT[key] = model.eval()
    return copy.deepcopy(_BUILT[key]).to(device)


def guided_inputs(model, batch, device, seed=0):
    """A doubled (CFG) batch: x (2B, C, h, w) counter noise, y (2B,) labels then the null class."""
    size = model.x_embedder.img_size
    x = CounterNoise.from_seeds(range(seed, seed + batch), device).draw(0, (batch, model.in_channels, size, size))
    y = torch.arange(batch, device=device) % model.num_classes
    return cfg_class_batch(x, y, model.num_classes)


def guided_ddim(runner, x, y, steps: int, device, model_fn=None) -> torch.Tensor:
    """One DDIM run of `runner` with guidance 1.5 under bf16 autocast from the doubled noise x (2B, C, h, w);
    `model_fn` wraps the runner (default: the runner itself)."""
    runner.begin(steps)
    with precision("bf16", device):
        return sample(cfg_model_fn(model_fn or runner, 1.5), x.shape, "ddim", steps, noise=x, model_kwargs={"y": y},
                      step_callback=runner.step_callback)


def method_options(s, steps: int) -> dict:
    """The training-free methods' options at the check's size (the debug model's smoke shapes need smaller
    ones) for a run of `steps`; FlexDiT's entry is the FlexOptions of `flexdit_from_static`."""
    debug = s["model"] == "debug"
    return {"fora": {"interval": 3}, "eb_cache": {"schedule": RELEASED_TABLE_50 if steps == 50 else "0120"},
            "at_edm": {"score_layer": 0, "dense_last": 1} if debug else {},
            "flexdit": FlexOptions(grid_sizes=(3, 2), num_intervals=2) if debug else None}


def matmul_peak(s, device, results) -> dict:
    """The chip's dense matmul throughput: n x n x n products, `inner` back to back between two syncs (one
    product alone, about a millisecond at 8192 on an H200, would count the launch and the sync in it)."""
    n, out, inner = s["matmul"], {}, 20
    for name in ("fp32", "tf32", "bf16"):
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        c = torch.empty(n, n, device=device, dtype=dtype)

        def products(a=a, b=b, c=c):
            for _ in range(inner):
                torch.matmul(a, b, out=c)

        with precision(name, device):
            seconds = timed(products, device, s["repeats"]) / inner
        out[f"{name}_tflops"] = 2 * n**3 / seconds / 1e12
    return out


def static(s, device, results) -> dict:
    peak = results.get("matmul_peak", {})
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


def dydit(s, device, results) -> list[dict]:
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


def training_free(s, device, results) -> list[dict]:
    static_model = dit(s, device)
    steps = 50 if not s["model"] == "debug" else 4
    options = method_options(s, steps)
    x, y = guided_inputs(static_model, s["batch"], device)
    rows, base = [], None
    for method in ("static", *options):
        if method == "flexdit":
            runner = build_runner(method, flexdit_from_static(static_model, options[method]).to(device).eval())
        else:
            runner = build_runner(method, static_model, options.get(method))
        seconds = timed(lambda runner=runner: guided_ddim(runner, x, y, steps, device), device, max(1, s["repeats"] // 2))
        flops = runner.mean_flops()
        if base is None:
            base = (seconds, flops)
        ideal, measured = base[1] / flops, base[0] / seconds
        rows.append({"method": method, "seconds": seconds, "speedup": measured, "flops_ideal_speedup": ideal,
                     "ratio_to_ideal": measured / ideal})
    return rows


def profile(s, device, results) -> list[dict]:
    """Where a model call's time goes (torch.profiler, 3 calls at batch 64, bf16), static network and DyDiT
    fast path: the GPU's busy time against the wall time (a low fraction means launch- or host-bound),
    kernels per call, and the ops that take the most device time. What a session without a GPU needs to
    tune the fast path when its measured speedup falls short of the FLOPs-ideal one."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = torch.device(device).type == "cuda"
    dydit_model = DyDiT.from_static(dit(s, device))
    randomize_routers(dydit_model, torch.Generator().manual_seed(1))
    dydit_model = dydit_model.to(device).eval()
    x, y = guided_inputs(dydit_model, s["batch"], device)
    t = torch.full((x.shape[0],), 500, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows, calls = [], 3
    for method in ("static", "dydit"):
        runner = build_runner(method, dydit_model)

        def call(runner=runner):
            runner.step_callback(0, 500)
            return runner(x, t, y=y)

        with precision("bf16", device), torch.no_grad():
            call()  # the plan of this timestep, cuBLAS handles: outside the profile
            sync(device)
            start = time.perf_counter()
            with torch_profile(activities=activities) as prof:
                for _ in range(calls):
                    call()
                sync(device)
            wall = (time.perf_counter() - start) / calls
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / calls
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        top = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:8]
        rows.append({"method": method, "batch": s["batch"], "profiled_wall_ms_per_call": 1e3 * wall,
                     "gpu_busy_ms_per_call": 1e3 * busy if cuda else None,
                     "busy_fraction": busy / wall if cuda else None, "kernels_per_call": len(kernels) / calls,
                     "top_ops_ms_per_call": "; ".join(f"{e.key[:48]} {getattr(e, key) / 1e3 / calls:.2f}" for e in top)})
    return rows


def vae(s, device, results) -> list[dict] | dict:
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
            try:  # one row's failure (memory at 512 px x 64) keeps the others, the cost table's 256 px bf16 row
                model = AutoencoderKL(down_block_types=blocks[0], up_block_types=blocks[1], block_out_channels=width,
                                      latent_channels=4, layers_per_block=2, norm_num_groups=min(32, width[0]))
                model = model.to(device, DTYPES[name]).eval()
                z = torch.randn(s["vae_batch"], 4, size // 8, size // 8, device=device, dtype=DTYPES[name])
                with precision(name, device), torch.no_grad():  # fp32: strict, TF32 off
                    seconds = timed(lambda model=model, z=z: model.decode(z).sample, device,
                                    max(1, s["repeats"] // 2))
                rows.append({"size": size, "precision": name, "seconds": seconds,
                             "images_per_s": s["vae_batch"] / seconds})
            except Exception as err:  # noqa: BLE001 - recorded in the row
                if type(err).__name__ == "OverBudget":  # the section's time is up (gpu_check.run_section)
                    raise
                rows.append({"size": size, "precision": name, "error": f"{type(err).__name__}: {err}"[:300]})
            finally:
                model = z = None
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
    return rows


def bf16_distance(s, device, results) -> dict:
    model = dit(s, device)
    x, y = guided_inputs(model, min(s["batch"], 8), device)
    out = {}
    for name in ("fp32", "bf16"):
        with precision("fp32" if name == "fp32" else "bf16", device):
            out[name] = sample(cfg_model_fn(model, 1.5), x.shape, "ddim", s["steps"], noise=x, model_kwargs={"y": y})
    return {"steps": s["steps"], "relative_l2": float((out["bf16"] - out["fp32"]).norm() / out["fp32"].norm())}


def static_512(s, device, results) -> dict:
    model = dit(s, device, input_size=s["input_512"])
    x, y = guided_inputs(model, s["batch_512"], device)
    t = torch.full((x.shape[0],), 500, device=device)
    runner = build_runner("static", model)
    with precision("bf16", device), torch.no_grad():
        step = timed(lambda: runner(x, t, y=y), device, s["repeats"])
    return {"batch": s["batch_512"], "step_s": step, "images_per_s_250_steps": s["batch_512"] / (250 * step),
            "model_tflops": 2 * runner.mean_flops() * x.shape[0] / step / 1e12}


def compiled(s, device, results) -> list[dict]:
    """`sample.compile` off and on: DDIM runs at batch 64 (bf16) of the static network and the DyDiT
    fast path; the first compiled run includes the compilation (every plan of the run's timesteps)."""
    dydit_model = DyDiT.from_static(dit(s, device))
    randomize_routers(dydit_model, torch.Generator().manual_seed(1))
    dydit_model = dydit_model.to(device).eval()
    x, y = guided_inputs(dydit_model, s["batch"], device)
    steps, rows = s["compile_steps"], []
    for method in ("static", "dydit"):
        times = {}
        for mode in ("eager", "compiled"):
            runner = build_runner(method, dydit_model)
            if mode == "compiled":
                runner.compile()

            def run(runner=runner):
                guided_ddim(runner, x, y, steps, device)

            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            times[f"{mode}_first_s"] = time.perf_counter() - start
            times[f"{mode}_s"] = timed(run, device, max(1, s["repeats"] // 2))
        rows.append({"method": method, "steps": steps, **times,
                     "compile_speedup": times["eager_s"] / times["compiled_s"],
                     "compile_overhead_s": times["compiled_first_s"] - times["compiled_s"]})
    return rows
