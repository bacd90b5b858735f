"""Noise schedule and IDDPM respacing, against the reference numbers and diffusers."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from dydit_dist.diffusion import GaussianDiffusion, create_diffusion, linear_betas, respace, space_timesteps


def test_linear_betas_are_iddpm_linear():
    betas = linear_betas(1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    # IDDPM scales the endpoints by 1000 / T for other lengths.
    assert linear_betas(500)[[0, -1]] == pytest.approx([2e-4, 0.04])


def test_space_timesteps_250_matches_reference_readme():
    steps = sorted(space_timesteps(1000, "250"))
    assert len(steps) == 250
    assert steps == [round(i * 999 / 249) for i in range(250)]
    assert steps[:3] == [0, 4, 8] and steps[-3:] == [991, 995, 999]
    assert {241, 245} <= set(steps)


def test_space_timesteps_ddim50_is_stride_20():
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))


def test_space_timesteps_sections():
    # IDDPM's docstring example: 300 steps cut into 3 sections of 100 keeping 10, 15 and 20.
    steps = sorted(space_timesteps(300, [10, 15, 20]))
    assert len(steps) == 45
    assert steps[:10] == [round(i * 99 / 9) for i in range(10)]
    # IDDPM accumulates the float stride: at i = 7, 7 * 99 / 14 = 49.5 exactly, but the running sum is
    # 49.4999.., so IDDPM keeps 149 where round(i * stride) would give 150.
    cur, expected = 0.0, []
    for _ in range(15):
        expected.append(100 + round(cur))
        cur += 99 / 14
    assert steps[10:25] == expected and 149 in steps and 150 not in steps
    assert steps[-1] == 299
    assert space_timesteps(300, "10,15,20") == set(steps)


@pytest.mark.parametrize("bad, message", [
    ("ddim999", "cannot create exactly 999 steps with an integer stride over 1000"),
    ("1001", "cannot divide a section of 1000 steps into 1001"),
    ("abc", r"bad respacing 'abc'; expected 'N', 'a,b,\.\.' or 'ddimN'"),
    ("ddimx", r"bad respacing 'ddimx'; expected 'ddimN'$"),
    ("0", "cannot divide a section of 1000 steps into 0"),
])
def test_space_timesteps_rejects_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        space_timesteps(1000, bad)


def test_respaced_process_keeps_marginals():
    base = create_diffusion()
    spaced = create_diffusion("250")
    kept = np.array(sorted(space_timesteps(1000, "250")))
    assert spaced.num_timesteps == 250
    np.testing.assert_array_equal(spaced.timestep_map, kept)
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    np.testing.assert_allclose(
        spaced.betas[1:], 1 - base.alphas_cumprod[kept[1:]] / base.alphas_cumprod[kept[:-1]]
    )

    x0 = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    noise = torch.randn_like(x0)
    idx = torch.tensor([10, 200])
    torch.testing.assert_close(
        spaced.q_sample(x0, idx, noise), base.q_sample(x0, spaced.original_timesteps(idx), noise)
    )


def test_respace_of_respaced_composes_timestep_maps():
    spaced = respace(create_diffusion("250"), [0, 1, 249])
    np.testing.assert_array_equal(spaced.timestep_map, [0, 4, 999])


def test_schedule_matches_diffusers_ddpm_scheduler():
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02
    )
    diffusion = create_diffusion()
    np.testing.assert_allclose(scheduler.betas.numpy(), diffusion.betas, atol=1e-6, rtol=0)
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), diffusion.alphas_cumprod, atol=1e-6, rtol=0)


def test_posterior_tables_against_formulas():
    d = create_diffusion()
    ac, ac_prev = d.alphas_cumprod, np.append(1.0, d.alphas_cumprod[:-1])
    pv = d.betas * (1 - ac_prev) / (1 - ac)
    assert pv[0] == 0
    np.testing.assert_allclose(np.exp(d.posterior_log_variance_clipped[1:]), pv[1:])
    assert np.exp(d.posterior_log_variance_clipped[0]) == pytest.approx(pv[1])


def test_create_diffusion_is_cached_and_read_only():
    assert create_diffusion("250") is create_diffusion("250")
    assert create_diffusion([10, 10]) is create_diffusion((10, 10))
    with pytest.raises(ValueError):
        create_diffusion("250").betas[0] = 0.5


def test_gaussian_diffusion_validates_betas():
    with pytest.raises(ValueError, match=r"betas must be a 1-D array with values in \(0, 1\]"):
        GaussianDiffusion(np.array([0.1, 0.0]))
    with pytest.raises(ValueError, match="timestep_map has 1 entries for 2 betas"):
        GaussianDiffusion(np.array([0.1, 0.2]), timestep_map=[0])
