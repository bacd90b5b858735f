"""The one-command GPU check (issue 15): what the project's GPU paths cost on the machine it runs on.

    python benchmarks/gpu_check.py                 # one H100 / H200, at most ~8 minutes (--budget-s)
    python benchmarks/gpu_check.py --smoke         # CPU, tiny shapes, seconds: keeps the script from rotting
    bash benchmarks/gpu_run.sh                     # the same on a bare GPU machine, with the carried wheels

Writes benchmarks/results/gpu_check.{json,md} (`--out` to change the folder) after every section, so a run
stopped from outside keeps what it measured. A section that fails is recorded with its error and the
others still run (exit status 1 then). The sections and what each measures: `gpu_sections.py` (speed)
and `gpu_jobs.py` (the project's own jobs and checks on the device). The markdown opens with the issue's
goals and the cost table computed from the measured rows.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
from gpu_jobs import determinism, host_syncs, sample_job, train_job, train_step
from gpu_sections import (
    bf16_distance,
    compiled,
    dydit,
    matmul_peak,
    profile,
    shapes,
    static,
    static_512,
    training_free,
    vae,
)

# The sections in the order they run: what the goals need first, then the rest; each with the
# seconds it is expected to take on an H100/H200, on the safe side: `run` skips a section that
# would not fit in what is left of the budget, and stops one still running at twice its expected time.
SECTIONS = {
    "matmul_peak": (matmul_peak, 15),
    "static": (static, 40),
    "dydit": (dydit, 40),
    "train_step": (train_step, 90),
    "profile": (profile, 20),
    "static_512": (static_512, 25),
    "bf16_distance": (bf16_distance, 20),
    "host_syncs": (host_syncs, 20),
    "determinism": (determinism, 15),
    "sample_job": (sample_job, 20),
    "train_job": (train_job, 40),
    "vae": (vae, 30),
    "training_free": (training_free, 90),
    "compile": (compiled, 150),
}

# The cost table's rows: the README's FLOPs estimates (H100 at 40% of its dense bf16 peak) beside what
# the measured throughput gives.
ESTIMATES = {
    "sample dit_xl2_256 (50k, 250 DDPM steps, CFG)": 4.1,
    "sample dydit_xl2_256_lambda0.5 (same)": 2.0,
    "sample dit_xl2_512 (50k, 250 DDPM steps, CFG)": 18.0,
    "finetune dydit_xl2_256_lambda0.5 stage 1, per 10k steps at batch 256": 2.5,
}


def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count)
    else:
        env["device"] = platform.processor() or platform.machine()
    for package in ("diffusers", "deepspeed", "omegaconf", "numpy"):
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package] = None
    return env


class OverBudget(Exception):
    """A section still running at its time limit."""


def _over_budget(signum, frame):
    raise OverBudget("still running at its limit (twice its expected time, or what was left of --budget-s); "
                     "stopped")


def run_section(name, fn, s, device, results, limit_s: float | None = None) -> tuple[object, bool]:
    """(the section's result, whether it ran without an error); a failure is kept as its error message
    and the last lines of its traceback, and the GPU's cached memory is freed for the next section.
    With `limit_s`, a SIGALRM stops the section after that many seconds (between Python bytecodes: a
    kernel already queued finishes)."""
    if limit_s is not None:
        previous = signal.signal(signal.SIGALRM, _over_budget)
        signal.setitimer(signal.ITIMER_REAL, max(limit_s, 0.001))
    # torch's defaults (matmuls fp32, cuDNN TF32): a section that set TF32 (`precision`) must not carry it into
    # the next, whose training step would then measure TF32 matmuls that Ray's training workers never use
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    try:
        try:
            return fn(s, device, results), True
        finally:  # the timer off first: an alarm while the failure is recorded would lose every later section
            if limit_s is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
    except Exception as err:  # noqa: BLE001 - one section's failure must not lose the others' numbers
        tail = traceback.format_exc().strip().splitlines()[-12:]
        print(f"{name}: FAILED: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                "traceback": "\n".join(tail)}, False
    finally:
        if device.startswith("cuda"):
            try:  # a section that broke the CUDA context fails the next ones too, each recorded
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
            except Exception as err:  # noqa: BLE001 - reported; the next sections say what they meet
                print(f"{name}: the GPU did not recover after it: {type(err).__name__}: {err}", file=sys.stderr,
                      flush=True)


def run(smoke: bool, skip: set[str], device: str, budget_s: float, write=None) -> dict:
    """Every section in order, skipping those named in `skip` and those whose expected time no longer
    fits in `budget_s`, and stopping one still running at twice its expected time or when the budget
    runs out; `write(result)` after each."""
    s = shapes(smoke)
    result = {"environment": environment(device), "smoke": smoke, "budget_s": budget_s, "sections": {},
              "section_seconds": {}, "failed": []}
    out, began = result["sections"], time.perf_counter()
    for name, (fn, expected_s) in SECTIONS.items():
        left = budget_s - (time.perf_counter() - began)
        if name in skip:
            out[name] = {"skipped": "--skip"}
        elif not smoke and expected_s > left:
            out[name] = {"skipped": f"budget: {left:.0f} s left of {budget_s:.0f}, the section takes ~{expected_s} s"}
        else:
            start = time.perf_counter()
            # A section may take twice its expected time, so that one slow section leaves the rest their turn.
            limit = None if smoke else min(left, 2 * expected_s)
            out[name], ok = run_section(name, fn, s, device, out, limit)
            result["section_seconds"][name] = time.perf_counter() - start
            if not ok:
                result["failed"].append(name)
            print(f"{name}: {result['section_seconds'][name]:.1f} s", flush=True)
        result["goals"], result["costs"] = goals(out), costs(out)
        if write is not None:
            write(result)
    return result


def _row(sections: dict, name: str, **match) -> dict:
    """The first row of a list-valued section whose fields equal `match` ({} when the section did not run,
    failed, or has no such row)."""
    rows = sections.get(name)
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), {}) if isinstance(rows, list) else {}


def _result(sections: dict, name: str) -> dict:
    """A dict-valued section's result ({} when it did not run as a dict)."""
    value = sections.get(name)
    return value if isinstance(value, dict) else {}


def goals(sections: dict) -> list[dict]:
    """The issue's targets against what was measured (None where the section did not run)."""
    static = _result(sections, "static").get("bf16", {})
    dydit64, step32 = _row(sections, "dydit", batch=64), _row(sections, "train_step", micro_batch=32)
    compiled = {m: _row(sections, "compile", method=m) for m in ("static", "dydit")}
    det, train = _result(sections, "determinism"), _result(sections, "train_job")
    jobs = [_row(sections, "sample_job", method=m).get("samples") for m in ("static", "dydit")]
    syncs = sections.get("host_syncs")
    counted = [r["within_budget"] for r in syncs if r.get("within_budget") is not None] \
        if isinstance(syncs, list) else []
    compiled_static = compiled["static"]
    per_call = compiled_static["compiled_s"] / compiled_static["steps"] if "compiled_s" in compiled_static else None
    rows = [
        ("static bf16 speed vs diffusers (same batch and precision)", static.get("speedup_vs_diffusers"), ">= 1.2"),
        ("the same with sample.compile (a DDIM run's time per model call, sampler included)",
         static["diffusers_step_s"] / per_call if per_call and static.get("diffusers_step_s") else None, ">= 1.2"),
        ("static bf16 model TFLOP/s / chip bf16 matmul peak", static.get("fraction_of_peak"), ">= 0.5"),
        ("DyDiT fast path at batch 64: measured / FLOPs-ideal speedup", dydit64.get("ratio_to_ideal"), ">= 0.9"),
        ("stage-1 ZeRO-2 bf16 step at micro-batch 32: fits", step32.get("fits"), "true"),
        ("stage-1 step at micro-batch 32: peak memory GiB", step32.get("peak_memory_gib"), "report"),
        ("every runner's CUDA syncs per step within its CPU-tested budget", all(counted) if counted else None, "true"),
        ("the sampling actors' code (ShardGenerator, bf16, VAE) made its shard, static and DyDiT",
         jobs == [8, 8] if any(jobs) else None, "true"),
        ("the training job's loop (Trainer, ZeRO-2 bf16, EMA, checkpoints) ran and resumed from step 4",
         train.get("resumed_from_step") == 4 and train.get("ema_export") == "ema-0000006.safetensors"
         if "resumed_from_step" in train else None, "true"),
        ("counter noise bit for bit when a batch is split", det.get("noise_same_split_into_two_batches"), "true"),
        ("bf16 DDIM sample bit for bit when a batch is split", det.get("sample_same_split_into_two_batches"),
         f"report (relative L2 {det.get('split_relative_l2')})"),
        ("sample.compile speedup, static", compiled["static"].get("compile_speedup"), "> 1.05: default on"),
        ("sample.compile speedup, DyDiT fast path", compiled["dydit"].get("compile_speedup"), "> 1.05: default on"),
    ]
    return [{"goal": goal, "measured": value, "target": target} for goal, value, target in rows]


def costs(sections: dict) -> list[dict]:
    """GPU-hours of the README's cost-table rows from the measured throughput (one GPU)."""
    images_s = _result(sections, "static").get("bf16", {}).get("images_per_s_250_steps")
    dydit64, step32 = _row(sections, "dydit", batch=64), _row(sections, "train_step", micro_batch=32)
    at512 = _result(sections, "static_512")
    vae = sections.get("vae") if isinstance(sections.get("vae"), list) else []
    bf16_vae = sorted((r for r in vae if r.get("precision") == "bf16"), key=lambda r: r["size"])  # 256, 512 px
    vae256, vae512 = (bf16_vae[i] if len(bf16_vae) > i else {} for i in (0, 1))  # (smoke: one tiny size)

    def sampling_hours(images_per_s, vae_row):
        if not images_per_s or not vae_row.get("images_per_s"):  # a VAE row that failed (out of memory at
            return None  # 512 px, say) is not a free decode
        return 50_000 * (1 / images_per_s + 1 / vae_row["images_per_s"]) / 3600

    measured = {
        "sample dit_xl2_256 (50k, 250 DDPM steps, CFG)": (sampling_hours(images_s, vae256),
                                                          "static bf16, batch 64, + bf16 VAE decode"),
        "sample dydit_xl2_256_lambda0.5 (same)": (
            sampling_hours(images_s * dydit64["speedup"], vae256) if images_s and dydit64.get("speedup") else None,
            "static x the fast path's measured speedup at batch 64 (routers at ~half width)"),
        "sample dit_xl2_512 (50k, 250 DDPM steps, CFG)": (sampling_hours(at512.get("images_per_s_250_steps"), vae512),
                                                          "static bf16, batch 32, + bf16 VAE decode"),
        "finetune dydit_xl2_256_lambda0.5 stage 1, per 10k steps at batch 256": (
            10_000 * (7 * step32["micro_step_s"] + step32["step_s"]) / 3600 if step32.get("step_s") else None,
            "a step of 256 on one GPU: 7 micro-batches of 32, then the 8th with the reduction and the optimizer"),
    }
    return [{"job": job, "measured_gpu_hours": hours, "estimate_h100_gpu_hours": ESTIMATES[job], "from": how}
            for job, (hours, how) in measured.items()]


def _table(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")).replace("\n", "<br>")
                 for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# GPU check ({env['device']}, torch {env['torch']}, CUDA {env['cuda']}"
             f"{', SMOKE: tiny CPU shapes' if result['smoke'] else ''})", "",
             "Made by `benchmarks/gpu_check.py`; every number as measured in this one run.", "",
             "## Goals (issue 15)", "", *_table(result["goals"]),
             "## Cost (one GPU, measured) beside the README's FLOPs estimate", "", *_table(result["costs"])]
    if result["failed"]:
        lines += [f"**Failed sections:** {', '.join(result['failed'])} (errors below).", ""]
    for name, value in result["sections"].items():
        lines += [f"## {name}", ""]
        rows = value if isinstance(value, list) else [{"setting": k, **v} for k, v in value.items()] \
            if value and all(isinstance(v, dict) for v in value.values()) else [value]
        lines += _table(rows)
    lines += ["## Environment", "", *_table([env]),
              "Section seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["section_seconds"].items()), ""]
    return "\n".join(lines)


COST_HEADING = "## What a full-scale run costs"


def update_readme(readme: Path, result: dict) -> None:
    """Rewrite the README's cost section from a GPU run: a measured column beside the FLOPs estimate.

    The section's table keeps its rows (job, work, PFLOP, estimate); its first four rows are the
    cost rows of `costs()` in order, the rest get "not measured". Running it again replaces the column."""
    if result.get("smoke"):
        raise SystemExit(f"{readme}: not updated from a --smoke run (tiny CPU shapes)")
    text = readme.read_text()
    start = text.find(COST_HEADING)
    if start < 0:
        raise SystemExit(f"{readme}: no '{COST_HEADING}' section to update")
    end = text.find("\n## ", start + 1)
    end = len(text) if end < 0 else end + 1
    lines = text[start:end].splitlines()
    table = [i for i, line in enumerate(lines) if line.startswith("|")]
    if len(table) < 3:
        raise SystemExit(f"{readme}: the cost section has no table")
    device = result["environment"]["device"]
    column = f"measured {device} GPU-hours"
    hours = [row["measured_gpu_hours"] for row in result["costs"]]
    rows = []
    for n, i in enumerate(table):
        cells = [c.strip() for c in lines[i].strip("|").split("|")]
        if n == 0:
            cells = [c for c in cells if not c.startswith("measured ")]
            cells.insert(3, column)
        elif n == 1:
            cells = ["---"] + ["---:"] * 4
        else:
            if len(cells) == 5:
                del cells[3]
            k = n - 2
            cells.insert(3, f"{hours[k]:.2f}" if k < len(hours) and hours[k] is not None else "not measured")
        rows.append("| " + " | ".join(cells) + " |")
    intro = (f"Measured by `benchmarks/gpu_check.py` on one {device} (torch {result['environment']['torch']}, "
             "bf16 sampling, the numbers in `benchmarks/results/gpu_check.md`), one GPU per row; the "
             "estimate column is the analytic FLOPs (`python -m dydit_dist.flops`, 2 FLOPs per "
             "multiply-accumulate) at an assumed 40% of an H100's dense bf16 peak (~400 TFLOP/s sustained).")
    section = [f"{COST_HEADING} (measured)", "", intro, "", *rows, ""]
    readme.write_text(text[:start] + "\n".join(section) + "\n" + text[end:].lstrip("\n") if end < len(text)
                      else text[:start] + "\n".join(section))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, seconds")
    parser.add_argument("--skip", action="append", default=[], choices=list(SECTIONS))
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip a section whose expected time no longer fits (not in --smoke)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--readme", metavar="GPU_CHECK_JSON",
                        help="measure nothing: rewrite README.md's cost table from a GPU run's gpu_check.json")
    args = parser.parse_args(argv)
    if args.readme:
        update_readme(Path(__file__).resolve().parents[1] / "README.md", json.loads(Path(args.readme).read_text()))
        return 0
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --smoke")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(result):  # whole files (a temporary renamed): a run stopped mid-write keeps the last ones
        for name, text in (("gpu_check.json", json.dumps(result, indent=2)), ("gpu_check.md", to_markdown(result))):
            (out / f".{name}.tmp").write_text(text + "\n")
            os.replace(out / f".{name}.tmp", out / name)

    result = run(args.smoke, set(args.skip), "cpu" if args.smoke else "cuda", args.budget_s, write)
    print(to_markdown(result))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
