"""Edits with new conditions (SDEdit, Meng et al. 2022): ``strength`` in ``ddpm.inpaint`` against closed forms of a
Gaussian prior, the share of the plan it runs, and its identities with plain inpainting and generation.

``POST /edit`` over HTTP is tested in tests/deploy/test_serve.py, ``ddpm edit`` in
tests/pipelines/test_inpaint_command.py, the engine's cost and batching of edits in tests/deploy/test_engine.py.
"""

import math

import pytest
import torch

from tests.ddpm.analytic import GaussianEps
from ddpm import inpaint, strength_steps
from ddpm.sampling import plan
from ddpm.settings import SettingError, check_settings

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def test_strength_runs_the_tail_of_the_plan(schedule):
    """An edit of strength s runs the last round(s x steps) timesteps of the plan (at least one): with trailing
    spacing it starts at t_0 = s T - 1, the forward process's noise level for "s of the way to pure noise"."""
    assert [strength_steps(50, s) for s in (1.0, 0.8, 0.5, 0.01, 1e-9)] == [50, 40, 25, 1, 1]
    full = plan(schedule, "ddim", 50, "trailing", 0.0, "fixed_small", "epsilon")[0]
    for s in (0.8, 0.5, 0.3):
        ts = plan(schedule, "ddim", 50, "trailing", 0.0, "fixed_small", "epsilon", strength=s)[0]
        assert ts == full[-strength_steps(50, s):] and ts[0] == round(s * 1000) - 1
    for bad in (0.0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            strength_steps(50, bad)


# Independent pixels, prior x_0 ~ N(MU, S^2), the image to edit all 0.9. SDEdit noises it to t_0,
# x_{t_0} = sqrt(ab) 0.9 + sqrt(1 - ab) z, and denoises with the exact noise predictor (tests/ddpm/analytic.py), so the
# result's law is closed-form, with D = ab S^2 + 1 - ab the variance of x_{t_0} under the prior:
#   deterministic DDIM (the probability-flow ODE, an affine map for Gaussian data):
#       x_0 = MU + S (x_{t_0} - sqrt(ab) MU) / sqrt(D):  mean MU + S sqrt(ab / D) (0.9 - MU),  std S sqrt((1 - ab) / D)
#   ancestral DDPM (the reverse process, which samples p(x_0 | x_{t_0})):
#       mean MU + ab S^2 / D (0.9 - MU),  variance S^2 (1 - ab) / D + ab S^4 (1 - ab) / D^2
# At 1000 steps both are exact up to sampling noise. Tolerance: 5 standard errors of the mean and the standard
# deviation over n = 32,000 values, plus 0.005 for the discretisation. A start at the wrong noise level moves the mean:
# strength 0.5 starts at t_0 = 499 (ab = 0.079); starting 50 timesteps too early (t_0 = 449, ab = 0.127) moved it by
# 0.026-0.043 in three of these four cases, against tolerances of 0.016-0.019.
MU, S, X_IN, N = 0.3, 0.5, 0.9, 2000


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("strength", [0.5, 0.2])
def test_sdedit_of_a_gaussian_prior_matches_the_closed_form(schedule, sampler, strength):
    ts = plan(schedule, sampler, 1000, "trailing", 0.0, "fixed_small", "epsilon", strength)[0]
    ab = float(schedule.alphas_cumprod[ts[0]])
    d = ab * S**2 + 1 - ab
    if sampler == "ddim":
        mean, std = MU + S * math.sqrt(ab / d) * (X_IN - MU), S * math.sqrt((1 - ab) / d)
    else:
        mean = MU + ab * S**2 / d * (X_IN - MU)
        std = math.sqrt(S**2 * (1 - ab) / d + ab * S**4 * (1 - ab) / d**2)
    out = inpaint(GaussianEps(schedule, MU, S), schedule, torch.full((N, 1, 4, 4), X_IN), torch.ones(N, 1, 4, 4),
                  sampler=sampler, steps=1000, strength=strength, generator=torch.Generator().manual_seed(0))
    n = out.numel()
    assert abs(out.mean().item() - mean) < 5 * std / math.sqrt(n) + 0.005, (out.mean().item(), mean)
    assert abs(out.std().item() - std) < 5 * std / math.sqrt(2 * n) + 0.005, (out.std().item(), std)


def test_strength_one_is_generation_and_less_keeps_the_image(tiny, schedule):
    """Strength 1 starts from pure noise, so the image does not matter (an all-ones mask is then plain sampling,
    tests/ddpm/test_inpaint.py); below 1 it does, and the result stays nearer the image the lower the strength.
    The sampler makes round(strength x steps) model calls."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1, torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    ones = torch.ones(2, 1, 8, 8)

    def edit(image, strength):
        calls = []
        out = inpaint(tiny, schedule, image, ones, sampler="ddim", steps=20, strength=strength,
                      condition=torch.tensor([0, 1]), generator=torch.Generator().manual_seed(7),
                      callback=lambda i, t, x: calls.append(t))
        assert len(calls) == strength_steps(20, strength)
        return out

    assert torch.equal(edit(a, 1.0), edit(b, 1.0))
    assert not torch.equal(edit(a, 0.6), edit(b, 0.6))
    distance = [(edit(a, s) - a).abs().mean().item() for s in (0.1, 0.4, 0.8)]
    assert distance[0] < distance[1] < distance[2], distance


def test_a_masked_edit_keeps_the_rest_exactly(tiny, schedule):
    g = torch.Generator().manual_seed(2)
    image = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 4:] = 1
    out = inpaint(tiny, schedule, image, mask, sampler="ddpm", steps=10, strength=0.5, resample_jumps=2,
                  resample_times=2, generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    assert torch.equal(out[..., :4], image[..., :4]) and not torch.equal(out[..., 4:], image[..., 4:])


def test_the_settings_rules_refuse_a_bad_strength():
    for bad in (0, 0.0, -1, 1.01, float("inf"), "0.5", True):
        with pytest.raises(SettingError) as exc:
            check_settings(strength=bad)
        assert exc.value.field == "strength"
    check_settings(strength=1)
    # resampling jumps back within the steps the edit runs: 10 steps at strength 0.5 run 5, so j <= 4
    check_settings(steps=10, strength=0.5, resample_jumps=4, resample_times=2)
    with pytest.raises(SettingError, match=r"the steps the edit runs - 1\] = \[1, 4\]"):
        check_settings(steps=10, strength=0.5, resample_jumps=5, resample_times=2)
