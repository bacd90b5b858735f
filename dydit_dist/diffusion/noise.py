"""Counter-based per-sample noise: Philox4x32-10 keyed by (sample seed, draw), computed on the device.

Every element of every draw is a pure function of (key, counter): the key is the sample's 64-bit seed
(two 32-bit words), the counter is (element // 2, draw, 0, 0), where draw 0 is the initial noise x_T
and draw i + 1 the noise of sampling step i. Nothing is carried from one draw to the next, so a row's
noise never depends on its batch companions, on how many rows were drawn before it, or on the
process that draws it; and no generator lives on the host: the whole batch's noise is a few dozen
elementwise integer kernels on the sampling device.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) is computed here
with int64 tensor ops: 32-bit words held in int64, the 32x32 -> 64-bit products split into 16-bit
halves so that nothing overflows. Two of its four output words become two normals by Box-Muller
(float32). The integer stream is identical on every device; the normals may differ in the last bits
between CPU and GPU (log, cos, sin), so the manifest records the device kind with the stream
(`stream_kind`). Each device's stream is deterministic on its own.

    noise = CounterNoise.from_seeds([sample_seed(0, k) for k in indices], device="cuda")
    x_T = noise.draw(0, (B, 4, 32, 32))                  # (B, 4, 32, 32) float32 on the device
    x = sample(model_fn, x_T.shape, noise=x_T, generator=noise, ...)   # steps draw 1, 2, ...
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["CounterNoise", "philox4x32", "stream_kind"]

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_ROUNDS = 10


def _mulhilo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a * x, for a constant a < 2^32 and words x (int64)."""
    lo_part = x * (a & 0xFFFF)  # < 2^48
    hi_part = x * (a >> 16)  # < 2^48, weighs 2^16
    s = lo_part + ((hi_part & 0xFFFF) << 16)  # < 2^49
    return (hi_part >> 16) + (s >> 32), s & _MASK32


def philox4x32(counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Philox4x32-10 on broadcastable int64 tensors of 32-bit words: counter (c0..c3), key (k0, k1)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(_ROUNDS):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return [c0, c1, c2, c3]


def _uniform(words: torch.Tensor) -> torch.Tensor:
    """32-bit words -> float32 uniforms in (0, 1]: the top 24 bits, offset by half a step (never 0:
    Box-Muller takes a log). Above 2^23 float32 steps by 1, so the half step rounds (to even) there and
    the top word gives exactly 1.0 (a radius of 0): a bias of about 2^-24, kept because changing it
    would change every sample's noise (and so every recorded samples folder's bytes)."""
    return ((words >> 8).to(torch.float32) + 0.5) * 2.0**-24


class CounterNoise:
    """Per-row standard normal noise keyed by (row seed, draw index); see the module docstring.

    keys: (B, 2) int64 tensor of 32-bit words (low, high) of each row's 64-bit seed, on the device.
    """

    def __init__(self, keys: torch.Tensor):
        if keys.dim() != 2 or keys.shape[1] != 2 or keys.dtype != torch.int64:
            raise ValueError(f"keys must be a (B, 2) int64 tensor of 32-bit words, got {tuple(keys.shape)} {keys.dtype}")
        self.keys = keys

    @classmethod
    def from_seeds(cls, seeds: Sequence[int], device: torch.device | str = "cpu") -> CounterNoise:
        """One row per 64-bit seed (e.g. `sample.plan.sample_seed(seed, k)`)."""
        words = [[s & _MASK32, (s >> 32) & _MASK32] for s in (int(s) for s in seeds)]
        if any(s < 0 for s in seeds):
            raise ValueError("seeds must be non-negative 64-bit integers")
        return cls(torch.tensor(words, dtype=torch.int64).reshape(-1, 2).to(device))

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def repeat(self, times: int) -> CounterNoise:
        """The rows repeated `times` over (classifier-free guidance: row b and row B + b share a key)."""
        return CounterNoise(self.keys.repeat(times, 1))

    def draw(self, index: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Draw `index` (0 = initial noise, i + 1 = sampling step i): standard normals of `shape` (B, ...)."""
        shape = tuple(shape)
        if shape[0] != len(self):
            raise ValueError(f"noise keyed for {len(self)} rows, asked for a batch of {shape[0]}")
        if not 0 <= index < 2**32:
            raise ValueError(f"draw index {index} outside [0, 2^32)")
        per_row = math.prod(shape[1:])
        pairs = (per_row + 1) // 2
        c0 = torch.arange(pairs, device=self.device, dtype=torch.int64)[None, :]  # (1, P)
        c1 = torch.full_like(c0, index)
        zero = torch.zeros_like(c0)
        w0, w1, _, _ = philox4x32((c0, c1, zero, zero), (self.keys[:, :1], self.keys[:, 1:]))  # (B, P) each
        radius = torch.sqrt(-2.0 * torch.log(_uniform(w0)))
        angle = (2.0 * math.pi) * _uniform(w1)
        normals = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)  # (B, P, 2)
        return normals.reshape(shape[0], -1)[:, :per_row].reshape(shape).to(dtype)


def stream_kind(noise: str, device: torch.device | str) -> str:
    """What the manifest records of the noise stream: its kind and the device kind that samples (the
    counter stream's CPU and CUDA normals may differ in the last bits; the generator's are drawn on the
    CPU either way, but the network under autocast and TF32 gives other bits on CUDA than on the CPU)."""
    if noise == "counter":
        return f"philox4x32-10/box-muller/{torch.device(device).type}"
    if noise == "generator":
        return f"torch-cpu-generator-per-sample/{torch.device(device).type}"
    raise ValueError(f"unknown noise stream {noise!r}; valid: counter, generator")
