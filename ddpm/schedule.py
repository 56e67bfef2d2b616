"""Noise schedules and the forward process q(x_t | x_0) (Ho et al. 2020, section 2).

Timesteps are 0-indexed: ``t = 0 .. T-1``, where ``t = 0`` is the least noisy step. Every table is computed in
float64 once, then gathered and cast to the data's dtype at use, so fp32/bf16 training never integrates rounding
error into ``alpha_bar``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """DDPM's schedule: beta_t evenly spaced from beta_start to beta_end. Shape (T,), float64."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2).

    beta_t = 1 - alpha_bar(t+1)/alpha_bar(t), capped at ``max_beta`` to avoid the singularity at t = T.
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so that alpha_bar_{T-1} = 0 exactly.

    The first step keeps its value; the last step becomes pure noise, so training sees what sampling starts from.
    With alpha_bar_{T-1} = 0, eps-prediction cannot recover x_0 at the last step: pair it with v-prediction.
    """
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def _gather(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] reshaped to broadcast over ``like``: (B,) -> (B, 1, 1, 1), in like's dtype and device."""
    out = table.to(like.device)[t.to(like.device)].to(like.dtype)
    return out.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A fixed forward process, defined by its betas. All tensors have shape (T,) and dtype float64.

    Build one with :meth:`linear` or :meth:`cosine`; :meth:`to_config`/:meth:`from_config` round-trip through JSON.
    """

    betas: torch.Tensor
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        betas = self.betas.to(torch.float64)
        if betas.dim() != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        object.__setattr__(self, "betas", betas)
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, beta_tilde)   (DDPM eqs. 6-7)
        beta_tilde = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        tables = {
            "alphas": alphas,
            "alphas_cumprod": alpha_bar,
            "alphas_cumprod_prev": alpha_bar_prev,
            "posterior_variance": beta_tilde,
            # beta_tilde_0 = 0, so the log is clipped to beta_tilde_1 at t = 0 (as in the paper's code).
            "posterior_log_variance_clipped": torch.log(torch.cat([beta_tilde[1:2], beta_tilde[1:]])),
            "posterior_mean_coef1": betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),
            "posterior_mean_coef2": (1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar),
        }
        for name, value in tables.items():
            object.__setattr__(self, name, value)

    # -- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               zero_terminal_snr: bool = False) -> "NoiseSchedule":
        betas = linear_betas(num_timesteps, beta_start, beta_end)
        config = dict(kind="linear", num_timesteps=num_timesteps, beta_start=beta_start, beta_end=beta_end,
                      zero_terminal_snr=zero_terminal_snr)
        return cls(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas, config)

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999,
               zero_terminal_snr: bool = False) -> "NoiseSchedule":
        betas = cosine_betas(num_timesteps, s, max_beta)
        config = dict(kind="cosine", num_timesteps=num_timesteps, s=s, max_beta=max_beta,
                      zero_terminal_snr=zero_terminal_snr)
        return cls(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas, config)

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        config = dict(config)
        kind = config.pop("kind", None)
        if kind not in ("linear", "cosine"):
            raise ValueError(f"unknown schedule kind {kind!r}; expected 'linear' or 'cosine'")
        return getattr(cls, kind)(**config)

    def to_config(self) -> dict:
        return dict(self.config)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), float64, shape of t."""
        ab = self.alphas_cumprod[t]
        return ab / (1 - ab)

    # -- forward process ----------------------------------------------------------------------------------------
    def q_sample(self, x_0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (DDPM eq. 4). x_0, eps: (B, ...); t: (B,)."""
        ab = _gather(self.alphas_cumprod, t, x_0)
        return ab.sqrt() * x_0 + (1 - ab).sqrt() * eps

    # -- conversions between parameterisations (x_t is always known) --------------------------------------------
    def x0_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
        ab = _gather(self.alphas_cumprod, t, x_t)
        return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()

    def eps_from_x0(self, x_t, t, x_0):
        """eps = (x_t - sqrt(alpha_bar) x_0) / sqrt(1 - alpha_bar)."""
        ab = _gather(self.alphas_cumprod, t, x_t)
        return (x_t - ab.sqrt() * x_0) / (1 - ab).sqrt()

    def v_from(self, x_0, t, eps):
        """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0   (Salimans & Ho 2022)."""
        ab = _gather(self.alphas_cumprod, t, x_0)
        return ab.sqrt() * eps - (1 - ab).sqrt() * x_0

    def x0_from_v(self, x_t, t, v):
        """x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."""
        ab = _gather(self.alphas_cumprod, t, x_t)
        return ab.sqrt() * x_t - (1 - ab).sqrt() * v

    def eps_from_v(self, x_t, t, v):
        """eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v."""
        ab = _gather(self.alphas_cumprod, t, x_t)
        return (1 - ab).sqrt() * x_t + ab.sqrt() * v

    def to_x0_eps(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str):
        """A model's output in any parameterisation -> (x_0, eps)."""
        if prediction_type == "epsilon":
            return self.x0_from_eps(x_t, t, prediction), prediction
        if prediction_type == "sample":
            return prediction, self.eps_from_x0(x_t, t, prediction)
        if prediction_type == "v_prediction":
            return self.x0_from_v(x_t, t, prediction), self.eps_from_v(x_t, t, prediction)
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
