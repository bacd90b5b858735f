"""The Gaussian diffusion process: noise schedule, timestep respacing and the q / posterior tables.

Numerically this follows IDDPM (openai/improved-diffusion, used unchanged by facebookresearch/DiT and
PixArt-alpha): float64 numpy tables, gathered per timestep and cast to the working dtype. A respaced
process keeps a subset of the original timesteps and rebuilds its betas from the kept
``alphas_cumprod``, so that every kept step is an exact marginal of the original process.

Timestep conventions: a ``GaussianDiffusion`` is indexed by its own step index ``t`` in
``0 .. num_timesteps - 1``; ``timestep_map[t]`` is the ORIGINAL timestep (0..999) that networks are
conditioned on (IDDPM's ``_WrappedModel`` with ``rescale_timesteps=False``).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["GaussianDiffusion", "create_diffusion", "linear_betas", "respace", "space_timesteps"]


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """IDDPM's "linear" schedule: betas from 1e-4 to 0.02, scaled by 1000 / T. Returns (T,) float64."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """The original timesteps kept by a respacing, exactly as IDDPM's ``space_timesteps``.

    ``section_counts`` is "ddimN" (the integer stride giving exactly N steps: "ddim50" -> 0, 20, .., 980),
    a comma-separated string "a,b,c" or a sequence of ints: the range is cut into equal sections and
    section i keeps ``counts[i]`` steps, evenly spread with rounding ("250" over 1000 ->
    round(i * 999 / 249) = 0, 4, 8, .., 995, 999).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim") :])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}; expected 'ddimN'") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot create exactly {desired} steps with an integer stride over {num_timesteps}"
            )
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"bad respacing {section_counts!r}; expected 'N', 'a,b,..' or 'ddimN'") from None
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start_idx = 0
    all_steps: list[int] = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the float stride as IDDPM does, so rounding matches it bit for bit.
        cur_idx = 0.0
        for _ in range(count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


_DEVICE_TABLES: dict[tuple[int, torch.device], tuple[weakref.ref, torch.Tensor]] = {}


def _on_device(table: np.ndarray, device: torch.device) -> torch.Tensor:
    """`table` as a tensor on `device`, copied once per (table, device): a host-to-device copy from
    pageable memory waits for the device, so a sampling step must not make one per lookup."""
    key = (id(table), torch.device(device))
    hit = _DEVICE_TABLES.get(key)
    if hit is None or hit[0]() is not table:
        hit = (weakref.ref(table), torch.tensor(table, device=device))
        _DEVICE_TABLES[key] = hit
    return hit[1]


def _read_only(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


class GaussianDiffusion:
    """Tables of a (possibly respaced) Gaussian diffusion process; all float64 arrays of shape (T,).

    Args:
        betas: (T,) float64 variances of the forward steps, in (0, 1].
        timestep_map: (T,) original timestep of each step; identity when None.
    """

    def __init__(self, betas: np.ndarray, timestep_map: Sequence[int] | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.num_timesteps = len(betas)
        if timestep_map is None:
            timestep_map = range(self.num_timesteps)
        self.timestep_map = _read_only(np.asarray(timestep_map, dtype=np.int64))
        if self.timestep_map.shape != betas.shape:
            raise ValueError(f"timestep_map has {len(self.timestep_map)} entries for {len(betas)} betas")

        self.betas = _read_only(betas)
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        self.alphas_cumprod = _read_only(ac)
        self.alphas_cumprod_prev = _read_only(ac_prev)
        self.sqrt_alphas_cumprod = _read_only(np.sqrt(ac))
        self.sqrt_one_minus_alphas_cumprod = _read_only(np.sqrt(1.0 - ac))
        self.sqrt_recip_alphas_cumprod = _read_only(np.sqrt(1.0 / ac))
        self.sqrt_recipm1_alphas_cumprod = _read_only(np.sqrt(1.0 / ac - 1.0))
        # q(x_{t-1} | x_t, x_0)
        pv = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.posterior_variance = _read_only(pv)
        # The posterior variance is 0 at t = 0: its log is clipped to the value at t = 1.
        pv_clipped = np.append(pv[1], pv[1:]) if len(pv) > 1 else pv
        self.posterior_log_variance_clipped = _read_only(np.log(pv_clipped))
        self.posterior_mean_coef1 = _read_only(betas * np.sqrt(ac_prev) / (1.0 - ac))
        self.posterior_mean_coef2 = _read_only((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac))
        self.log_betas = _read_only(np.log(betas))
        # IDDPM's "fixed large" variance (used without learned sigma): betas, with a finite value at t = 0.
        fixed_large = np.append(pv[1], betas[1:]) if len(pv) > 1 else betas.copy()
        self.fixed_large_variance = _read_only(fixed_large)
        self.fixed_large_log_variance = _read_only(np.log(fixed_large))

    def __repr__(self) -> str:
        return f"GaussianDiffusion(num_timesteps={self.num_timesteps}, original={int(self.timestep_map[-1]) + 1})"

    @staticmethod
    def extract(table: np.ndarray, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gather ``table[t]`` (t: (B,) long) into shape (B, 1, ..., 1) broadcastable to x.

        The dtype is x's promoted to at least float32, as IDDPM computes in float32 for low-precision x.
        """
        dtype = torch.promote_types(x.dtype, torch.float32)
        out = _on_device(table, t.device)[t].to(dtype)
        return out.reshape(t.shape[0], *([1] * (x.dim() - 1)))

    def original_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Map step indices (B,) long to the original timesteps the network is conditioned on."""
        return _on_device(self.timestep_map, t.device)[t]

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0): x_start, noise (B, ...), t (B,) -> (B, ...)."""
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean (B, ...), variance and clipped log-variance (B, 1, ..) of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self.extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self.extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return (
            mean,
            self.extract(self.posterior_variance, t, x_t),
            self.extract(self.posterior_log_variance_clipped, t, x_t),
        )

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar); all (B, ...)."""
        return (
            self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor
    ) -> torch.Tensor:
        """Inverse of ``predict_xstart_from_eps``; all (B, ...)."""
        return (self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x_start) / self.extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )


def respace(base: GaussianDiffusion, use_timesteps: set[int] | Sequence[int]) -> GaussianDiffusion:
    """Keep only ``use_timesteps`` (indices into ``base``), rebuilding betas from the kept alphas_cumprod.

    new_beta_i = 1 - abar[k_i] / abar[k_{i-1}] (abar before the first kept step is 1), so the respaced
    process has exactly the same marginals q(x_t | x_0) at the kept steps.
    """
    kept = sorted(set(use_timesteps))
    if not kept or kept[0] < 0 or kept[-1] >= base.num_timesteps:
        raise ValueError(f"use_timesteps must be non-empty and within [0, {base.num_timesteps})")
    last = 1.0
    new_betas = []
    for k in kept:
        new_betas.append(1.0 - base.alphas_cumprod[k] / last)
        last = base.alphas_cumprod[k]
    return GaussianDiffusion(np.array(new_betas), timestep_map=base.timestep_map[kept])


def create_diffusion(
    respacing: str | Sequence[int] | None = None, num_timesteps: int = 1000
) -> GaussianDiffusion:
    """The linear-schedule process over ``num_timesteps``, respaced by ``respacing`` ("250", "ddim50", ..).

    None or "" keeps every step (training). Results are cached and read-only.
    """
    if respacing is not None and not isinstance(respacing, str):
        respacing = tuple(int(c) for c in respacing)
    return _create_diffusion(respacing or None, num_timesteps)


@functools.lru_cache(maxsize=16)
def _create_diffusion(respacing: str | tuple[int, ...] | None, num_timesteps: int) -> GaussianDiffusion:
    base = GaussianDiffusion(linear_betas(num_timesteps))
    if respacing is None:
        return base
    return respace(base, space_timesteps(num_timesteps, respacing))
