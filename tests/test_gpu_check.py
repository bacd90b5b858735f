"""benchmarks/gpu_check.py --smoke runs on the CPU and writes its JSON and markdown, so the GPU
check cannot rot between the runs on a GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_smoke_mode_writes_every_section(tmp_path):
    # The DeepSpeed step is left out: a fresh machine compiles DeepSpeed's CPU Adam op first (minutes).
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--skip", "train_step"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = result["sections"]
    assert result["smoke"] and sections["train_step"] == {"skipped": "--skip"}
    assert {"fp32", "tf32", "bf16"} <= set(sections["static"])
    assert [row["method"] for row in sections["training_free"]] == ["static", "fora", "eb_cache", "at_edm", "flexdit"]
    assert 0 < sections["bf16_distance"]["relative_l2"] < 0.1
    assert "## dydit" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow
def test_smoke_mode_runs_the_deepspeed_step(tmp_path):
    """The DeepSpeed ZeRO-2 bf16 step alone (about a minute on CPU once DeepSpeed's CPU op is built, which
    the suite's DeepSpeed tests do anyway): the section a GPU run would otherwise try for the first time."""
    others = [arg for name in ("matmul_peak", "static", "dydit", "training_free", "vae", "bf16_distance")
              for arg in ("--skip", name)]
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), *others],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["train_step"]
    assert row["micro_batch"] == 2 and row["fits"] and row["step_s"] > 0
