"""benchmarks/gpu_check.py --smoke runs on the CPU and writes its JSON and markdown, so the GPU
check cannot rot between the runs on a GPU machine."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
SECTION_NAMES = ("matmul_peak", "static", "dydit", "train_step", "profile", "static_512", "bf16_distance", "host_syncs",
                 "determinism", "sample_job", "train_job", "vae", "training_free", "compile")


@pytest.mark.slow
def test_smoke_mode_writes_every_section(tmp_path):
    # The DeepSpeed step is left out: a fresh machine compiles DeepSpeed's CPU Adam op first (minutes).
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--skip", "train_step",
                           "--skip", "train_job"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = result["sections"]
    assert result["smoke"] and sections["train_step"] == {"skipped": "--skip"} and result["failed"] == []
    assert list(sections) == list(SECTION_NAMES)
    for row in sections["sample_job"]:  # the sampling actors' code, here on the CPU in bf16
        assert row["samples"] == 8 and row["image_shape"] == [128, 128, 3] and row["alone_vs_in_batch_max_abs"] < 0.05
    assert [row["method"] for row in sections["profile"]] == ["static", "dydit"]
    assert all(row["profiled_wall_ms_per_call"] > 0 and row["top_ops_ms_per_call"] for row in sections["profile"])
    same = sections["determinism"]
    assert same["noise_same_split_into_two_batches"] and same["noise_same_when_drawn_again"]
    assert same["sample_same_when_run_again"] and same["sample_same_split_into_two_batches"]  # on the CPU
    assert same["split_relative_l2"] == 0
    assert [row["method"] for row in sections["host_syncs"]] == ["static", "dydit", "fora", "eb_cache", "flexdit",
                                                                 "at_edm"]
    assert {"fp32", "tf32", "bf16"} <= set(sections["static"])
    assert [row["method"] for row in sections["training_free"]] == ["static", "fora", "eb_cache", "at_edm", "flexdit"]
    assert 0 < sections["bf16_distance"]["relative_l2"] < 0.1
    assert [row["method"] for row in sections["compile"]] == ["static", "dydit"]
    assert all(row["compiled_s"] > 0 and row["eager_s"] > 0 for row in sections["compile"])
    costs = {row["job"]: row for row in result["costs"]}
    assert costs["sample dit_xl2_256 (50k, 250 DDPM steps, CFG)"]["measured_gpu_hours"] > 0
    text = (tmp_path / "gpu_check.md").read_text()
    assert "## dydit" in text and "## Goals (issue 15)" in text and "## Cost (one GPU, measured)" in text


def _driver(monkeypatch):
    """benchmarks/gpu_check.py imported as a module, its sections replaced by stand-ins."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_section_keeps_the_others_and_the_files_and_sets_the_exit_status(monkeypatch, tmp_path):
    driver = _driver(monkeypatch)
    written = []

    def broken(s, device, results):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    monkeypatch.setattr(driver, "SECTIONS", {
        "matmul_peak": (lambda s, device, results: {"bf16_tflops": 1.0}, 1),
        "static": (broken, 1),
        "dydit": (lambda s, device, results: [{"batch": 64, "speedup": 1.5, "ratio_to_ideal": 0.8}], 1)})
    monkeypatch.setattr(driver, "shapes", lambda smoke: {})
    result = driver.run(True, set(), "cpu", 1.0, write=lambda r: written.append(json.loads(json.dumps(r))))
    assert result["failed"] == ["static"]
    assert result["sections"]["static"]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "broken" in result["sections"]["static"]["traceback"]
    assert result["sections"]["dydit"][0]["speedup"] == 1.5
    assert [list(r["sections"]) for r in written] == [["matmul_peak"], ["matmul_peak", "static"],
                                                      ["matmul_peak", "static", "dydit"]]
    goals = {row["goal"]: row["measured"] for row in result["goals"]}
    assert goals["DyDiT fast path at batch 64: measured / FLOPs-ideal speedup"] == 0.8
    assert goals["static bf16 speed vs diffusers (same batch and precision)"] is None

    monkeypatch.setattr(driver, "run", lambda smoke, skip, device, budget_s, write: write(result) or result)
    monkeypatch.setattr(driver.torch.cuda, "is_available", lambda: True)
    assert driver.main(["--out", str(tmp_path)]) == 1
    assert "**Failed sections:** static" in (tmp_path / "gpu_check.md").read_text()


