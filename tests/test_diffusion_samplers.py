"""DDPM / DDIM / both DPM-Solver++ against independent computations, diffusers, PixArt-alpha's official
DPM-Solver (recorded outputs), and the randomness contract."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dydit_dist.diffusion import (
    ContinuousVPSchedule,
    cfg_class_batch,
    cfg_model_fn,
    create_diffusion,
    ddpm_step,
    dpm_solver_sample,
    randn_per_sample,
    sample,
    space_timesteps,
)

SHAPE = (2, 4, 3, 3)
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))


def _toy_model(x, t, y=None):
    """A per-row model: eps depends on x, t and (optionally) the label; variance values in (-1, 1)."""
    scale = (t.double() / 1000).reshape(-1, 1, 1, 1).to(x.dtype)
    eps = 0.5 * torch.tanh(x) + 0.1 * scale
    if y is not None:
        eps = eps + 0.05 * y.reshape(-1, 1, 1, 1).to(x.dtype)
    return torch.cat([eps, torch.tanh(x - scale)], dim=1)


def _gaussian_data_model(mu, s):
    """The exact E[eps | x_t] when x_0 ~ N(mu, s^2) elementwise; s = 0 is a single data point."""

    def model(x, t):
        abar = torch.as_tensor(ABAR[t.numpy()], dtype=x.dtype).reshape(-1, 1, 1, 1)
        return torch.sqrt(1 - abar) * (x - torch.sqrt(abar) * mu) / (abar * s**2 + 1 - abar)

    return model


@pytest.mark.parametrize("index", [100, 1])
def test_ddpm_step_matches_independent_numpy(index):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    out = torch.cat(
        [
            torch.randn(SHAPE, generator=g, dtype=torch.float64),
            torch.rand(SHAPE, generator=g, dtype=torch.float64) * 2 - 1,
        ],
        dim=1,
    )
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    t = torch.full((SHAPE[0],), index)
    got = ddpm_step(create_diffusion("250"), out, x, t, noise).numpy()

    t_now, t_prev = round(index * 999 / 249), round((index - 1) * 999 / 249)
    abar, abar_prev = ABAR[t_now], ABAR[t_prev]
    beta = 1 - abar / abar_prev  # the respaced step's beta
    post_var = beta * (1 - abar_prev) / (1 - abar)
    eps, v = out[:, :4].numpy(), out[:, 4:].numpy()
    x_np = x.numpy()
    x0 = (x_np - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
    mean = (np.sqrt(abar_prev) * beta * x0 + np.sqrt(1 - beta) * (1 - abar_prev) * x_np) / (1 - abar)
    log_var = (v + 1) / 2 * np.log(beta) + (1 - v) / 2 * np.log(post_var)
    np.testing.assert_allclose(got, mean + np.exp(0.5 * log_var) * noise.numpy(), rtol=1e-9, atol=1e-12)


def test_ddpm_steps_match_diffusers_learned_range_with_iddpm_timesteps():
    """diffusers' DDPMScheduler given IDDPM's 250 timesteps reproduces the respaced learned-range step.

    (diffusers cannot build the respacing itself and clips the t = 0 log-variance differently, which
    is unused since the last step adds no noise; the final step is compared without noise.)
    """
    diffusion = create_diffusion("250")
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range", clip_sample=False
    )
    scheduler.set_timesteps(timesteps=sorted(space_timesteps(1000, "250"), reverse=True))
    g = torch.Generator().manual_seed(1)
    for index in (249, 120, 1, 0):
        x = torch.randn(SHAPE, generator=g)
        out = _toy_model(x, torch.full((2,), int(diffusion.timestep_map[index])))
        t_orig = int(diffusion.timestep_map[index])
        expected = scheduler.step(out, t_orig, x, generator=torch.Generator().manual_seed(index)).prev_sample
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(index)) if index > 0 else None
        got = ddpm_step(diffusion, out, x, torch.full((2,), index), noise)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_ddim_matches_diffusers_ddim_scheduler():
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(980, -1, -20))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    x = z.clone()
    for t in scheduler.timesteps:
        eps = _toy_model(x, t.expand(2))[:, :4]
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    seen = []
    got = sample(_toy_model, SHAPE, "ddim", 50, noise=z, step_callback=lambda i, t: seen.append(t))
    assert seen == list(range(980, -1, -20))
    torch.testing.assert_close(got, x, atol=1e-4, rtol=1e-4)


def test_dpm_solver_recovers_a_data_point():
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    calls = []
    model = _gaussian_data_model(x0, 0.0)

    def recording_model(x, t):
        assert t.dtype == torch.long and t.shape == (2,)
        return torch.cat([model(x, t), torch.zeros_like(x)], dim=1)  # variance channels are dropped

    got = sample(
        recording_model,
        SHAPE,
        "dpm-solver++",
        20,
        generator=torch.Generator().manual_seed(4),
        step_callback=lambda i, t: calls.append((i, t)),
    )
    assert [i for i, _ in calls] == list(range(20))
    assert [t for _, t in calls] == np.linspace(0, 999, 21).round()[::-1][:-1].astype(int).tolist()
    torch.testing.assert_close(got, x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler, steps, tol", [("dpm-solver++", 50, 5e-3), ("ddim", 1000, 1e-2)])
def test_deterministic_samplers_follow_the_gaussian_probability_flow(sampler, steps, tol):
    # For x_0 ~ N(mu, s^2) the probability-flow ODE maps the noise z to mu + s z. (With 20 steps
    # DPM-Solver++ ends with one first-order jump from sigma 0.18 to 0, which returns the posterior
    # mean and shrinks towards mu by ~0.06 here: a property of the solver, not of this wrapper.)
    mu, s = 0.3, 0.5
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = sample(_gaussian_data_model(mu, s), SHAPE, sampler, steps, noise=z)
    torch.testing.assert_close(got, mu + s * z, atol=tol, rtol=0)


def test_ddpm_sample_visits_the_respaced_original_timesteps():
    seen = []
    sample(
        _toy_model,
        SHAPE,
        "ddpm",
        250,
        generator=torch.Generator().manual_seed(0),
        step_callback=lambda i, t: seen.append(t),
    )
    assert seen == sorted(space_timesteps(1000, "250"), reverse=True)


def test_per_sample_generators_make_rows_independent_of_companions():
    seeds = [11, 12, 13]
    batch = sample(
        _toy_model, (3, 4, 3, 3), "ddpm", 10, generator=[torch.Generator().manual_seed(s) for s in seeds]
    )
    alone = sample(_toy_model, (1, 4, 3, 3), "ddpm", 10, generator=[torch.Generator().manual_seed(12)])
    torch.testing.assert_close(batch[1:2], alone, atol=1e-6, rtol=0)
    assert not torch.allclose(batch[0], batch[1])


def test_per_sample_generators_with_guidance():
    def run(seeds, labels):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        z = randn_per_sample((len(seeds), 4, 3, 3), gens)
        x2, y2 = cfg_class_batch(z, torch.tensor(labels), num_classes=10)
        out = sample(
            cfg_model_fn(_toy_model, 1.5),
            x2.shape,
            "ddpm",
            10,
            noise=x2,
            generator=gens + gens,
            model_kwargs={"y": y2},
        )
        return out[: len(seeds)]

    torch.testing.assert_close(run([1, 2, 3], [4, 5, 6])[2:], run([3], [6]), atol=1e-6, rtol=0)


def test_single_generator_is_reproducible():
    a = sample(_toy_model, SHAPE, "ddpm", 5, generator=torch.Generator().manual_seed(7))
    b = sample(_toy_model, SHAPE, "ddpm", 5, generator=torch.Generator().manual_seed(7))
    c = sample(_toy_model, SHAPE, "ddpm", 5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="valid samplers: ddpm, ddim, dpm-solver, dpm-solver\\+\\+"):
        sample(_toy_model, SHAPE, "euler")
    with pytest.raises(ValueError, match="generators"):
        sample(_toy_model, SHAPE, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="noise has shape"):
        sample(_toy_model, SHAPE, noise=torch.zeros(1, 4, 3, 3))
    with pytest.raises(ValueError, match="channels"):
        sample(lambda x, t: x[:, :3], SHAPE, "ddim", 2)
    with pytest.raises(ValueError, match=r"dpm-solver\+\+ needs an integer number of steps >= 1, got 'ddim"):
        sample(_toy_model, SHAPE, "dpm-solver++", "ddim20")
    with pytest.raises(ValueError, match=r"dpm-solver needs an integer number of steps >= 1, got 0"):
        sample(_toy_model, SHAPE, "dpm-solver", 0)


# --- "dpm-solver": the authors' continuous-time DPM-Solver++(2M), as PixArt-alpha samples ---------------

KNOTS = np.arange(1, 1001) / 1000  # discrete step n is continuous time (n + 1) / 1000


def _abar_at(t):
    """alphas_cumprod at continuous times t: log alpha linear in t between the discrete steps."""
    return np.exp(np.interp(t, KNOTS, np.log(ABAR)))


def _continuous_gaussian_model(mu, s):
    """The exact E[eps | x_t] for x_0 ~ N(mu, s^2) at the (fractional) model timestep 1000 t - 1."""

    def model(x, t):
        abar = torch.as_tensor(_abar_at(t.numpy() / 1000 + 1 / 1000), dtype=x.dtype).reshape(-1, 1, 1, 1)
        return torch.sqrt(1 - abar) * (x - torch.sqrt(abar) * mu) / (abar * s**2 + 1 - abar)

    return model


def test_dpm_solver_calls_the_model_at_the_official_continuous_times():
    # "time_uniform": t_i = 1 - i (1 - 1/N) / S, i = 0..S; the network sees (t_i - 1/N) * 1000 for the
    # S calls i < S (999, 949.05, .., 49.95); the solver ends at t_S = 1/N without a call.
    seen, calls = [], []

    def recording_model(x, t):
        assert t.dtype == x.dtype and t.shape == (SHAPE[0],)
        seen.append(float(t[0]))
        return _toy_model(x, t)

    sample(recording_model, SHAPE, "dpm-solver", 20, noise=torch.zeros(SHAPE, dtype=torch.float64),
           step_callback=lambda i, t: calls.append((i, t)))
    expected = [(1 - i * (1 - 1 / 1000) / 20 - 1 / 1000) * 1000 for i in range(20)]
    np.testing.assert_allclose(seen, expected, rtol=0, atol=1e-9)
    assert seen[:3] == pytest.approx([999.0, 949.05, 899.1]) and seen[-1] == pytest.approx(49.95)
    assert [i for i, _ in calls] == list(range(20))  # the callback sees the timestep the network sees
    np.testing.assert_allclose([t for _, t in calls], expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("steps", [1, 7, 20])
def test_dpm_solver_first_order_is_ddim_on_the_continuous_times(steps):
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = torch.tensor([0.8, -0.6], dtype=torch.float64)

    def eps_at(x, timestep):
        return _golden_net(x, torch.full((SHAPE[0],), timestep, dtype=torch.float64), y)[:, :4]

    got = dpm_solver_sample(lambda i, x, timestep: eps_at(x, timestep), z, steps,
                            ContinuousVPSchedule(np.linspace(1e-4, 0.02, 1000)), order=1)

    x = z.numpy()
    times = [1 - i * (1 - 1 / 1000) / steps for i in range(steps + 1)]
    for s, t in zip(times[:-1], times[1:], strict=True):
        abar_s, abar_t = _abar_at(s), _abar_at(t)
        eps = eps_at(torch.from_numpy(x), (s - 1 / 1000) * 1000).numpy()
        x0 = (x - np.sqrt(1 - abar_s) * eps) / np.sqrt(abar_s)
        x = np.sqrt(abar_t) * x0 + np.sqrt(1 - abar_t) * eps  # DDIM, eta = 0
    np.testing.assert_allclose(got.numpy(), x, rtol=0, atol=1e-12)


# Outputs of PixArt-alpha's official DPM-Solver, PixArt-alpha/PixArt-alpha @
# cac2fd3b4544cf7620d8fbbf8b19d97ffcb85892, diffusion/model/dpm_solver.py, run once in float64 as
# scripts/inference.py and diffusion/dpm_solver.py (DPMS) call it: NoiseScheduleVP("discrete", betas=IDDPM
# linear betas over 1000 steps, dtype=torch.float64) under torch.set_default_dtype(torch.float64) (the
# official times follow the default dtype), model_wrapper(net, ns, model_type="noise",
# guidance_type="classifier-free", condition=COND, unconditional_condition=zeros(2), guidance_scale=cfg),
# DPM_Solver(..., algorithm_type="dpmsolver++").sample(Z, steps, order=2, skip_type="time_uniform",
# method="multistep"), with net = _golden_net's eps and Z, COND as below; the flattened output was printed
# with repr(float).
GOLDEN_SHAPE = (2, 2, 2, 2)
GOLDEN_COND = torch.tensor([0.8, -0.6], dtype=torch.float64)
GOLDEN = {
    (20, 4.5): [
        1.9586025043348403, 2.4726157508961992, 1.3358066062775151, 1.1454218682541037,
        2.3156087007409094, 2.193409186765163, 1.0591540312349252, 1.4660182838792197,
        -0.5489032541017609, -1.213709091874782, -2.1043641864349074, -1.1828475589322183,
        -0.5578482643106111, -1.5955554310190867, -1.9804796749589788, -0.8317255846656348,
    ],
    (6, 1.0): [  # fewer than 10 steps: the last update is first order again
        0.503852517043573, 0.7685431664517469, 0.17218557651905572, 0.0726742620208595,
        0.6885028319943345, 0.6258986264043539, 0.0277626821476801, 0.2409159001764368,
        0.10902784943733143, -0.24462831534605112, -0.7104675654416329, -0.22788453858391539,
        0.10433773928003592, -0.4492317397905682, -0.6473900619932617, -0.03970996531164068,
    ],
}


def _golden_net(x, t, y):
    """Near-exact eps of N(0.5 y, 0.5^2) data under the continuous linear VP schedule, plus a small
    nonlinear term; then variance channels (constant, to be dropped) as PixArt's network has them."""
    tau = (t / 1000).reshape(-1, 1, 1, 1)
    abar = torch.exp(-(0.1 * tau + 9.95 * tau**2))
    mean = 0.5 * y.reshape(-1, 1, 1, 1)
    eps = torch.sqrt(1 - abar) * (x - torch.sqrt(abar) * mean) / (0.25 * abar + 1 - abar) + 0.05 * torch.tanh(x)
    return torch.cat([eps, torch.full_like(x, 7.0)], dim=1)


