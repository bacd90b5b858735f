"""Counter-based per-sample noise: Philox4x32-10 against the Random123 known answers, rows
independent of their batch, draws independent of each other, normal statistics."""

from __future__ import annotations

import pytest
import torch

from dydit_dist.diffusion import CounterNoise, philox4x32, sample, stream_kind


def _words(*values):
    return [torch.tensor([v], dtype=torch.int64) for v in values]


@pytest.mark.parametrize("counter, key, expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_matches_random123_known_answers(counter, key, expected):
    out = philox4x32(_words(*counter), _words(*key))
    assert tuple(int(w) for w in out) == expected


def test_a_row_depends_on_its_seed_and_draw_only():
    seeds = [7, 2**64 - 1, 123456789]
    batch = CounterNoise.from_seeds(seeds).draw(3, (3, 4, 5, 5))
    alone = CounterNoise.from_seeds(seeds[1:2]).draw(3, (1, 4, 5, 5))
    assert torch.equal(batch[1:2], alone)
    assert not torch.equal(batch[0], batch[2])
    assert not torch.equal(CounterNoise.from_seeds(seeds).draw(4, (3, 4, 5, 5)), batch)
    assert torch.equal(CounterNoise.from_seeds(seeds).repeat(2).draw(3, (6, 4, 5, 5))[3:], batch)


def test_draws_are_standard_normal():
    x = CounterNoise.from_seeds(range(16)).draw(1, (16, 4, 32, 32)).flatten()
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01
    assert abs(float((x.abs() < 1).float().mean()) - 0.6827) < 0.01


def test_sampler_rows_do_not_depend_on_companions():
    model = lambda x, t: torch.cat([0.1 * x, torch.zeros_like(x)], dim=1)  # noqa: E731
    both = CounterNoise.from_seeds([5, 6])
    out = sample(model, (2, 4, 3, 3), "ddpm", 10, generator=both)
    alone = sample(model, (1, 4, 3, 3), "ddpm", 10, generator=CounterNoise.from_seeds([6]))
    assert torch.equal(out[1:], alone)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="keyed for 2 rows"):
        CounterNoise.from_seeds([1, 2]).draw(0, (3, 4))
    with pytest.raises(ValueError, match="valid: counter, generator"):
        stream_kind("numpy", "cpu")
    assert stream_kind("counter", "cpu") == "philox4x32-10/box-muller/cpu"
