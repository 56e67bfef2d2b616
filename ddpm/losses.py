"""The training objective: L_simple (Ho et al. 2020, eq. 14) with optional min-SNR-gamma weighting.

Timesteps are drawn uniformly, or by importance: in proportion to their weight w(t), with every draw weighted by
mean_t w(t). Both estimate the same loss, sum_t w(t) L_t / T; importance sampling spends no compute on timesteps the
weighting nearly ignores. With v-prediction and min-SNR-5 on the linear schedule, w(t) averages 0.19 and the 400
noisiest of the 1000 timesteps (w < 0.03) carry 1% of the total weight while taking 40% of uniform draws.
"""

from __future__ import annotations

import torch

from .conditioning import Condition, as_condition
from .schedule import PREDICTION_TYPES, NoiseSchedule

TIMESTEP_SAMPLING = ("uniform", "importance")


def diffusion_loss(
    model,
    schedule: NoiseSchedule,
    x_0: torch.Tensor,
    *,
    condition: Condition | torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    min_snr_gamma: float | None = None,
    timestep_sampling: str = "uniform",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """E_{t ~ U{0..T-1}, eps ~ N(0, I)} w(t) || target - model(x_t, t) ||^2, a scalar.

    x_0: (B, C, H, W) in [-1, 1]; condition: what each row is conditioned on (a ``Condition`` of B rows, or (B,)
    labels), moved to x_0's device. The target is eps, x_0 or v = sqrt(ab) eps - sqrt(1 - ab) x_0.
    min-SNR-gamma (Hang et al. 2023) caps the weight of easy, low-noise steps: in x_0 terms the weight is
    min(SNR, gamma), which is min(SNR, gamma)/SNR for an eps target and min(SNR, gamma)/(SNR + 1) for v.
    Without it, w = 1: plain L_simple in the chosen parameterisation.
    ``timestep_sampling`` "importance" draws t with probability w(t) / sum w and weighs each draw by mean w: the
    same expected loss as "uniform", with less variance (see the module docstring).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    if timestep_sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"unknown timestep_sampling {timestep_sampling!r}; expected one of {TIMESTEP_SAMPLING}")
    b = x_0.shape[0]
    w = loss_weights(schedule, prediction_type, min_snr_gamma)  # (T,) float64
    if timestep_sampling == "importance":
        where = generator.device if generator is not None else x_0.device  # draw where the generator lives
        t = torch.multinomial(w.to(where), b, replacement=True, generator=generator).to(x_0.device)  # t ~ w/sum(w)
        weight = w.mean().expand(b)
    else:
        t = torch.randint(0, schedule.num_timesteps, (b,), device=x_0.device, generator=generator)
        weight = w.to(x_0.device, torch.float32)[t]  # indexed where t is: no device-to-host copy per step
    eps = torch.randn(x_0.shape, device=x_0.device, dtype=x_0.dtype, generator=generator)
    x_t = schedule.q_sample(x_0, t, eps)
    condition = as_condition(condition)
    pred = model(x_t, t) if condition is None else model(x_t, t, condition.to(x_0.device))

    target = {"epsilon": eps, "sample": x_0}.get(prediction_type)
    if target is None:
        target = schedule.v_from(x_0, t, eps)
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, x_0.dim())))  # (B,)
    return (per_sample * weight.to(per_sample.device, torch.float32)).mean()


def loss_weights(schedule: NoiseSchedule, prediction_type: str, min_snr_gamma: float | None) -> torch.Tensor:
    """w(t) for every timestep, (T,) float64: min(SNR, gamma) in x_0 terms (see :func:`diffusion_loss`), or 1."""
    snr = schedule.snr(torch.arange(schedule.num_timesteps))
    if min_snr_gamma is None:
        return torch.ones_like(snr)
    capped = snr.clamp(max=min_snr_gamma)
    return {"epsilon": capped / snr, "sample": capped, "v_prediction": capped / (snr + 1)}[prediction_type]
