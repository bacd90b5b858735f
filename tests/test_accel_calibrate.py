"""EB-Cache calibration: the tolerance decides the states, the entry point writes a table the runner reads."""

from __future__ import annotations

import json

import pytest
import torch

from dydit_dist.accel import Backend, EBCacheOptions, build_runner, parse_schedule
from dydit_dist.accel.calibrate import calibrate, state_error
from dydit_dist.accel.options import TABLE_FORMAT, load_table, parse_eps_scale
from dydit_dist.accel.synthetic import randomize_zero_init
from dydit_dist.models import build_model
from jobs.calibrate import main


def setup():
    model = build_model("debug", input_size=8, num_classes=10)
    randomize_zero_init(model, torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return Backend(model.eval()), noise, {"y": torch.tensor([1, 2])}


def test_state_error_criteria():
    ref = torch.tensor([[3.0, 4.0]])
    assert state_error(torch.tensor([[4.0, 3.0]]), ref, "norm") == 0.0  # same norm, other direction
    assert state_error(torch.tensor([[4.0, 3.0]]), ref, "l2") == pytest.approx(2**0.5 / 5)
    assert state_error(torch.zeros(1, 2), torch.zeros(1, 2), "norm") == 0.0


# ddim5 visits t = 800, 600, 400, 200, 0; the tolerance at t = 0 is tolerance_at_zero = 0
@pytest.mark.parametrize("tolerance, expected", [(0.0, "00000"), (10.0, "02220")])
def test_tolerance_decides_between_full_and_cheapest_state(tolerance, expected):
    backend, noise, cond = setup()
    table = calibrate(backend, noise, cond, sampler="ddim", steps=5, tolerance=tolerance, criterion="l2")
    assert table["schedule"] == expected
    assert table["steps"][1]["errors"]["2"] > 0
    speedup = table["flops_ideal_speedup"]
    assert speedup == pytest.approx(1.0) if tolerance == 0 else speedup > 2


def test_tolerance_grows_with_t():
    backend, noise, cond = setup()
    table = calibrate(backend, noise, cond, sampler="ddim", steps=5, tolerance=0.5, tolerance_at_zero=0.1)
    assert [row["timestep"] for row in table["steps"]] == [800, 600, 400, 200, 0]
    for row in table["steps"]:
        assert row["tolerance"] == pytest.approx(0.1 + 0.4 * row["timestep"] / 999)


def test_entry_point_writes_a_table_the_runner_reads(tmp_path, capsys):
    out = tmp_path / "table.json"
    main(["--random-init", "--num-samples", "2", "--tolerance", "0.3", "--out", str(out),
          "sample.steps=5", "model.image_size=8"])
    progress = capsys.readouterr().err  # a bar over the steps: a 250-step DiT-XL/2 calibration takes a while
    assert "calibrate: 100%" in progress and "5/5" in progress, progress
    table = json.loads(out.read_text())
    assert table["format"] == TABLE_FORMAT
    assert parse_schedule(table["schedule"]) and len(table["schedule"]) == 5 == table["num_steps"]
    assert table["model"] == "debug" and table["sampler"] == "ddpm" and table["cfg_scale"] == 1.5
    assert "".join(str(row["state"]) for row in table["steps"]) == table["schedule"]  # the rows' choices
    model = build_model("debug", input_size=8, num_classes=10).eval()
    runner = build_runner("eb_cache", model, EBCacheOptions(schedule=str(out)))
    runner.begin(5)
    assert runner.schedule == table["schedule"]


def test_entry_point_refuses_random_weights_unless_asked(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "t.json"), "sample.steps=2", "model.image_size=8"]) == 2  # in the preflight
    assert "pass --random-init" in capsys.readouterr().err and not (tmp_path / "t.json").exists()
    from dydit_dist import config as config_lib
    from dydit_dist.sample.calibrate import run_calibration

    with pytest.raises(ValueError, match="random-init"):  # and in the calibration itself
        run_calibration(config_lib.load("debug", ["sample.steps=2", "model.image_size=8"]), out=str(tmp_path / "t.json"))
    bad = tmp_path / "other.json"
    bad.write_text('{"schedule": "00"}')
    with pytest.raises(ValueError, match="not an EB-Cache calibration table"):
        load_table(str(bad))


def _visited(monkeypatch, module, run) -> list[torch.Tensor]:
    """The inputs x of the full (state 0) network calls `run()` makes through `module.forward_with_cache`."""
    from dydit_dist.accel import cache as cache_module

    seen, original = [], cache_module.forward_with_cache

    def recorded(backend, x, t, c, timestep, state, cache):
        if state == 0:
            seen.append(x.clone())
        return original(backend, x, t, c, timestep, state, cache)

    monkeypatch.setattr(module, "forward_with_cache", recorded)
    run()
    monkeypatch.setattr(module, "forward_with_cache", original)
    return seen


