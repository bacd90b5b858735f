"""Multistep DPM-Solver++ in continuous time, as PixArt-alpha samples (the ``dpm-solver`` sampler).

The algorithm of the DPM-Solver authors' implementation that PixArt-alpha ships
(``diffusion/model/dpm_solver.py``, called from ``scripts/inference.py`` with
``NoiseScheduleVP('discrete', betas)``, a noise model under classifier-free guidance,
``algorithm_type="dpmsolver++"`` and ``sample(z, steps, order=2, skip_type="time_uniform",
method="multistep")``), written from its definitions:

- The discrete process of N steps becomes a continuous one on t in [1/N, 1]: step n sits at
  t = (n + 1) / N, and log alpha_t (alpha_t^2 = alphas_cumprod) is interpolated linearly in t between
  steps. sigma_t = sqrt(1 - alpha_t^2), lambda_t = log alpha_t - log sigma_t (half the log-SNR).
- Times are uniform: t_i = linspace(1, 1/N, S + 1). The network sees the original-timestep scale
  (t - 1/N) * N (the official code writes * 1000: the same for N = 1000), fractional (999, 949.05, ..,
  49.95 for S = 20, N = 1000; the last time, 0, is where the solver ends and is never evaluated).
- Data prediction x0 = (x - sigma eps) / alpha. The first update is first order (DDIM), the others
  second order multistep (the "dpmsolver" variant: x0_i + (x0_i - x0_{i-1}) / (2 r)); when S < 10 the
  last update is first order again (``lower_order_final``). It ends at t = 1/N (sigma ~ 0.01), without
  a final denoising call (``denoise_to_zero=False``), so the network is called exactly S times.

The coefficients are float64 scalars (one time per step for the whole batch); the state keeps its
dtype. The official code holds its tables and times in float32; that rounding is all that separates
the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["ContinuousVPSchedule", "dpm_solver_orders", "dpm_solver_sample", "dpm_solver_update"]

# The official schedule drops its noisiest steps when half the log-SNR there is below this (for cosine
# schedules), which also rescales time; never the case for the linear schedule over 1000 steps.
_MIN_LAMBDA = -5.1


class ContinuousVPSchedule:
    """A discrete noise schedule read as a continuous-time VP process (``NoiseScheduleVP('discrete')``).

    Args:
        betas: (N,) the discrete betas, N >= 2.
    """

    def __init__(self, betas: np.ndarray):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 2:
            raise ValueError(f"need a 1-D array of at least 2 betas, got shape {betas.shape}")
        self.num_timesteps = betas.size
        self.knots = np.arange(1, betas.size + 1, dtype=np.float64) / betas.size  # step n at (n + 1) / N
        self.log_alphas = 0.5 * np.cumsum(np.log1p(-betas))
        if self.lambda_(1.0) < _MIN_LAMBDA:
            raise ValueError(
                f"half log-SNR {self.lambda_(1.0):.3f} at t = 1 is below {_MIN_LAMBDA}: the reference "
                "DPM-Solver would truncate and rescale this schedule, which is not supported"
            )

    @property
    def t_end(self) -> float:
        """Where sampling ends: the first discrete step, t = 1/N."""
        return 1.0 / self.num_timesteps

    def log_alpha(self, t: float) -> float:
        return float(np.interp(t, self.knots, self.log_alphas))

    def alpha(self, t: float) -> float:
        return math.exp(self.log_alpha(t))

    def sigma(self, t: float) -> float:
        return math.sqrt(-math.expm1(2.0 * self.log_alpha(t)))

    def lambda_(self, t: float) -> float:
        return self.log_alpha(t) - math.log(self.sigma(t))

    def model_timestep(self, t: float) -> float:
        """The network's (fractional) original timestep at continuous time t: (t - 1/N) * N."""
        return (t - self.t_end) * self.num_timesteps

    def times(self, steps: int) -> np.ndarray:
        """(steps + 1,) float64: the "time_uniform" times, 1 down to 1/N."""
        return np.linspace(1.0, self.t_end, steps + 1)


def dpm_solver_orders(steps: int, order: int = 2, lower_order_final: bool = True) -> list[int]:
    """The order of each of the ``steps`` updates: lower orders while the history fills up, and
    (``lower_order_final``, only when steps < 10) lower orders again over the last updates."""
    orders = []
    for k in range(1, steps + 1):
        if k < order:
            orders.append(k)
        elif lower_order_final and steps < 10:
            orders.append(min(order, steps + 1 - k))
        else:
            orders.append(order)
    return orders


def dpm_solver_update(
    schedule: ContinuousVPSchedule,
    x: torch.Tensor,
    x0_history: list[torch.Tensor],
    t_history: list[float],
    t: float,
    order: int,
) -> torch.Tensor:
    """One DPM-Solver++ update of x (B, C, ...) from time ``t_history[-1]`` to ``t``.

    ``x0_history``: the data predictions (B, C, ...) at ``t_history``, newest last; order 1 uses the
    newest, order 2 the newest two.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    s = t_history[-1]
    h = schedule.lambda_(t) - schedule.lambda_(s)
    phi = math.expm1(-h)
    alpha_t = schedule.alpha(t)
    x0 = x0_history[-1]
    if order == 2:
        r = (schedule.lambda_(s) - schedule.lambda_(t_history[-2])) / h
        x0 = x0 + (x0 - x0_history[-2]) / (2.0 * r)
    return (schedule.sigma(t) / schedule.sigma(s)) * x - (alpha_t * phi) * x0


def dpm_solver_sample(
    eps_fn: Callable[[int, torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    steps: int,
    schedule: ContinuousVPSchedule,
    order: int = 2,
    progress: bool = False,
) -> torch.Tensor:
    """Solve the probability-flow ODE from x (B, C, ...) at t = 1 down to t = 1/N in ``steps`` updates.

    ``eps_fn(i, x, timestep)`` -> (B, C, ...) the noise prediction of call i at the network's fractional
    timestep; it is called once per update, before it (never at the end time).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"dpm-solver needs an integer number of steps >= 1, got {steps!r}")
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    times = schedule.times(steps).tolist()
    x0_history: list[torch.Tensor] = []
    t_history: list[float] = []
    for i, step_order in enumerate(tqdm(dpm_solver_orders(steps, order), disable=not progress)):
        s = times[i]
        eps = eps_fn(i, x, schedule.model_timestep(s)).to(x.dtype)
        x0_history = [*x0_history, (x - schedule.sigma(s) * eps) / schedule.alpha(s)][-order:]
        t_history = [*t_history, s][-order:]
        x = dpm_solver_update(schedule, x, x0_history, t_history, times[i + 1], step_order)
    return x
