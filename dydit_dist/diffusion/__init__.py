"""Noise schedule, training losses, samplers and classifier-free guidance.

Knows nothing of networks beyond ``model(x, t, **cond) -> output`` (C eps channels, or 2C with
learned-range variance values), with ``t`` the original timesteps 0..999.
"""

from .dpm_solver import ContinuousVPSchedule, dpm_solver_sample
from .guidance import cfg_caption_batch, cfg_class_batch, cfg_model_fn
from .losses import (
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    p_mean_variance,
    training_losses,
    vb_terms_bpd,
)
from .noise import CounterNoise, philox4x32, stream_kind
from .samplers import (
    SAMPLERS,
    ddim_step,
    ddpm_step,
    dpm_solver_scheduler,
    draw_noise,
    randn_per_sample,
    sample,
)
from .schedule import GaussianDiffusion, create_diffusion, linear_betas, respace, space_timesteps

__all__ = [
    "SAMPLERS",
    "ContinuousVPSchedule",
    "CounterNoise",
    "GaussianDiffusion",
    "cfg_caption_batch",
    "cfg_class_batch",
    "cfg_model_fn",
    "create_diffusion",
    "ddim_step",
    "ddpm_step",
    "discretized_gaussian_log_likelihood",
    "dpm_solver_sample",
    "dpm_solver_scheduler",
    "draw_noise",
    "linear_betas",
    "mean_flat",
    "normal_kl",
    "p_mean_variance",
    "philox4x32",
    "randn_per_sample",
    "respace",
    "sample",
    "space_timesteps",
    "stream_kind",
    "training_losses",
    "vb_terms_bpd",
]
