"""Classifier-free guidance wrapper and doubled-batch helpers against the hand formula."""

import pytest
import torch

from dydit_dist.diffusion import cfg_caption_batch, cfg_class_batch, cfg_model_fn

B, C = 2, 4


def _labelled_model(x, t, y):
    """Output (N, 2C, 2, 2) that depends on the row's label, so cond and uncond rows differ."""
    shift = y.reshape(-1, 1, 1, 1).to(x.dtype)
    return torch.cat([x * (1 + shift), torch.sin(x + shift)], dim=1)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, 2, 2, generator=g)
    x2, y2 = cfg_class_batch(x, torch.tensor([3, 7]), num_classes=10)
    return x, x2, y2


@pytest.mark.parametrize("guidance_channels", [3, None])
def test_cfg_matches_hand_formula(guidance_channels):
    s = 4.0
    x, x2, y2 = _inputs()
    t = torch.tensor([5, 5, 5, 5])
    # Garbage in the unconditional half of x: the official wrapper feeds the conditional half twice.
    x2 = torch.cat([x, x + 100.0])
    got = cfg_model_fn(_labelled_model, s, guidance_channels)(x2, t, y=y2)

    cond = _labelled_model(x, t[:B], torch.tensor([3, 7]))
    uncond = _labelled_model(x, t[:B], torch.tensor([10, 10]))
    g = C if guidance_channels is None else guidance_channels
    guided = uncond[:, :g] + s * (cond[:, :g] - uncond[:, :g])
    expected = torch.cat([torch.cat([guided, cond[:, g:]], 1), torch.cat([guided, uncond[:, g:]], 1)])
    assert got.shape == (2 * B, 2 * C, 2, 2)
    torch.testing.assert_close(got, expected)


def test_dit_quirk_leaves_the_fourth_eps_channel_unguided():
    x, x2, y2 = _inputs()
    t = torch.zeros(2 * B, dtype=torch.long)
    dit = cfg_model_fn(_labelled_model, 4.0, 3)(x2, t, y=y2)
    full = cfg_model_fn(_labelled_model, 4.0, None)(x2, t, y=y2)
    torch.testing.assert_close(dit[:, :3], full[:, :3])
    assert not torch.allclose(dit[:, 3], full[:, 3])
    torch.testing.assert_close(dit[:, C:], full[:, C:])


def test_scale_one_is_the_conditional_model():
    x, x2, y2 = _inputs()
    t = torch.zeros(2 * B, dtype=torch.long)
    got = cfg_model_fn(_labelled_model, 1.0, None)(x2, t, y=y2)
    torch.testing.assert_close(got[:B], _labelled_model(x, t[:B], y2[:B]))


def test_class_batch_uses_null_class():
    x = torch.randn(B, C, 2, 2)
    x2, y2 = cfg_class_batch(x, torch.tensor([0, 999]), num_classes=1000)
    assert y2.tolist() == [0, 999, 1000, 1000]
    torch.testing.assert_close(x2, torch.cat([x, x]))
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 1000\)"):
        cfg_class_batch(x, torch.tensor([0, 1000]), num_classes=1000)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\), got \(1,\)"):
        cfg_class_batch(x, torch.tensor([0]), num_classes=1000)


def test_caption_batch_uses_null_caption_and_repeats_mask():
    x = torch.randn(B, C, 2, 2)
    caption = torch.randn(B, 1, 5, 8)
    null = torch.randn(5, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    x2, c2, m2 = cfg_caption_batch(x, caption, null, mask)
    assert c2.shape == (2 * B, 1, 5, 8)
    torch.testing.assert_close(c2[:B], caption)
    torch.testing.assert_close(c2[B:], null.expand(B, 1, 5, 8))
    assert torch.equal(m2, torch.cat([mask, mask]))
    assert cfg_caption_batch(x, caption, null)[2] is None
    with pytest.raises(ValueError, match=r"null caption \(6, 8\) does not broadcast to \(2, 1, 5, 8\)"):
        cfg_caption_batch(x, caption, torch.randn(6, 8))


def test_bad_input():
    with pytest.raises(ValueError, match="guidance_channels must be >= 1 or None, got 0"):
        cfg_model_fn(_labelled_model, 1.5, 0)
    with pytest.raises(ValueError, match="even"):
        cfg_model_fn(_labelled_model, 1.5)(torch.randn(3, C, 2, 2), torch.zeros(3), y=torch.zeros(3))
