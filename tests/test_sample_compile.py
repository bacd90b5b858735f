"""sample.compile: the torch.compile'd static path and DyDiT fast path give the eager samples."""

from __future__ import annotations

import pytest
import torch
from sampling_util import random_checkpoint, tiny_config
from torch._dynamo.utils import counters

from dydit_dist.sample.generate import ShardGenerator


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {"static": random_checkpoint(str(root / "static.safetensors")),
            "dydit": random_checkpoint(str(root / "dydit.safetensors"), "model.method=dydit")}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["static", "dydit"])
def test_compiled_sampling_matches_eager(tmp_path, checkpoints, method):
    torch.set_num_threads(1)
    common = [f"model.method={method}", f"sample.method={method}", f"model.checkpoint={checkpoints[method]}",
              "sample.steps=3"]
    eager = ShardGenerator(tiny_config(str(tmp_path), *common)).latents([0, 1, 2, 3])
    # Nothing compiled before: the graphs counted below are the compiled run's, so an eager run passed off
    # as compiled (a no-op compile) fails here instead of comparing eager with eager.
    torch._dynamo.reset()
    counters.clear()
    compiled = ShardGenerator(tiny_config(str(tmp_path), *common, "sample.compile=true"))
    torch.testing.assert_close(compiled.latents([0, 1, 2, 3]), eager, rtol=1e-4, atol=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    print(f"{method}: {graphs} graphs compiled")
    assert graphs > 0, f"{method}: sample.compile=true ran without compiling a graph"
    torch.testing.assert_close(compiled.latents([2]), eager[2:3], rtol=1e-4, atol=1e-4)  # another batch size


def test_compile_refuses_a_method_without_a_compiled_path(tmp_path):
    cfg = tiny_config(str(tmp_path), "sample.method=fora", "sample.compile=true")
    with pytest.raises(ValueError, match="no compiled path"):
        ShardGenerator(cfg)
