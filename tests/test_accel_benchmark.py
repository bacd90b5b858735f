"""The training-free benchmark's lockstep sampler is exactly `diffusion.sample`, for every runner."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from dydit_dist.accel import FORAOptions, build_runner
from dydit_dist.accel.synthetic import randomize_zero_init
from dydit_dist.diffusion import sample
from dydit_dist.models import build_model

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
_spec = importlib.util.spec_from_file_location("training_free", BENCHMARKS / "training_free.py")
training_free = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(training_free)


def test_lockstep_sampling_equals_sample():
    model = build_model("debug", input_size=8, num_classes=10)
    randomize_zero_init(model, torch.Generator().manual_seed(0))
    model.eval()
    runners = {"static": build_runner("static", model), "fora": build_runner("fora", model, FORAOptions(2))}
    noise, cond = torch.randn(2, 4, 8, 8), {"y": torch.tensor([1, 2])}
    state = training_free.lockstep_ddpm(dict(runners), runners, noise, cond, 4, 7, "cpu", 4)
    for name, runner in runners.items():
        runner.begin(4)
        expected = sample(runner, noise.shape, "ddpm", 4, torch.Generator().manual_seed(7), noise=noise,
                          model_kwargs=cond, step_callback=runner.step_callback)
        assert torch.equal(state[name]["x"], expected)
        assert state[name]["time"] > 0 and len(state[name]["eps_norm"]) == 4
