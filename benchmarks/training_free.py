"""Training-free acceleration (FORA, EB-Cache, AT-EDM, EB-Cache on DyDiT) against static sampling, in one run.

    python benchmarks/training_free.py [--model DiT-S/2] [--image-size 256] [--steps 50] [--batch 8]
        [--cfg-scale 1.5] [--device cpu] [--dtype fp32|bf16] [--threads N] [--methods at_edm,...]
        [--no-exposure-study] [--tag T]

Part 1 (speed and fidelity). DDPM sampling with classifier-free guidance (2 x batch rows per model
call) of a randomly initialized DiT whose zero-initialized adaLN / output layers are re-randomized
(`accel.synthetic`), so every block matters. All methods start from the same noise and draw the same
step noise, and they advance in LOCKSTEP: at each step every method makes its model call in turn
(rotating the order), so the load of a shared machine hits all of them alike. Per method: model-call
time, measured speedup over static, the FLOPs-ideal speedup from `runner.flops_per_step()`, their
ratio, the relative L2 distance of the final latents from the static run's, and the ratio of the
guided noise prediction's norm to static's (mean over steps), which shows which way caching moves it.

Part 2 (exposure-bias correction, `--no-exposure-study` skips it). Random weights cannot show whether
a correction helps, so a tiny DiT is trained for a minute on a synthetic data set whose distribution
is known exactly (a 10-class Gaussian mixture on 4x8x8 "latents"), and samples of static sampling and
of EB-Cache with no / the paper's (1/b(t) > 1) / the released (1/0.965) correction are compared with
that distribution: Frechet distance to the true mixture moments (lower is better), and the
exposure-bias norm ratio ||eps_sampling|| / ||eps_training|| at the same timesteps (Ning et al.:
above 1 means exposure bias; the correction should bring it to 1).

Writes benchmarks/results/training_free[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from stamp import stamp

from dydit_dist.accel import RELEASED_TABLE_50, ATEDMOptions, EBCacheOptions, FORAOptions, build_runner
from dydit_dist.accel.synthetic import randomize_routers, randomize_zero_init
from dydit_dist.diffusion import cfg_class_batch, cfg_model_fn, create_diffusion, ddpm_step, randn_per_sample
from dydit_dist.dynamic import DyDiT
from dydit_dist.models import build_model

RESULTS = Path(__file__).parent / "results"

# name, method, options, on the DyDiT
ROWS = [
    ("static", "static", None, False),
    ("FORA N=3", "fora", FORAOptions(interval=3), False),
    ("EB-Cache released table, paper 1/b(t)", "eb_cache", EBCacheOptions(RELEASED_TABLE_50, "paper"), False),
    ("EB-Cache released table, no correction", "eb_cache", EBCacheOptions(RELEASED_TABLE_50, "none"), False),
    # AT-EDM: the paper's per-layer ranking with its budget-conserving DSAP plan, and the single
    # ranking at block 2 (its DSAP prunes nothing in the first 20% of steps; "no DSAP" matches the budget)
    ("AT-EDM per-layer ratio 0.3", "at_edm", ATEDMOptions(ratio=0.3), False),
    ("AT-EDM per-layer ratio 0.5", "at_edm", ATEDMOptions(ratio=0.5), False),
    ("AT-EDM single ratio 0.3", "at_edm", ATEDMOptions(ratio=0.3, variant="single"), False),
    ("AT-EDM single ratio 0.5", "at_edm", ATEDMOptions(ratio=0.5, variant="single"), False),
    ("AT-EDM single ratio 0.5, no DSAP", "at_edm", ATEDMOptions(ratio=0.5, variant="single", dsap_fraction=0.0),
     False),
    ("DyDiT fast path", "dydit", None, True),
    ("DyDiT + EB-Cache (paper)", "eb_cache", EBCacheOptions(RELEASED_TABLE_50, "paper"), True),
]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def lockstep_ddpm(fns: dict, runners: dict, noise, cond: dict, steps: int, seed: int, device: str,
                  channels: int) -> dict:
    """DDPM-sample every `fns[name]` from the same noise in lockstep (exactly `diffusion.sample` for each).

    -> {name: {"x": final latents, "time": seconds in model calls, "eps_norm": per-step mean ||eps||}}.
    """
    diffusion = create_diffusion(str(steps))
    generator = torch.Generator().manual_seed(seed)
    state = {n: {"x": noise.clone(), "time": 0.0, "eps_norm": []} for n in fns}
    for runner in runners.values():
        runner.begin(steps)
    names = list(fns)
    for i, index in enumerate(range(diffusion.num_timesteps - 1, -1, -1)):
        timestep = int(diffusion.timestep_map[index])
        step_noise = randn_per_sample(noise.shape, generator, device) if index > 0 else None
        t_model = torch.full((noise.shape[0],), timestep, dtype=torch.long, device=device)
        t_index = torch.full((noise.shape[0],), index, dtype=torch.long, device=device)
        for name in names[i % len(names):] + names[: i % len(names)]:
            s = state[name]
            runners[name].step_callback(i, timestep)
            _sync(device)
            start = time.perf_counter()
            out = fns[name](s["x"], t_model, **cond)
            _sync(device)
            s["time"] += time.perf_counter() - start
            s["eps_norm"].append(float(out[:, :channels].float().flatten(1).norm(dim=1).mean()))
            s["x"] = ddpm_step(diffusion, out.float(), s["x"], t_index, step_noise)
    return state


def in_dtype(runner, dtype):
    """The runner on inputs cast to `dtype`, returning float32 (the sampler's precision)."""
    return lambda x, t, **kw: runner(x.to(dtype), t, **kw).float()


def speed_table(args, dtype) -> dict:
    torch.manual_seed(args.seed)  # the models' own initialization draws from the global generator
    g = torch.Generator().manual_seed(args.seed)
    size = args.image_size // 8
    static = build_model(args.model, input_size=size, num_classes=1000)
    randomize_zero_init(static, g)
    dydit = DyDiT.from_static(static)
    randomize_routers(dydit, g)
    static, dydit = static.to(args.device, dtype).eval(), dydit.to(args.device, dtype).eval()
    noise = randn_per_sample((args.batch, 4, size, size), g, args.device)
    labels = torch.randint(0, 1000, (args.batch,), generator=g).to(args.device)
    x, y = cfg_class_batch(noise, labels, 1000)
    rows = [r for r in ROWS if args.steps == 50 or r[1] != "eb_cache"]  # the released table has 50 steps
    if args.methods:
        rows = [r for r in rows if r[1] == "static" or r[1] in args.methods.split(",")]
    runners = {name: build_runner(method, dydit if dyn else static, opts) for name, method, opts, dyn in rows}
    fns = {name: cfg_model_fn(in_dtype(r, dtype), args.cfg_scale) for name, r in runners.items()}
    with torch.no_grad():  # warm-up: one call each (allocators, kernels); begin() resets the runners again
        for name, fn in fns.items():
            runners[name].begin(args.steps)
            runners[name].step_callback(0, 999)
            fn(x, torch.full((len(x),), 999, device=args.device), y=y)
    load_before = os.getloadavg()
    wall = time.perf_counter()
    state = lockstep_ddpm(fns, runners, x, {"y": y}, args.steps, args.seed, args.device, 4)
    wall = time.perf_counter() - wall
    base = state["static"]
    base_flops = runners["static"].mean_flops()
    ref = base["x"][: args.batch]
    results = []
    for name, method, _, dyn in rows:
        s, r = state[name], runners[name]
        measured, ideal = base["time"] / s["time"], base_flops / r.mean_flops()
        row = {"name": name, "method": method, "on_dydit": dyn, "model_time_s": s["time"],
               "gflops_per_call": r.mean_flops() / 1e9, "measured_speedup": measured, "flops_ideal_speedup": ideal,
               "ratio": measured / ideal,
               "rel_l2": float((s["x"][: args.batch] - ref).norm() / ref.norm()),
               "eps_norm_ratio": float(np.mean(np.array(s["eps_norm"]) / np.array(base["eps_norm"])))}
        if dyn and method != "dydit":  # caching on top of the fast path, against the fast path itself
            d = state["DyDiT fast path"]
            row["vs_dydit_measured"] = d["time"] / s["time"]
            row["vs_dydit_ideal"] = runners["DyDiT fast path"].mean_flops() / r.mean_flops()
        results.append(row)
    return {"rows": results, "wall_s": wall, "load_before": load_before, "load_after": os.getloadavg()}


# ----------------------------------------------------------------------------- exposure-bias study


def toy_data(n: int, generator: torch.Generator, spec: dict):
    """n samples (n, 4, 8, 8) of the 10-class Gaussian mixture and their labels."""
    labels = torch.randint(0, 10, (n,), generator=generator)
    z = torch.randn(n, spec["factors"].shape[1], generator=generator)
    x = spec["means"][labels] + z @ spec["factors"].T + 0.1 * torch.randn(n, 256, generator=generator)
    return x.reshape(n, 4, 8, 8), labels


def toy_spec(generator: torch.Generator) -> dict:
    """Class means and a shared low-rank covariance; the mixture's exact mean and covariance."""
    means = torch.randn(10, 256, generator=generator) * 0.8
    factors = torch.randn(256, 16, generator=generator) * 0.15
    cov = factors @ factors.T + 0.01 * torch.eye(256)
    mix_mean = means.mean(0)
    mix_cov = cov + (means - mix_mean).T @ (means - mix_mean) / 10
    return {"means": means, "factors": factors, "mean": mix_mean.double(), "cov": mix_cov.double()}


def frechet_to(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    """Frechet distance between the Gaussian fit of samples (n, d) and N(mean, cov)."""
    from scipy import linalg

    x = samples.double().flatten(1)
    mu, sigma = x.mean(0), torch.cov(x.T)
    root = linalg.sqrtm(sigma.numpy() @ cov.numpy()).real
    return float((mu - mean).pow(2).sum() + torch.trace(sigma) + torch.trace(cov) - 2 * np.trace(root))


def exposure_study(args) -> dict:
    torch.manual_seed(args.seed + 1)
    g = torch.Generator().manual_seed(args.seed + 1)
    spec = toy_spec(g)
    model = build_model("debug", input_size=8, num_classes=10, learn_sigma=False, class_dropout_prob=0.0)
    diffusion = create_diffusion("1000")
    abar = torch.tensor(diffusion.alphas_cumprod, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.toy_train_steps, pct_start=0.1)
    start = time.perf_counter()
    for _ in range(args.toy_train_steps):  # eps-prediction MSE, uniform timesteps
        x0, y = toy_data(128, g, spec)
        t = torch.randint(0, 1000, (128,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        loss = (model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, y) - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr.step()
    train_s = time.perf_counter() - start
    model.eval()
    variants = {"static": ("static", None), "EB-Cache, no correction": ("eb_cache", EBCacheOptions(eps_scale="none")),
                "EB-Cache, paper 1/b(t) (>1)": ("eb_cache", EBCacheOptions(eps_scale="paper")),
                "EB-Cache, released 1/0.965 (>1)": ("eb_cache", EBCacheOptions(eps_scale="released")),
                "no cache, paper 1/b(t) (>1)": ("eb_cache", EBCacheOptions("0" * 50, "paper")),
                "no cache, released 1/0.965 (>1)": ("eb_cache", EBCacheOptions("0" * 50, "released"))}
    runners = {name: build_runner(m, model, o) for name, (m, o) in variants.items()}
    n = args.toy_samples
    noise = torch.randn(n, 4, 8, 8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    with torch.no_grad():
        state = lockstep_ddpm(dict(runners), runners, noise, {"y": labels}, 50, args.seed, "cpu", 4)
        # the training-time norm of the noise prediction at the same timesteps, on forward-diffused data
        sched = create_diffusion("50")
        x0, y = toy_data(n, g, spec)
        train_norm = []
        for index in range(49, -1, -1):
            t = torch.full((n,), int(sched.timestep_map[index]))
            a = abar[t].view(-1, 1, 1, 1)
            pred = model(a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g), t, y)
            train_norm.append(float(pred.flatten(1).norm(dim=1).mean()))
    floor = frechet_to(toy_data(n, g, spec)[0].flatten(1), spec["mean"], spec["cov"])
    rows = [{"name": name, "fd_to_data": frechet_to(state[name]["x"].flatten(1), spec["mean"], spec["cov"]),
             "eb_norm_ratio": float(np.mean(np.array(state[name]["eps_norm"][:-1]) / np.array(train_norm[:-1]))),
             "rel_l2_vs_static": float((state[name]["x"] - state["static"]["x"]).norm() / state["static"]["x"].norm())}
            for name in variants]
    return {"rows": rows, "fd_data_vs_data": floor, "final_train_loss": float(loss.detach()), "train_s": train_s,
            "train_steps": args.toy_train_steps, "samples": n}


# ----------------------------------------------------------------------------- report


def to_markdown(result: dict) -> str:
    a, lines = result["args"], []
    if result.get("source"):
        src = result["source"]
        lines += [f"Measured at commit {src['commit']}{' with uncommitted changes' if src['dirty'] else ''}.", ""]
    if "speed" in result:
        s = result["speed"]
        lines += [f"## {a['model']} {a['image_size']}px, {a['steps']} DDPM steps, batch {a['batch']} x2 (cfg "
                  f"{a['cfg_scale']}), {a['device']} {a['dtype']}, {result['env']['threads']} threads",
                  "", "| method | model time s | measured speedup | FLOPs-ideal speedup | ratio | GFLOPs per image forward | "
                  "rel. L2 vs static | eps-norm ratio |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in s["rows"]:
            lines.append(f"| {r['name']} | {r['model_time_s']:.1f} | {r['measured_speedup']:.2f}x | "
                         f"{r['flops_ideal_speedup']:.2f}x | {r['ratio']:.2f} | {r['gflops_per_call']:.2f} | "
                         f"{r['rel_l2']:.5f} | {r['eps_norm_ratio']:.4f} |")
        for r in s["rows"]:
            if "vs_dydit_measured" in r:
                lines.append(f"\n{r['name']} against the DyDiT fast path alone: measured "
                             f"{r['vs_dydit_measured']:.2f}x, FLOPs-ideal {r['vs_dydit_ideal']:.2f}x, ratio "
                             f"{r['vs_dydit_measured'] / r['vs_dydit_ideal']:.2f}.")
        lines.append(f"\nWall time {s['wall_s']:.0f} s; load average {s['load_before'][0]:.1f} before, "
                     f"{s['load_after'][0]:.1f} after (on {result['env']['cpus']} CPUs).")
    if "exposure" in result:
        e = result["exposure"]
        lines += ["", f"## Exposure-bias correction on a trained toy DiT (debug, 4x8x8, {e['train_steps']} "
                  f"training steps, {e['samples']} samples, 50 DDPM steps, released table)", "",
                  "| variant | FD to the data distribution | eps-norm ratio sampling/training | rel. L2 vs static |",
                  "| --- | ---: | ---: | ---: |"]
        for r in e["rows"]:
            lines.append(f"| {r['name']} | {r['fd_to_data']:.3f} | {r['eb_norm_ratio']:.4f} | "
                         f"{r['rel_l2_vs_static']:.4f} |")
        lines.append(f"\nFD of {e['samples']} fresh data samples (the estimator's floor): {e['fd_data_vs_data']:.4f}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default); on a shared 2-core machine one thread is both "
                             "faster and steadier (no spinning OpenMP barrier waiting for a descheduled twin)")
    parser.add_argument("--methods", default="", help="comma-separated methods to compare with static "
                        "(e.g. at_edm); default: every row")
    parser.add_argument("--no-exposure-study", dest="exposure_study", action="store_false")
    parser.add_argument("--no-speed-table", dest="speed_table", action="store_false")
    parser.add_argument("--toy-train-steps", type=int, default=2000)
    parser.add_argument("--toy-samples", type=int, default=1024)
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    result = {"args": vars(args) | {"out": str(args.out)}, "source": stamp(),
              "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                      "machine": platform.processor() or platform.machine()}}
    if args.speed_table:
        result["speed"] = speed_table(args, dtype)
    if args.exposure_study:
        result["exposure"] = exposure_study(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "training_free" + (f"_{args.tag}" if args.tag else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    table = to_markdown(result)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
