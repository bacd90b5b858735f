"""Training losses (IDDPM ``LossType.MSE`` with learned-range variance) and the shared p(x_{t-1} | x_t).

A model output has C channels (eps) or 2C channels (eps, then the learned-range variance values v in
[-1, 1]): the log-variance interpolates between the clipped posterior log-variance (v = -1) and
log(beta_t) (v = +1). Without learned variance, IDDPM's "fixed large" variance (betas, with the
posterior variance at t = 0) is used, as DiT does for ``learn_sigma=False``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .schedule import GaussianDiffusion, create_diffusion

__all__ = [
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "normal_kl",
    "p_mean_variance",
    "training_losses",
    "vb_terms_bpd",
]


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (broadcasting)."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """IDDPM's tanh approximation of the standard normal CDF (abs. error below 2e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood (nats, elementwise) of data x in [-1, 1] quantized to 256 bins under N(means, exp(log_scales)^2).

    The bins at the edges extend to -inf / +inf. All arguments broadcast to x's shape.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def p_mean_variance(
    diffusion: GaussianDiffusion,
    model_output: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    clip_denoised: bool = False,
) -> dict[str, torch.Tensor]:
    """The model's p(x_{t-1} | x_t).

    Args:
        diffusion: the (respaced) process; t indexes its steps, not original timesteps.
        model_output: (B, C, ...) eps, or (B, 2C, ...) eps then learned-range values.
        x: (B, C, ...) x_t.
        t: (B,) long step indices.
        clip_denoised: clamp the predicted x_0 to [-1, 1] (DiT samples with False).

    Returns:
        dict with "mean" (B, C, ...), "variance" and "log_variance" (broadcastable to x), "pred_xstart"
        and "eps" (B, C, ...).
    """
    channels = x.shape[1]
    if model_output.shape[1] == 2 * channels:
        eps, var_values = torch.split(model_output, channels, dim=1)
        min_log = diffusion.extract(diffusion.posterior_log_variance_clipped, t, x)
        max_log = diffusion.extract(diffusion.log_betas, t, x)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        variance = torch.exp(log_variance)
    elif model_output.shape[1] == channels:
        eps = model_output
        variance = diffusion.extract(diffusion.fixed_large_variance, t, x)
        log_variance = diffusion.extract(diffusion.fixed_large_log_variance, t, x)
    else:
        raise ValueError(
            f"model output has {model_output.shape[1]} channels; expected {channels} or {2 * channels}"
        )
    pred_xstart = diffusion.predict_xstart_from_eps(x, t, eps)
    if clip_denoised:
        pred_xstart = pred_xstart.clamp(-1, 1)
    mean, _, _ = diffusion.q_posterior_mean_variance(pred_xstart, x, t)
    return {
        "mean": mean,
        "variance": variance,
        "log_variance": log_variance,
        "pred_xstart": pred_xstart,
        "eps": eps,
    }


def vb_terms_bpd(
    diffusion: GaussianDiffusion,
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """Variational bound term in bits per dimension, (B,).

    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the decoder NLL -log p(x_0 | x_1) at t = 0.
    """
    true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    out = p_mean_variance(diffusion, model_output, x_t, t, clip_denoised=False)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
    nll = mean_flat(nll) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def training_losses(
    model: Callable[..., torch.Tensor],
    x_start: torch.Tensor,
    t: torch.Tensor,
    model_kwargs: dict[str, Any] | None = None,
    noise: torch.Tensor | None = None,
    learn_sigma: bool = True,
    diffusion: GaussianDiffusion | None = None,
    rescale_vb: bool = False,
) -> dict[str, torch.Tensor]:
    """IDDPM ``LossType.MSE`` losses for one batch (what DiT and PixArt-alpha train with).

    Args:
        model: ``model(x_t, timesteps, **model_kwargs)`` -> (B, 2C, ...) if learn_sigma else (B, C, ...);
            timesteps are the original ones (``diffusion.timestep_map[t]``).
        x_start: (B, C, ...) clean data (latents).
        t: (B,) long step indices of ``diffusion``.
        noise: (B, C, ...) eps; drawn with ``torch.randn_like`` when None.
        diffusion: the process; the 1000-step linear one when None.
        rescale_vb: multiply vb by T / 1000 (IDDPM's RESCALED_MSE; DiT uses plain MSE; equal at T = 1000).

    Returns:
        dict of (B,) tensors: "mse" (eps regression), "vb" (learned-variance bound in bits/dim, computed
        with the eps part detached so it only trains the variance; zeros without learn_sigma) and
        "loss" = mse + vb.
    """
    diffusion = diffusion if diffusion is not None else create_diffusion()
    model_kwargs = model_kwargs or {}
    if t.shape != (x_start.shape[0],):
        raise ValueError(f"t must have shape ({x_start.shape[0]},), got {tuple(t.shape)}")
    if noise is None:
        noise = torch.randn_like(x_start)
    x_t = diffusion.q_sample(x_start, t, noise)
    model_output = model(x_t, diffusion.original_timesteps(t), **model_kwargs)

    channels = x_start.shape[1]
    expected = 2 * channels if learn_sigma else channels
    if model_output.shape[:2] != (x_start.shape[0], expected) or model_output.shape[2:] != x_start.shape[2:]:
        raise ValueError(
            f"model output shape {tuple(model_output.shape)}; expected ({x_start.shape[0]}, {expected}, ..)"
        )
    if learn_sigma:
        eps, var_values = torch.split(model_output, channels, dim=1)
        # The bound must not pull on the mean: only the variance values receive its gradient.
        frozen_out = torch.cat([eps.detach(), var_values], dim=1)
        vb = vb_terms_bpd(diffusion, frozen_out, x_start, x_t, t)
        if rescale_vb:
            vb = vb * (diffusion.num_timesteps / 1000.0)
    else:
        eps = model_output
        vb = torch.zeros(
            x_start.shape[0], device=x_start.device, dtype=torch.promote_types(eps.dtype, torch.float32)
        )
    mse = mean_flat((noise - eps) ** 2)
    return {"mse": mse, "vb": vb, "loss": mse + vb}