def test_a_section_that_no_longer_fits_the_budget_is_skipped_and_says_why(monkeypatch):
    driver = _driver(monkeypatch)
    ran = []
    monkeypatch.setattr(driver, "SECTIONS", {
        "matmul_peak": (lambda s, device, results: ran.append("matmul_peak") or {}, 5),
        "compile": (lambda s, device, results: ran.append("compile") or [], 150)})
    monkeypatch.setattr(driver, "shapes", lambda smoke: {})
    monkeypatch.setattr(driver, "environment", lambda device: {"device": "stand-in"})
    result = driver.run(False, set(), "cpu", 60.0)
    assert ran == ["matmul_peak"]
    assert result["sections"]["compile"]["skipped"].startswith("budget: 60 s left of 60, the section takes ~150 s")


@pytest.mark.slow
def test_smoke_mode_runs_the_deepspeed_sections(tmp_path):
    """The DeepSpeed sections alone, the ZeRO-2 bf16 step and the training loop (about a minute on CPU once
    DeepSpeed's CPU op is built, which the suite's DeepSpeed tests do anyway): what a GPU run would otherwise
    try for the first time."""
    deepspeed = ("train_step", "train_job")
    others = [arg for name in SECTION_NAMES if name not in deepspeed for arg in ("--skip", name)]
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), *others],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    rows = sections["train_step"]
    assert [row["micro_batch"] for row in rows] == [2, 1]  # two engines in one process, as on the GPU
    assert all(row["fits"] and row["step_s"] > 0 and row["micro_step_s"] > 0 for row in rows)
    job = sections["train_job"]  # the training loop, then a resume from its step-4 checkpoint
    assert job["first_from_step"] == 0 and job["resumed_from_step"] == 4
    assert len(job["first_losses"]) == 4 and len(job["resumed_losses"]) == 2
    assert job["checkpoints"] == ["step-0000002", "step-0000004", "step-0000006"]
    assert job["ema_export"] == "ema-0000006.safetensors"


def test_a_section_still_running_when_the_budget_runs_out_is_stopped(monkeypatch):
    driver = _driver(monkeypatch)

    def endless(s, device, results):
        while True:
            time.sleep(0.01)

    monkeypatch.setattr(driver, "SECTIONS", {"static": (endless, 10), "dydit": (lambda s, d, r: [], 0)})
    monkeypatch.setattr(driver, "shapes", lambda smoke: {})
    monkeypatch.setattr(driver, "environment", lambda device: {"device": "stand-in"})
    began = time.perf_counter()
    result = driver.run(False, set(), "cpu", 10.5)
    assert 10 <= time.perf_counter() - began < 15  # the budget's end, not the section's cap of 20 s
    assert result["failed"] == ["static"]
    assert result["sections"]["static"]["error"].startswith("OverBudget: still running at its limit")
    assert result["sections"]["dydit"]["skipped"].startswith("budget:")


def test_a_section_running_twice_its_expected_time_is_stopped_and_the_next_one_runs(monkeypatch):
    driver = _driver(monkeypatch)

    def endless(s, device, results):
        while True:
            time.sleep(0.01)

    monkeypatch.setattr(driver, "SECTIONS", {"static": (endless, 0.25), "dydit": (lambda s, d, r: [{"batch": 8}], 1)})
    monkeypatch.setattr(driver, "shapes", lambda smoke: {})
    monkeypatch.setattr(driver, "environment", lambda device: {"device": "stand-in"})
    result = driver.run(False, set(), "cpu", 60.0)
    assert 0.5 <= result["section_seconds"]["static"] < 5 and result["failed"] == ["static"]
    assert result["sections"]["dydit"] == [{"batch": 8}]



