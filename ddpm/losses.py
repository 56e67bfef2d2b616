"""The training objective: L_simple (Ho et al. 2020, eq. 14) with optional min-SNR-gamma weighting."""

from __future__ import annotations

import torch

from .schedule import PREDICTION_TYPES, NoiseSchedule


def diffusion_loss(
    model,
    schedule: NoiseSchedule,
    x_0: torch.Tensor,
    *,
    class_labels: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    min_snr_gamma: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """E_{t ~ U{0..T-1}, eps ~ N(0, I)} w(t) || target - model(x_t, t) ||^2, a scalar.

    x_0: (B, C, H, W) in [-1, 1]. The target is eps, x_0 or v = sqrt(ab) eps - sqrt(1 - ab) x_0.
    min-SNR-gamma (Hang et al. 2023) caps the weight of easy, low-noise steps: in x_0 terms the weight is
    min(SNR, gamma), which is min(SNR, gamma)/SNR for an eps target and min(SNR, gamma)/(SNR + 1) for v.
    Without it, w = 1: plain L_simple in the chosen parameterisation.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    b = x_0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (b,), device=x_0.device, generator=generator)
    eps = torch.randn(x_0.shape, device=x_0.device, dtype=x_0.dtype, generator=generator)
    x_t = schedule.q_sample(x_0, t, eps)
    pred = model(x_t, t) if class_labels is None else model(x_t, t, class_labels)

    target = {"epsilon": eps, "sample": x_0}.get(prediction_type)
    if target is None:
        target = schedule.v_from(x_0, t, eps)
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, x_0.dim())))  # (B,)

    if min_snr_gamma is not None:
        snr = schedule.snr(t.cpu()).to(x_0.device)
        capped = snr.clamp(max=min_snr_gamma)
        weight = {"epsilon": capped / snr, "sample": capped, "v_prediction": capped / (snr + 1)}[prediction_type]
        per_sample = per_sample * weight.float()
    return per_sample.mean()
