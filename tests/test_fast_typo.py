"""A config typo is reported before the heavy imports: the config and the job's argument parsing import
neither torch nor ray, and every job with an unknown key exits 2 without importing them."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HEAVY = ("torch", "ray", "deepspeed", "diffusers")


def test_config_imports_no_heavy_package():
    script = ("import sys, dydit_dist.cli, dydit_dist.config\n"
              "from dydit_dist.accel import METHODS, ATEDMOptions\n"
              "from dydit_dist.dynamic import DyDiTOptions, FlexOptions\n"
              "from dydit_dist.models.registry import arch\n"
              f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout


def test_lazy_packages_keep_their_public_names():
    import dydit_dist.accel as accel
    import dydit_dist.dynamic as dynamic
    import dydit_dist.models as models

    for package in (accel, dynamic, models):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
        assert set(package.__all__) <= set(dir(package))
    from dydit_dist.accel import build_runner  # noqa: F401  (the `from package import name` form)


@pytest.mark.parametrize("job", ["prepare", "finetune", "sample", "evaluate", "calibrate", "reproduce", "reference"])
def test_typo_exits_2_without_importing_torch(job):
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", f"jobs.{job}", "--config", "debug", "train.lrr=1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert [line for line in lines if not line.startswith("import time:")] == [
        line for line in lines if line.startswith(f"{job}: unknown config key 'train.lrr'")]
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    assert not imported & set(HEAVY), imported & set(HEAVY)
    print(f"{job}: config typo reported in {elapsed:.1f} s")
