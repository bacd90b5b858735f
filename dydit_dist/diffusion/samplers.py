"""Samplers: IDDPM ancestral DDPM, DDIM and two DPM-Solver++(2M), behind one ``sample`` entry point.

``dpm-solver`` is the DPM-Solver authors' continuous-time solver as PixArt-alpha's own sampling runs it
(``dpm_solver.py``); ``dpm-solver++`` is diffusers' DPMSolverMultistepScheduler's stepping (integer
timesteps, a last step to sigma 0). The two differ per sample. Either is guided as the caller conditions it:
PixArt's unconditional rows are the learned null caption with the prompt's mask (the official code's), not
the T5 features of an empty prompt that diffusers' PixArtAlphaPipeline uses.

Randomness contract (what makes a 50k-sample job reproducible from sample indices alone): ``generator``
may be a ``CounterNoise`` (``noise.py``: row b's noise of draw i is a function of (row b's key, i),
computed on the sampling device; draw 0 is the initial noise, draw i + 1 step i's), one
``torch.Generator``, or a list of B of them. With a list, row b's initial noise and all of its
per-step noise come from ``generator[b]`` only, in a fixed order, so a row never depends on its batch
companions. Generators may live on the CPU while sampling on a GPU (noise is drawn on the
generator's device, then moved).

Precision: the state x, the noise and the scheduler arithmetic are float32 whatever autocast the
caller runs the model under; model outputs are cast to x's dtype before a step.

Models are called as ``model_fn(x, t, **model_kwargs)`` with ``t`` a (B,) LongTensor of ORIGINAL
timesteps (0..999), except under ``dpm-solver``, whose continuous times reach the model as fractional
timesteps (a (B,) tensor of x's dtype: 999, 949.05, ..). ``step_callback(i, t)`` (step index 0..S-1,
the original timestep the model is called at: an int, a float under ``dpm-solver``, as DyDiT's width
plan must see it) runs before each model call, for methods that keep per-step state such as feature caches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .dpm_solver import ContinuousVPSchedule, dpm_solver_sample
from .losses import p_mean_variance
from .noise import CounterNoise
from .schedule import GaussianDiffusion, create_diffusion, linear_betas

__all__ = ["SAMPLERS", "ddim_step", "ddpm_step", "dpm_solver_scheduler", "draw_noise", "randn_per_sample", "sample"]

SAMPLERS = ("ddpm", "ddim", "dpm-solver", "dpm-solver++")

Generators = CounterNoise | torch.Generator | Sequence[torch.Generator] | None


def draw_noise(generator: Generators, index: int, shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Noise of ``shape`` (B, ...) on ``device``: draw ``index`` of a sampling run (0 = the initial
    noise, i + 1 = step i's) of a ``CounterNoise``, or the next draw of torch generator(s)."""
    if isinstance(generator, CounterNoise):
        return generator.draw(index, shape).to(device=device, dtype=dtype)
    return randn_per_sample(shape, generator, device, dtype)


def randn_per_sample(
    shape: Sequence[int],
    generators: Generators,
    device: torch.device | str | None = None,
    dtype=torch.float32,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...).

    ``generators``: None (global RNG), one generator for the whole tensor, or a list of B generators
    where row b is drawn from ``generators[b]`` alone.
    """
    shape = tuple(shape)
    if generators is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generators, torch.Generator):
        return torch.randn(shape, generator=generators, device=generators.device, dtype=dtype).to(device)
    generators = list(generators)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
    rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype).to(device) for g in generators]
    return torch.stack(rows)


def ddpm_step(
    diffusion: GaussianDiffusion,
    model_output: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1} (IDDPM ``p_sample``).

    Args:
        model_output: (B, C or 2C, ...) for x (B, C, ...) at step indices t (B,) of ``diffusion``.
        noise: (B, C, ...) standard normal; only rows with t > 0 use it (may be None when all t == 0).
    """
    out = p_mean_variance(diffusion, model_output, x, t, clip_denoised=clip_denoised)
    nonzero = (t != 0).reshape(-1, *([1] * (x.dim() - 1)))
    if noise is None:
        if nonzero.any():
            raise ValueError("noise is required for steps with t > 0")
        return out["mean"]
    return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise


