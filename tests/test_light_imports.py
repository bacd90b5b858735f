"""The library core imports on a bare GPU box: models, diffusion, dynamic, accel, flops and the
training step without ray, s3fs, webdataset or deepspeed (benchmarks/gpu_check.py relies on it)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("ray", "s3fs", "webdataset", "deepspeed")
CORE = ("dydit_dist.models", "dydit_dist.diffusion", "dydit_dist.dynamic", "dydit_dist.accel", "dydit_dist.flops",
        "dydit_dist.train.step")


def test_core_imports_without_cluster_packages():
    script = textwrap.dedent(f"""
        import importlib, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError(f"blocked: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        for module in {CORE!r}:
            package = importlib.import_module(module)
            for name in getattr(package, "__all__", ()):  # lazy packages load their submodules here
                getattr(package, name)
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({BLOCKED!r}))
        assert not loaded, loaded
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