def test_gpu_run_without_the_carried_wheels_says_how_to_make_them(tmp_path):
    """On the GPU machine the wheels come from benchmarks/gpu_bundle.sh; without them, one line and rc 2."""
    (tmp_path / "benchmarks").mkdir()
    script = tmp_path / "benchmarks" / "gpu_run.sh"
    script.write_bytes((SCRIPT.parent / "gpu_run.sh").read_bytes())
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"no wheels in {tmp_path}/.whl: run 'bash benchmarks/gpu_bundle.sh'" in done.stderr


@pytest.mark.parametrize("args, message", [(["--python-version", "312"], "--python-version wants X.Y, got '312'"),
                                           (["--pyversion=3.12"], "unknown argument '--pyversion=3.12'")])
def test_gpu_bundle_refuses_a_bad_argument_before_touching_the_wheels(args, message):
    done = subprocess.run(["bash", str(SCRIPT.parent / "gpu_bundle.sh"), *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and message in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--torch", "latest"], "--torch wants a version such as 2.11.0, got 'latest'"),
    (["--cuda"], "unknown argument '--cuda'"),
    (["--python", "/nonexistent/python3.12"], "'/nonexistent/python3.12' does not run: pass --python PATH")])
def test_gpu_rehearse_refuses_bad_input_before_building_anything(args, message, tmp_path):
    done = subprocess.run(["bash", str(SCRIPT.parent / "gpu_rehearse.sh"), *args, "--venv", str(tmp_path / "v")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "v").exists()


def _gpu_result(hours):
    return {"smoke": False, "environment": {"device": "NVIDIA H200", "torch": "2.11.0"},
            "costs": [{"measured_gpu_hours": h} for h in hours]}


def test_the_readme_cost_table_gets_a_measured_column_beside_the_estimate(monkeypatch, tmp_path):
    driver = _driver(monkeypatch)
    original = (SCRIPT.parents[1] / "README.md").read_text()
    readme = tmp_path / "README.md"
    readme.write_text(original + "\n## Later\n\nkept\n")
    driver.update_readme(readme, _gpu_result([1.234, 0.75, None, 2.5]))
    text = readme.read_text()
    assert "## What a full-scale run costs (measured)" in text and "No GPU numbers were measured" not in text
    assert "| job | work | PFLOP | measured NVIDIA H200 GPU-hours | est. H100 GPU-hours |" in text
    assert "| 5,935 | 1.23 | ~4.1 |" in text and "| 26,241 | not measured | ~18 |" in text
    assert "| 0.3 | not measured | < 0.1 |" in text and text.endswith("\n## Later\n\nkept\n")
    assert text[: text.index("## What a full-scale run costs")] == original[: original.index("## What a full-scale")]
    driver.update_readme(readme, _gpu_result([1.5, 0.75, None, 2.5]))  # a second GPU run replaces the column
    again = readme.read_text()
    assert again == text.replace("| 5,935 | 1.23 |", "| 5,935 | 1.50 |") and again.count("measured NVIDIA") == 1
    with pytest.raises(SystemExit, match="not updated from a --smoke run"):
        driver.update_readme(readme, {**_gpu_result([1.0]), "smoke": True})


def test_a_section_starts_from_torchs_tf32_defaults(monkeypatch):
    """`precision("tf32" / "bf16")` turns TF32 on for its section; the next section (the training step, which
    Ray's workers run without TF32) used to measure with it still on."""
    import torch

    driver = _driver(monkeypatch)
    seen = []

    def sets_tf32(s, device, results):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = False
        return {}

    monkeypatch.setattr(driver, "SECTIONS", {
        "static": (sets_tf32, 5),
        "train_step": (lambda s, device, results: seen.append(
            (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)) or {}, 5)})
    monkeypatch.setattr(driver, "shapes", lambda smoke: {})
    monkeypatch.setattr(driver, "environment", lambda device: {"device": "stand-in"})
    try:
        driver.run(False, set(), "cpu", 60.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    assert seen == [(False, True)]