def ddim_step(
    diffusion: GaussianDiffusion,
    model_output: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """One DDIM step x_t -> x_{t_prev} (IDDPM ``ddim_sample``); learned variance channels are ignored.

    Shapes as in ``ddpm_step``; ``noise`` is needed only when eta > 0 and some t > 0.
    """
    out = p_mean_variance(diffusion, model_output, x, t, clip_denoised=clip_denoised)
    # Re-derive eps from x_0 so that clipping (if any) is reflected, as IDDPM does.
    eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
    abar = diffusion.extract(diffusion.alphas_cumprod, t, x)
    abar_prev = diffusion.extract(diffusion.alphas_cumprod_prev, t, x)
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
    mean = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
    if eta == 0:
        return mean
    if noise is None:
        raise ValueError("noise is required for DDIM with eta > 0")
    nonzero = (t != 0).reshape(-1, *([1] * (x.dim() - 1)))
    return mean + nonzero * sigma * noise


def dpm_solver_scheduler(num_train_timesteps: int = 1000):
    """diffusers' DPMSolverMultistepScheduler set up as PixArt-alpha's diffusers pipeline samples
    (the ``dpm-solver++`` sampler).

    DPM-Solver++ (data prediction), order 2 multistep, midpoint, on our linear betas, "linspace"
    timesteps (20 steps: 999, 949, 899, .., 50, all integers) and a last first-order step to sigma = 0.
    PixArt's original repository samples with the authors' DPM-Solver instead (the ``dpm-solver``
    sampler, ``dpm_solver.py``): "time_uniform" continuous times (fractional timesteps 999, 949.05, ..,
    on a schedule interpolated between steps), first order only on the first update (for >= 10 steps),
    ending at t = 1/1000 (sigma ~ 0.01) instead of 0. The model's variance channels are dropped
    before stepping (diffusers' own ``variance_type`` handling keeps only 3 channels, wrong for
    4-channel latents).
    """
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=num_train_timesteps,
        trained_betas=linear_betas(num_train_timesteps),
        solver_order=2,
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="linspace",
        steps_offset=0,
    )


def _eps_channels(model_output: torch.Tensor, channels: int) -> torch.Tensor:
    if model_output.shape[1] not in (channels, 2 * channels):
        raise ValueError(
            f"model output has {model_output.shape[1]} channels; expected {channels} or {2 * channels}"
        )
    return model_output[:, :channels]


