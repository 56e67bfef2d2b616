import math

import pytest
import torch

from ddpm import NoiseSchedule


def test_linear_closed_form_values():
    s = NoiseSchedule.linear(1000, 1e-4, 0.02)
    assert s.betas.dtype == torch.float64 and s.betas.shape == (1000,)
    # alpha_bar_999 = prod(1 - beta_t); beta_tilde_1 = beta_1 (1 - alpha_bar_0) / (1 - alpha_bar_1)
    assert s.alphas_cumprod[999].item() == pytest.approx(4.0358e-5, rel=1e-4)
    assert s.posterior_variance[1].item() == pytest.approx(5.4532e-5, rel=1e-4)
    assert s.posterior_variance[0].item() == 0.0
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]
    assert s.alphas_cumprod_prev[0].item() == 1.0
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])


def test_posterior_mean_coefficients_match_definition():
    s = NoiseSchedule.linear()
    t = 500
    ab, ab_prev, beta = s.alphas_cumprod[t], s.alphas_cumprod[t - 1], s.betas[t]
    assert s.posterior_mean_coef1[t] == pytest.approx((beta * ab_prev.sqrt() / (1 - ab)).item())
    assert s.posterior_mean_coef2[t] == pytest.approx(((1 - ab_prev) * (1 - beta).sqrt() / (1 - ab)).item())


def test_cosine_end_points():
    s = NoiseSchedule.cosine(1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert s.alphas_cumprod[0].item() == pytest.approx(f(1 / 1000) / f(0), rel=1e-9)
    assert s.betas.max().item() == pytest.approx(0.999)  # the cap bites at the last step
    assert s.alphas_cumprod[-1].item() < 1e-8
    assert bool((s.betas[1:] >= s.betas[:-1]).all())


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_zero_terminal_snr(kind):
    base = getattr(NoiseSchedule, kind)()
    z = getattr(NoiseSchedule, kind)(zero_terminal_snr=True)
    assert z.alphas_cumprod[-1].item() == 0.0
    assert z.alphas_cumprod[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-12)
    assert bool((z.alphas_cumprod[1:] < z.alphas_cumprod[:-1]).all())


def test_config_round_trip():
    for s in (NoiseSchedule.linear(100, 1e-3, 0.05), NoiseSchedule.cosine(200, zero_terminal_snr=True)):
        s2 = NoiseSchedule.from_config(s.to_config())
        torch.testing.assert_close(s.betas, s2.betas)
    with pytest.raises(ValueError, match="unknown schedule kind"):
        NoiseSchedule.from_config({"kind": "quadratic"})


def test_q_sample_matches_definition_and_moments():
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((4096, 1, 2, 2), 0.5)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.full((4096,), 300)
    x_t = s.q_sample(x0, t, eps)
    ab = s.alphas_cumprod[300].item()
    torch.testing.assert_close(x_t, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps)
    assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 0.5, abs=4 * math.sqrt((1 - ab) / x_t.numel()))


def test_prediction_conversions_round_trip():
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    x_t = s.q_sample(x0, t, eps)
    v = s.v_from(x0, t, eps)
    torch.testing.assert_close(s.x0_from_eps(x_t, t, eps), x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(s.eps_from_x0(x_t, t, x0), eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.x0_from_v(x_t, t, v), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.eps_from_v(x_t, t, v), eps, atol=1e-5, rtol=1e-5)
    # Each parameterisation gives back the true x_0 (to the tolerance of its conversion above) and eps.
    for kind, pred, tol in (("epsilon", eps, 2e-3), ("sample", x0, 0.0), ("v_prediction", v, 1e-5)):
        x0_hat, eps_hat = s.to_x0_eps(pred, x_t, t, kind)
        torch.testing.assert_close(x0_hat, x0, atol=tol, rtol=tol, msg=lambda m: f"{kind}: {m}")
        torch.testing.assert_close(eps_hat, eps, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="prediction_type"):
        s.to_x0_eps(eps, x_t, t, "score")


def test_snr():
    s = NoiseSchedule.linear()
    t = torch.tensor([0, 999])
    ab = s.alphas_cumprod[t]
    torch.testing.assert_close(s.snr(t), ab / (1 - ab))
