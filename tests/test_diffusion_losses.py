"""Training losses against an independent numpy / scipy computation of IDDPM's MSE + learned-range vb."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from dydit_dist.diffusion import create_diffusion, training_losses

B, C, H = 4, 2, 3


def _reference_losses(x0, t, noise, out):
    """IDDPM MSE + vb (bits/dim) for a model with fixed output, written from the paper's formulas."""
    betas_all = np.linspace(1e-4, 0.02, 1000)
    abar_all = np.cumprod(1 - betas_all)
    mse, vb = [], []
    for b in range(len(t)):
        tb = int(t[b])
        beta, abar = betas_all[tb], abar_all[tb]
        abar_prev = abar_all[tb - 1] if tb > 0 else 1.0
        eps, v = out[b, :C], out[b, C:]
        x_t = np.sqrt(abar) * x0[b] + np.sqrt(1 - abar) * noise[b]
        mse.append(np.mean((noise[b] - eps) ** 2))

        def posterior_mean(x_start, abar=abar, abar_prev=abar_prev, beta=beta, x_t=x_t):
            return (np.sqrt(abar_prev) * beta * x_start + np.sqrt(1 - beta) * (1 - abar_prev) * x_t) / (
                1 - abar
            )

        # The posterior variance at t is beta_t (1 - abar_{t-1}) / (1 - abar_t); its log is clipped
        # to the t = 1 value at t = 0.
        t_clip = max(tb, 1)
        var_clip = betas_all[t_clip] * (1 - abar_all[t_clip - 1]) / (1 - abar_all[t_clip])
        frac = (v + 1) / 2
        model_std = np.exp(0.5 * (frac * np.log(beta) + (1 - frac) * np.log(var_clip)))
        x0_pred = (x_t - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
        model_mean = posterior_mean(x0_pred)
        if tb > 0:
            true_std = np.sqrt(var_clip)
            kl = (
                np.log(model_std / true_std)
                + (true_std**2 + (posterior_mean(x0[b]) - model_mean) ** 2) / (2 * model_std**2)
                - 0.5
            )
            vb.append(np.mean(kl) / np.log(2))
        else:
            x = x0[b]
            upper = norm.cdf((x + 1 / 255 - model_mean) / model_std)
            lower = norm.cdf((x - 1 / 255 - model_mean) / model_std)
            prob = np.where(x < -0.999, upper, np.where(x > 0.999, 1 - lower, upper - lower))
            vb.append(-np.mean(np.log(prob)) / np.log(2))
    return np.array(mse), np.array(vb)


def _fixed_output_model(out, seen):
    def model(x, t, **kwargs):
        seen.append(t.clone())
        return out

    return model


def test_losses_match_independent_reference():
    g = torch.Generator().manual_seed(0)
    # Data quantized to the 256 levels, so the edge bins (-1 and +1) are exercised at t = 0.
    x0 = torch.randint(0, 256, (B, C, H, H), generator=g).double() / 127.5 - 1
    x0[0, 0, 0] = torch.tensor([-1.0, 1.0, -1.0])
    noise = torch.randn(B, C, H, H, generator=g, dtype=torch.float64)
    out = torch.cat(
        [
            noise + 0.3 * torch.randn(B, C, H, H, generator=g, dtype=torch.float64),
            torch.rand(B, C, H, H, generator=g, dtype=torch.float64) * 2 - 1,
        ],
        dim=1,
    )
    # A t = 0 model mean near the data keeps the decoder likelihood in a well-conditioned range.
    out[0, :C] = noise[0] + 0.005 * torch.randn(C, H, H, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 999])
    seen = []
    terms = training_losses(_fixed_output_model(out, seen), x0, t, noise=noise)
    ref_mse, ref_vb = _reference_losses(x0.numpy(), t.numpy(), noise.numpy(), out.numpy())

    assert set(terms) == {"mse", "vb", "loss"} and all(v.shape == (B,) for v in terms.values())
    torch.testing.assert_close(seen[0], t)
    np.testing.assert_allclose(terms["mse"].numpy(), ref_mse, rtol=1e-10)
    np.testing.assert_allclose(terms["vb"].numpy()[1:], ref_vb[1:], rtol=1e-8)
    # At t = 0 IDDPM uses a tanh approximation of the normal CDF (abs. error < 2e-4), hence the tolerance.
    assert terms["vb"][0].item() == pytest.approx(ref_vb[0], rel=1e-3)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_vb_trains_only_the_variance_channels():
    eps_param = torch.zeros(1, requires_grad=True)
    var_param = torch.zeros(1, requires_grad=True)

    def model(x, t):
        return torch.cat([x * 0 + eps_param, x * 0 + var_param], dim=1)

    x0 = torch.randn(B, C, H, H)
    terms = training_losses(model, x0, torch.tensor([0, 3, 500, 900]))
    terms["vb"].sum().backward()
    assert eps_param.grad is None or eps_param.grad.abs().item() == 0
    assert var_param.grad.abs().item() > 0
    terms["mse"].sum().backward()
    assert eps_param.grad.abs().item() > 0


def test_respaced_losses_pass_original_timesteps():
    seen = []
    x0 = torch.randn(2, C, H, H)
    out = torch.zeros(2, 2 * C, H, H)
    training_losses(
        _fixed_output_model(out, seen), x0, torch.tensor([3, 49]), diffusion=create_diffusion("ddim50")
    )
    assert seen[0].tolist() == [60, 980] and seen[0].dtype == torch.long


def test_rescale_vb():
    x0, noise, t = torch.randn(2, C, H, H), torch.randn(2, C, H, H), torch.tensor([5, 70])
    out = torch.zeros(2, 2 * C, H, H)
    d = create_diffusion("100")
    plain = training_losses(_fixed_output_model(out, []), x0, t, noise=noise, diffusion=d)
    scaled = training_losses(_fixed_output_model(out, []), x0, t, noise=noise, diffusion=d, rescale_vb=True)
    torch.testing.assert_close(scaled["vb"], plain["vb"] * 0.1)


def test_without_learned_sigma():
    x0, noise = torch.randn(2, C, H, H), torch.randn(2, C, H, H)
    terms = training_losses(lambda x, t: noise, x0, torch.tensor([1, 2]), noise=noise, learn_sigma=False)
    assert terms["mse"].abs().max() == 0 and terms["vb"].abs().max() == 0
    with pytest.raises(ValueError, match="channels|shape"):
        training_losses(lambda x, t: torch.cat([x, x], 1), x0, torch.tensor([1, 2]), learn_sigma=False)
    # learn_sigma (the default) wants 2C channels
    wrong = rf"model output shape \(2, {C}, {H}, {H}\); expected \(2, {2 * C}, \.\.\)"
    with pytest.raises(ValueError, match=wrong):
        training_losses(lambda x, t: x, x0, torch.tensor([1, 2]))