@torch.no_grad()
def sample(
    model_fn: Callable[..., torch.Tensor],
    shape: Sequence[int],
    sampler: str = "ddpm",
    steps: int | str = 250,
    generator: Generators = None,
    noise: torch.Tensor | None = None,
    model_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
    step_callback: Callable[[int, float], None] | None = None,
    *,
    device: torch.device | str | None = None,
    eta: float = 0.0,
    clip_denoised: bool = False,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Draw samples x_0 of ``shape`` (B, C, ...) from ``model_fn``.

    Args:
        model_fn: ``model_fn(x, t, **model_kwargs)`` -> (B, C or 2C, ...) eps (+ learned-range values).
        sampler: "ddpm" (ancestral, learned variance), "ddim", "dpm-solver" (the authors' DPM-Solver++(2M),
            as PixArt-alpha samples) or "dpm-solver++" (diffusers' DPM-Solver++(2M)).
        steps: number of steps; for ddpm / ddim also an IDDPM respacing string ("250", "ddim50").
            ddpm with 250 keeps round(i * 999 / 249); ddim with 50 keeps 0, 20, .., 980.
        generator: see the module docstring; the same generator(s) draw the initial and step noise.
        noise: (B, C, ...) initial x_T; drawn from ``generator`` when None.
        step_callback: ``step_callback(i, t)`` before each model call.
        device: where to sample when ``noise`` is None (default CPU).
        eta: DDIM stochasticity (0 = deterministic).
        clip_denoised: clamp predicted x_0 to [-1, 1] in ddpm / ddim (DiT uses False).

    Returns:
        (B, C, ...) samples, float32 (or noise's dtype if wider).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    shape = tuple(shape)
    if noise is None:
        noise = draw_noise(generator, 0, shape, device, torch.float32)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
    x = noise.to(torch.promote_types(noise.dtype, torch.float32))
    model_kwargs = model_kwargs or {}

    if sampler == "dpm-solver":
        return _sample_continuous_dpm_solver(
            model_fn, x, steps, model_kwargs, progress, step_callback, num_train_timesteps
        )
    if sampler == "dpm-solver++":
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"dpm-solver++ needs an integer number of steps >= 1, got {steps!r}")
        return _sample_dpm_solver(
            model_fn, x, steps, model_kwargs, progress, step_callback, num_train_timesteps
        )

    if isinstance(steps, int):
        respacing = f"ddim{steps}" if sampler == "ddim" else str(steps)
    else:
        respacing = steps
    diffusion = create_diffusion(respacing, num_train_timesteps)
    stochastic = sampler == "ddpm" or eta > 0

    def step_fn(out, x, t, step_noise):
        if sampler == "ddpm":
            return ddpm_step(diffusion, out, x, t, step_noise, clip_denoised)
        return ddim_step(diffusion, out, x, t, eta, step_noise, clip_denoised)

    batch = x.shape[0]
    timestep_map = diffusion.timestep_map.tolist()  # host ints: no device read per step
    for i, index in enumerate(tqdm(range(diffusion.num_timesteps - 1, -1, -1), disable=not progress)):
        timestep = int(timestep_map[index])
        if step_callback is not None:
            step_callback(i, timestep)
        t_model = torch.full((batch,), timestep, dtype=torch.long, device=x.device)
        out = model_fn(x, t_model, **model_kwargs).to(x.dtype)
        # No noise at the last step (t = 0): nothing is drawn, so generators advance only when used.
        step_noise = draw_noise(generator, i + 1, x.shape, x.device, x.dtype) if stochastic and index > 0 else None
        x = step_fn(out, x, torch.full((batch,), index, dtype=torch.long, device=x.device), step_noise)
    return x


def _sample_dpm_solver(model_fn, x, steps, model_kwargs, progress, step_callback, num_train_timesteps):
    """DPM-Solver++(2M) via diffusers (deterministic: only the initial noise is random)."""
    scheduler = dpm_solver_scheduler(num_train_timesteps)
    scheduler.set_timesteps(steps, device=x.device)
    x = x * scheduler.init_noise_sigma
    channels = x.shape[1]
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress)):
        if step_callback is not None:
            step_callback(i, int(t))
        t_model = t.to(device=x.device, dtype=torch.long).expand(x.shape[0])
        eps = _eps_channels(model_fn(x, t_model, **model_kwargs), channels)
        x = scheduler.step(eps.to(x.dtype), t, x).prev_sample
    return x


def _sample_continuous_dpm_solver(model_fn, x, steps, model_kwargs, progress, step_callback, num_train_timesteps):
    """The authors' DPM-Solver++(2M) on continuous times (deterministic: only the initial noise is random)."""
    channels = x.shape[1]

    def eps_fn(i: int, x: torch.Tensor, timestep: float) -> torch.Tensor:
        if step_callback is not None:
            step_callback(i, float(timestep))  # fractional, as the network embeds it
        t_model = torch.full((x.shape[0],), timestep, dtype=x.dtype, device=x.device)
        return _eps_channels(model_fn(x, t_model, **model_kwargs), channels)

    schedule = ContinuousVPSchedule(linear_betas(num_train_timesteps))
    return dpm_solver_sample(eps_fn, x, steps, schedule, order=2, progress=progress)