@pytest.mark.parametrize("eps_scale", ["released", "paper"])
def test_calibration_follows_the_trajectory_the_runner_samples(monkeypatch, eps_scale):
    """The runner corrects the predicted noise for exposure bias (`eps_scale`); the calibration steps with
    the same correction, so the states it visits are those the runner visits with its table."""
    from dydit_dist.accel import cache as cache_module
    from dydit_dist.accel import calibrate as calibrate_module
    from dydit_dist.diffusion import sample

    backend, noise, cond = setup()
    tables = []
    calibrated = _visited(monkeypatch, calibrate_module, lambda: tables.append(
        calibrate(backend, noise, cond, sampler="ddim", steps=5, tolerance=0.0, eps_scale=eps_scale)))
    assert tables[0]["schedule"] == "00000" and tables[0]["eps_scale"] == eps_scale
    assert tables[0]["eps_scale_factors"] == [list(k) for k in parse_eps_scale(eps_scale)]
    runner = build_runner("eb_cache", backend.model, EBCacheOptions(schedule="00000", eps_scale=eps_scale))
    runner.begin(5)
    sampled = _visited(monkeypatch, cache_module, lambda: sample(
        runner, noise.shape, "ddim", 5, None, noise=noise, model_kwargs=cond, step_callback=runner.step_callback))
    assert len(sampled) == len(calibrated) == 5
    for step, (a, b) in enumerate(zip(calibrated, sampled, strict=True)):
        torch.testing.assert_close(a, b, msg=f"step {step}")
    uncorrected = _visited(monkeypatch, calibrate_module, lambda: calibrate(
        backend, noise, cond, sampler="ddim", steps=5, tolerance=0.0, eps_scale="none"))
    assert not torch.allclose(uncorrected[-1], sampled[-1])  # the correction does change the trajectory


def test_a_pixart_table_is_calibrated_on_the_runs_prompts(tmp_path, tiny_t5, monkeypatch):
    """PixArt's sampled trajectories follow its captions: the calibration samples the run's first prompts
    through its T5 encoder, as the sample job does (null captions were unconditional trajectories), and the
    table says what it was calibrated on."""
    from dydit_dist import config as config_lib
    from dydit_dist.sample import calibrate as calibrate_job
    from dydit_dist.sample.generate import conditioner

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle on the background\n")
    overrides = ["model.name=PixArt-debug", "model.caption_channels=32", "model.model_max_length=8",
                 "model.image_size=8", "data.vae=none", f"data.text_encoder={tiny_t5}", "sample.steps=3",
                 "sample.sampler=ddim", "sample.cfg_scale=4.5", f"storage.root={tmp_path}"]
    seen = {}
    real = calibrate_job.calibrate
    monkeypatch.setattr(calibrate_job, "calibrate", lambda backend, x, kwargs, **kw: (
        seen.update(x=x, kwargs=kwargs), real(backend, x, kwargs, **kw))[1])
    cfg = config_lib.load("debug", [*overrides, f"sample.prompts={prompts}"])
    table, _ = calibrate_job.run_calibration(cfg, num_samples=3, allow_random=True, out=str(tmp_path / "t.json"),
                                             device="cpu")
    assert table["conditioning"] == f"prompts 0..2 of {prompts}"
    model = calibrate_job.calibration_network(cfg, True, 0)
    expected = conditioner(cfg, model, torch.device("cpu")).model_kwargs([0, 1, 0], "cpu")
    assert seen["kwargs"]["y"].shape[0] == 6  # guided: conditional rows, then the null caption's
    torch.testing.assert_close(seen["kwargs"]["y"][:3], expected["y"])
    assert torch.equal(seen["kwargs"]["mask"][:3], expected["mask"])
    with pytest.raises(ValueError, match="sample.prompts: a text-to-image model .* needs a prompts file"):
        calibrate_job.run_calibration(config_lib.load("debug", overrides), num_samples=2, allow_random=True,
                                      out=str(tmp_path / "n.json"), device="cpu")  # as the sample job refuses it


def test_the_calibration_runs_the_network_as_the_sample_job_does(tmp_path, monkeypatch):
    """Its precision (bf16 autocast by default) and device: it always ran an fp32 CPU trajectory, which is not
    the one a bf16 GPU run samples. The table records both."""
    from dydit_dist import config as config_lib
    from dydit_dist.sample import calibrate as calibrate_job

    seen = {}
    real = calibrate_job.calibrate
    monkeypatch.setattr(calibrate_job, "calibrate", lambda backend, x, kwargs, **kw: (
        seen.update(autocast=torch.is_autocast_enabled("cpu"), dtype=torch.get_autocast_dtype("cpu")),
        real(backend, x, kwargs, **kw))[1])
    cfg = config_lib.load("debug", ["sample.steps=2", "model.image_size=8", "sample.precision=bf16"])
    table, _ = calibrate_job.run_calibration(cfg, num_samples=2, allow_random=True, out=str(tmp_path / "t.json"),
                                             device="cpu")
    assert seen == {"autocast": True, "dtype": torch.bfloat16}
    assert table["precision"] == "bf16" and table["device"] == "cpu"
    assert table["conditioning"] == "classes of samples 0..1 (sample.labels=random)"
