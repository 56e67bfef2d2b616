"""The training loss (ddpm/losses.py): the optimal predictor, min-SNR weighting, importance-sampled timesteps."""

import pytest
import torch

from ddpm import NoiseSchedule, diffusion_loss
from ddpm.losses import loss_weights


def test_loss_of_the_optimal_predictor_is_lower_than_a_wrong_one():
    """For Gaussian data the closed-form E[eps | x_t] minimises L_simple: any other predictor scores worse."""
    from tests.ddpm.analytic import GaussianEps

    schedule = NoiseSchedule.linear()
    x0 = 0.3 + 0.5 * torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    best = GaussianEps(schedule, 0.3, 0.5)
    wrong = GaussianEps(schedule, 0.0, 1.0)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731  same t and eps for both
    assert diffusion_loss(best, schedule, x0, generator=g()) < 0.9 * diffusion_loss(wrong, schedule, x0,
                                                                                     generator=g())


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_min_snr_weighting(prediction_type):
    """The weights are min(SNR, g)/SNR (eps), min(SNR, g) (x_0) and min(SNR, g)/(SNR + 1) (v).

    For eps and v they are at most 1, so the weighted loss is smaller; for eps an enormous gamma is plain L_simple.
    For x_0 they are at most gamma. Checked term by term against the same draws of t and eps.
    """
    schedule = NoiseSchedule.linear()
    x0 = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    zero = lambda x, t, y=None: torch.zeros_like(x)  # noqa: E731
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    plain = diffusion_loss(zero, schedule, x0, prediction_type=prediction_type, generator=g())
    weighted = diffusion_loss(zero, schedule, x0, prediction_type=prediction_type, min_snr_gamma=5.0, generator=g())
    assert weighted.item() > 0
    if prediction_type == "sample":
        assert weighted.item() <= 5.0 * plain.item()
    else:
        assert weighted.item() < plain.item()
    if prediction_type == "epsilon":
        huge = diffusion_loss(zero, schedule, x0, prediction_type="epsilon", min_snr_gamma=1e12, generator=g())
        torch.testing.assert_close(huge, plain)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_importance_sampled_timesteps_estimate_the_same_loss_with_less_variance(prediction_type):
    """With t ~ w/sum(w) and each draw weighted by mean(w), the loss is unbiased for sum_t w(t) L_t / T.

    The predictor outputs t/T everywhere and the data are ones, so (x_0 target) L_t = (1 - t/T)^2 exactly; for a v
    target L_t also has eps in it, and the means are checked against each other. 64 batches of 4,096 draws each.
    """
    schedule = NoiseSchedule.linear()
    ramp = lambda x, t, y=None: (t.float() / 1000)[:, None, None, None].expand_as(x)  # noqa: E731
    x0 = torch.ones(4096, 1, 1, 1)
    weights = loss_weights(schedule, prediction_type, 5.0)
    g = torch.Generator().manual_seed(0)
    draws = {how: torch.stack([diffusion_loss(ramp, schedule, x0, prediction_type=prediction_type, min_snr_gamma=5.0,
                                              timestep_sampling=how, generator=g) for _ in range(64)])
             for how in ("uniform", "importance")}
    means = {how: d.mean().item() for how, d in draws.items()}
    if prediction_type == "sample":
        exact = (weights * (1 - torch.arange(1000) / 1000) ** 2).mean().item()
        assert means["uniform"] == pytest.approx(exact, rel=0.02)
        assert means["importance"] == pytest.approx(exact, rel=0.02)
        assert draws["importance"].std() < 0.7 * draws["uniform"].std()  # (for v, eps's own variance dominates)
    assert means["importance"] == pytest.approx(means["uniform"], rel=0.03)
    with pytest.raises(ValueError, match="timestep_sampling"):
        diffusion_loss(ramp, schedule, x0, timestep_sampling="lognormal")
