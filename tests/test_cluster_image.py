"""The container image (cluster/image/): its lock is in step with pyproject.toml, its Dockerfile with both.

No Docker here: these are static checks of what the build would use.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "cluster" / "image"


def _lock_module():
    spec = importlib.util.spec_from_file_location("cluster_image_lock", IMAGE / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock = _lock_module()


def _project() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", (IMAGE / "Dockerfile").read_text(), re.M))


def test_lock_is_in_step_with_pyproject():
    proc = subprocess.run([sys.executable, str(IMAGE / "lock.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_lock_check_names_what_is_out_of_step():
    deps = lock.project_dependencies()
    text = (IMAGE / "requirements.lock").read_text()
    assert lock.check(deps, text) == []
    # A changed pin in pyproject.toml: the recorded hash is stale and the pinned version no longer fits.
    changed = [d.replace("torch==2.14.1", "torch==2.15.0") for d in deps]
    problems = lock.check(changed, text)
    assert any("changed since the lock was written" in p for p in problems)
    assert any("torch==2.15.0: the lock pins torch==2.14.1" in p for p in problems)
    # A dependency missing from the lock, and a malformed line.
    problems = lock.check(deps + ["not-a-dependency>=1"], text.replace("numpy==", "numpy>="))
    assert any("not-a-dependency>=1: not-a-dependency is not in the lock" in p for p in problems)
    assert any("is not `name==version`" in p for p in problems)


def test_lock_pins_every_dependency_exactly():
    _, pins, problems = lock.parse_lock((IMAGE / "requirements.lock").read_text())
    assert problems == []
    for name in ("ray", "torch", "deepspeed", "omegaconf", "s3fs", "torch-fidelity"):
        assert name in pins
    assert "dydit-dist" not in pins  # the image installs the package itself from the source, --no-deps


def test_dockerfile_base_image_matches_pyproject():
    args = _dockerfile_args()
    ray_pin = next(
        d.split("==")[1] for d in _project()["dependencies"] if d.startswith("ray[") or d.startswith("ray==")
    )
    assert args["RAY_VERSION"] == ray_pin
    text = (IMAGE / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms == ["rayproject/ray:${RAY_VERSION}-py311-${CUDA_TAG}"]
    assert re.fullmatch(r"cu\d+", args["CUDA_TAG"])
    assert _project()["requires-python"].startswith(">=3.11,<3.12")  # py311 in the tag


# The oldest NVIDIA driver branch each CUDA of the base image runs on (CUDA's release notes, Linux).
MIN_DRIVER = {"cu124": 550, "cu126": 560, "cu128": 570, "cu129": 575, "cu130": 580}


def test_the_gpu_driver_the_image_needs_is_named():
    """A GPU node whose driver is older than the image's CUDA fails at the first CUDA call: the Dockerfile and
    the README's KubeRay section name the driver branch that the base image's CUDA needs."""
    cuda = _dockerfile_args()["CUDA_TAG"]
    assert cuda in MIN_DRIVER, f"{cuda}: add its minimum driver branch to MIN_DRIVER"
    branch = f"R{MIN_DRIVER[cuda]}"
    assert branch in (IMAGE / "Dockerfile").read_text()
    readme = (REPO / "README.md").read_text()
    kuberay = readme[readme.index("\n## KubeRay\n") :]
    assert branch in kuberay[: kuberay.index("\n## ", 1)]


def test_dockerfile_installs_the_lock_then_the_package_without_dependencies():
    runs = re.findall(r"^RUN (.+?)(?<!\\)$", (IMAGE / "Dockerfile").read_text(), re.M | re.S)
    joined = [" ".join(r.split()) for r in runs]
    lock_at = next(i for i, r in enumerate(joined) if "pip install -r cluster/image/requirements.lock" in r)
    package_at = next(i for i, r in enumerate(joined) if "pip install --no-deps ." in r)
    assert lock_at < package_at
    assert "ray.__version__ == '${RAY_VERSION}'" in joined[package_at]


def test_dockerfile_copies_only_what_the_image_needs():
    copies = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", (IMAGE / "Dockerfile").read_text(), re.M)
    sources = {s for line in copies for s in line.split()}
    assert sources == {"cluster/image/requirements.lock", "pyproject.toml", "README.md", "dydit_dist", "jobs"}
    for source in sources:
        assert (REPO / source).exists(), source