@pytest.mark.parametrize("steps, cfg_scale", sorted(GOLDEN))
def test_dpm_solver_matches_pixart_official_outputs(steps, cfg_scale):
    z = 1.5 * torch.sin(torch.arange(16, dtype=torch.float64) * 1.7 + 0.3).reshape(GOLDEN_SHAPE)
    if cfg_scale == 1.0:
        got = sample(_golden_net, z.shape, "dpm-solver", steps, noise=z, model_kwargs={"y": GOLDEN_COND})
    else:  # PixArt guides every eps channel: guidance_channels=None
        x2 = torch.cat([z, z])
        y2 = torch.cat([GOLDEN_COND, torch.zeros(2, dtype=torch.float64)])
        guided = cfg_model_fn(_golden_net, cfg_scale, guidance_channels=None)
        got = sample(guided, x2.shape, "dpm-solver", steps, noise=x2, model_kwargs={"y": y2})[:2]
    np.testing.assert_allclose(got.reshape(-1).numpy(), GOLDEN[steps, cfg_scale], rtol=0, atol=1e-10)


def test_dpm_solver_converges_to_the_gaussian_probability_flow_at_t0():
    # x_0 ~ N(mu, s^2): the probability-flow ODE carries z at t = 1 to
    # alpha_0 mu + sqrt(alpha_0^2 s^2 + sigma_0^2) (z - alpha_T mu) / sqrt(alpha_T^2 s^2 + sigma_T^2)
    # at the solver's end time t_0 = 1/1000 (sigma_0 ~ 0.01, not 0: ending at sigma 0 is 1.3e-3 away).
    mu, s = 0.3, 0.5
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    abar_T, abar_0 = _abar_at(1.0), _abar_at(1 / 1000)
    exact = np.sqrt(abar_0) * mu + np.sqrt(abar_0 * s**2 + 1 - abar_0) * (z - np.sqrt(abar_T) * mu) / np.sqrt(
        abar_T * s**2 + 1 - abar_T
    )
    errors = [
        (sample(_continuous_gaussian_model(mu, s), SHAPE, "dpm-solver", n, noise=z) - exact).abs().max().item()
        for n in (80, 160, 320, 1000)
    ]
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5  # second order
    assert errors[3] < 3e-4


def test_dpm_solver_rows_do_not_depend_on_their_batch():
    z = torch.randn((3, 4, 3, 3), generator=torch.Generator().manual_seed(9))
    labels = torch.tensor([1, 2, 3])
    x2, y2 = cfg_class_batch(z, labels, num_classes=10)
    batch = sample(cfg_model_fn(_toy_model, 4.5, None), x2.shape, "dpm-solver", 8, noise=x2, model_kwargs={"y": y2})
    x1, y1 = cfg_class_batch(z[1:2], labels[1:2], num_classes=10)
    alone = sample(cfg_model_fn(_toy_model, 4.5, None), x1.shape, "dpm-solver", 8, noise=x1, model_kwargs={"y": y1})
    torch.testing.assert_close(batch[1:2], alone[:1], atol=1e-6, rtol=0)
    assert torch.equal(batch[:3], batch[3:])  # both halves carry the guided trajectory
