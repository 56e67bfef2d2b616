"""Samplers: pure functions of (model, schedule, x_T, settings, generator). No hidden state.

All three share one skeleton: walk a descending list of timesteps ``t_0 > t_1 > ... > t_{N-1}``, at each ``t_i``
turn the model's output into (x_0, eps), then step to the *next timestep in the list* (or to clean data after the
last one, where alpha_bar_prev = 1). The previous timestep always comes from the list, never from ``t - T // N``,
so non-uniform spacings are exact. Each sampler's update lives in one place, ``update``, which inpainting
(:mod:`ddpm.inpainting`) shares.

Randomness: ``generator`` is one ``torch.Generator`` for the whole batch, or a list of generators, one per image.
With a list, image ``i`` draws its starting noise and every step's noise from ``generator[i]`` alone, so an image
depends only on its own seed and settings, never on what else shared its batch (see :func:`noise_from_seeds`).

Watching and dropping rows: ``callback(i, t, x)`` runs after every model call. It may return a (B,) bool tensor
of the rows to keep; the others leave the batch there (:func:`drop_rows`: a request whose client went away stops
costing network rows), and the result holds the kept rows only. Per-image generators make that safe: a kept row draws
the same noise as before, and a fixed-shape forward (``ddpm.fixed_size_forward``) gives it the same network output.

Score view (Song et al. 2021; DDPM section 3.2): a noise predictor is a scaled score,
``grad_x log p_t(x_t) = -eps_theta(x_t, t) / sqrt(1 - alpha_bar_t)`` (:func:`score`).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .conditioning import Condition, as_condition, guided
from .schedule import NoiseSchedule

Model = Callable[..., torch.Tensor]
Generator = torch.Generator | Sequence[torch.Generator] | None
# callback(i, t, x) after model call i (0-based) at timestep t, x (B, ...) the batch after it: None, or a (B,) bool
# tensor of the rows to keep (module docstring).
Callback = Callable[[int, int, torch.Tensor], "torch.Tensor | None"]
SAMPLERS = ("ddpm", "ddim", "dpm++")
SPACINGS = ("trailing", "linspace", "leading")
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, "dpm++": 20}


# -- timesteps and noise ------------------------------------------------------------------------------------------
def timesteps(num_timesteps: int, steps: int, spacing: str = "trailing") -> list[int]:
    """``steps`` distinct timesteps in descending order, chosen by ``spacing`` (Lin et al. 2023, table 2).

    trailing: T-1, ..., ending near T/N - 1 (always starts at the noisiest step, the default);
    linspace: evenly spaced from T-1 down to 0; leading: multiples of T//N from the bottom (DDIM's original).
    """
    T = num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if spacing == "trailing":
        ts = [round(T - i * T / steps) - 1 for i in range(steps)]
    elif spacing == "linspace":
        ts = [round((T - 1) * (steps - 1 - i) / max(steps - 1, 1)) for i in range(steps)]
    elif spacing == "leading":
        ts = [(steps - 1 - i) * (T // steps) for i in range(steps)]
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    return ts


def strength_steps(steps: int, strength: float) -> int:
    """How many of a ``steps``-step plan an edit of ``strength`` in (0, 1] runs: round(strength x steps), at least 1.

    SDEdit (Meng et al. 2022): noise the image to t_0 ~ strength x T with the forward process and denoise from
    there. On a plan t_0 > ... > t_{N-1} it runs the last ``strength_steps`` timesteps (diffusers' img2img does the
    same), so ``steps`` keeps its meaning, "the spacing of the whole plan", and an edit costs that share of it."""
    if isinstance(strength, bool) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return max(1, round(steps * strength))


def randn(shape: Sequence[int], generator: Generator, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...); with a list of generators, row i comes from generator i."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.stack(rows).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


def noise_from_seeds(seeds: Sequence[int], shape: Sequence[int], device="cpu"):
    """x_T (len(seeds), *shape) and one CPU generator per seed, to pass on as ``sample(..., generator=...)``.

    Generators live on the CPU so a seed gives the same image on any device.
    """
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return randn((len(seeds), *shape), generators, device), generators


def drop_rows(keep: torch.Tensor, *state):
    """Each item of ``state`` with only the rows where ``keep`` (B,) is True: tensors and ``Condition`` rows by index,
    a list of per-row generators by position, a tuple item by item (DPM-Solver++'s history), None and floats as
    they are. One shared generator cannot drop rows: the kept rows' later noise would change."""
    index = torch.nonzero(keep.cpu()).flatten()  # (B',) the kept rows, in order

    def pick(item):
        if item is None or isinstance(item, float):
            return item
        if isinstance(item, torch.Tensor):
            return item[index.to(item.device)]
        if isinstance(item, Condition):
            return item.select(index)
        if isinstance(item, tuple):
            return tuple(pick(part) for part in item)
        if isinstance(item, list):
            return [item[i] for i in index.tolist()]
        raise ValueError("rows can leave a batch only when each row has its own generator (ddpm.noise_from_seeds); "
                         f"got {type(item).__name__}")

    return tuple(pick(item) for item in state)


def watch(callback: Callback | None, i: int, t: int, x: torch.Tensor, *state):
    """Call ``callback(i, t, x)``; when it asks for fewer rows, return ``x`` and ``state`` with those rows only
    (:func:`drop_rows`), else as they were."""
    keep = None if callback is None else callback(i, t, x)
    if keep is None or bool(keep.all()):
        return (x, *state)
    return drop_rows(keep, x, *state)


# -- the model, with guidance -------------------------------------------------------------------------------------
# guided(condition, w), the one rule for "this request runs classifier-free guidance", lives in ddpm.conditioning;
# it is imported here, where it is used, and re-exported from here by ddpm.settings.


def predict(model: Model, x: torch.Tensor, t: int, condition: Condition | torch.Tensor | None,
            guidance_scale: float) -> torch.Tensor:
    """The model's output at timestep t for the batch x (B, C, H, W), with classifier-free guidance.

    condition: a ``Condition`` of B rows (a (B,) label tensor is short for one with labels), or None.
    Guidance (Ho & Salimans 2022): out = out_neg + w (out_cond - out_neg), where the negative is the condition's
    null form (``Condition.null``: label -1, or the empty / negative prompt); w = 1 is the plain conditional model.
    Both branches run as one batch of 2B.
    """
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    condition = as_condition(condition)
    if condition is None:
        return model(x, tt).float()
    c = condition.to(x.device)
    if not guided(c, guidance_scale):
        return model(x, tt, c).float()
    both = model(torch.cat([x, x]), torch.cat([tt, tt]), Condition.cat([c, c.null()])).float()
    cond, neg = both.chunk(2)
    return neg + guidance_scale * (cond - neg)


def x0_eps(out: torch.Tensor, x: torch.Tensor, ab: float, prediction_type: str, clip_x0: bool):
    """(x_0, eps) from the model's output at a step with alpha_bar = ``ab`` (one timestep for the whole batch).

    The coefficients are Python floats, so a step costs no device-side table lookups or host-device syncs.
    Clipping x_0 to [-1, 1] recomputes eps from it, so both stay consistent.
    """
    a, s = math.sqrt(ab), math.sqrt(1 - ab)
    if prediction_type == "epsilon":
        x0, eps = (x - s * out) / a, out
    elif prediction_type == "sample":
        x0, eps = out, (x - a * out) / s
    elif prediction_type == "v_prediction":
        x0, eps = a * x - s * out, s * x + a * out
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, sample or v_prediction")
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (x - a * x0) / s
    return x0, eps


def score(model: Model, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor,
          condition: Condition | torch.Tensor | None = None) -> torch.Tensor:
    """grad_x log p_t(x_t) = -eps_theta(x_t, t) / sqrt(1 - alpha_bar_t), for an eps-prediction model."""
    eps = model(x_t, t) if condition is None else model(x_t, t, condition)
    sigma = (1 - schedule.alphas_cumprod.to(x_t.device)[t]).sqrt().to(eps.dtype)
    return -eps / sigma.reshape(-1, *([1] * (eps.dim() - 1)))


# -- the three samplers: one update each, one shared loop ---------------------------------------------------------
def _lambda(ab: float) -> float:
    """DPM-Solver's half log-SNR, lambda = log(alpha / sigma) with alpha = sqrt(ab), sigma = sqrt(1 - ab)."""
    return 0.5 * (math.log(ab) - math.log1p(-ab)) if ab > 0 else -math.inf


def update(sampler: str, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, ab_t: float, ab_prev: float, *,
          final: bool, eta: float = 0.0, variance: str = "fixed_small", generator: Generator = None,
          history: tuple | None = None) -> tuple[torch.Tensor, tuple | None]:
    """One update of ``sampler`` from x_t (alpha_bar = ab_t) to the next listed timestep (alpha_bar = ab_prev).

    x, x0, eps: (B, C, H, W), the current x_t and the model's (x_0, eps) at it. ``final``: the step to clean data
    (ab_prev = 1, no noise added). ``history``: DPM-Solver++'s (x_0, lambda) from the previous step, None at the
    first step (or after anything that breaks the trajectory, e.g. a RePaint jump: the update is then first order).
    Returns (x_prev, history for the next step). :func:`sample` and :func:`ddpm.inpainting.inpaint` both step here.
    """
    if sampler == "ddpm":
        # Posterior q(x_prev | x_t, x_0) of the (possibly respaced) chain, beta' = 1 - ab_t / ab_prev:
        #   mean = sqrt(ab_prev) beta' / (1 - ab_t) x_0 + sqrt(1 - beta') (1 - ab_prev) / (1 - ab_t) x_t
        beta = 1 - ab_t / ab_prev
        mean = (math.sqrt(ab_prev) * beta / (1 - ab_t)) * x0 + (
            math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)) * x
        var = beta * (1 - ab_prev) / (1 - ab_t) if variance == "fixed_small" else beta
        return (mean if final else mean + math.sqrt(var) * randn(x.shape, generator, x.device)), None

    if sampler == "ddim":
        # DDIM eq. 12: x_prev = sqrt(ab_prev) x_0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z,
        #   sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn(x.shape, generator, x.device)
        return x, None

    # dpm++: DPM-Solver++(2M), data prediction, in lambda = log(alpha / sigma), alpha = sqrt(ab), sigma = sqrt(1 - ab).
    lam = _lambda(ab_t)
    if final:
        return x0, (x0, lam)  # the last step goes to sigma = 0: first order lands exactly on the predicted x_0
    h = _lambda(ab_prev) - lam
    d = x0
    if history is not None and math.isfinite(history[1]) and math.isfinite(h):
        x0_prev, lambda_prev = history
        r = (lam - lambda_prev) / h  # ratio of the previous step size to this one
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    # x_next = (sigma_next / sigma_t) x_t - alpha_next (e^{-h} - 1) D
    sigma_ratio = math.sqrt((1 - ab_prev) / (1 - ab_t))
    exp_neg_h = math.exp(-h) if math.isfinite(h) else 0.0
    return sigma_ratio * x + math.sqrt(ab_prev) * (1 - exp_neg_h) * d, (x0, lam)


def plan(schedule: NoiseSchedule, sampler: str, steps: int | None, spacing: str, eta: float, variance: str,
          prediction_type: str, strength: float = 1.0) -> tuple[list[int], list[float]]:
    """Validate the shared settings; return the timesteps (descending) and alpha_bar as Python floats (float64).
    strength < 1 (an edit): only the last :func:`strength_steps` of the timesteps."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if not 0 <= eta <= 1:  # beyond 1, sigma^2 can exceed 1 - ab_prev and the eps term's sqrt has nothing left
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"unknown variance {variance!r}; expected 'fixed_small' or 'fixed_large'")
    ts = timesteps(schedule.num_timesteps, DEFAULT_STEPS[sampler] if steps is None else steps, spacing)
    ts = ts[len(ts) - strength_steps(len(ts), strength):]
    ab = schedule.alphas_cumprod.tolist()  # python floats in float64: step coefficients are exact scalars
    if ab[ts[0]] == 0.0 and prediction_type == "epsilon":
        raise ValueError("alpha_bar = 0 at the first step (zero terminal SNR): x_0 cannot be recovered from an "
                         "eps prediction there; train with prediction_type 'v_prediction' or 'sample'")
    return ts, ab


@torch.no_grad()
def sample(
    model: Model,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    spacing: str = "trailing",
    variance: str = "fixed_small",
    prediction_type: str = "epsilon",
    condition: Condition | torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    clip_x0: bool = False,
    generator: Generator = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Denoise x_T (B, C, H, W) into x_0 (B, C, H, W), float32, roughly in [-1, 1].

    sampler: "ddpm" (ancestral; ``variance`` "fixed_small" = beta_tilde or "fixed_large" = beta; with fewer than T
    steps, the respaced process of Nichol & Dhariwal 2021), "ddim" (Song et al. 2021, ``eta`` in [0, 1]; eta = 0 is
    deterministic), "dpm++" (DPM-Solver++(2M), Lu et al. 2022, deterministic, 10-25 steps).
    steps defaults to 1000 / 50 / 20. ``callback(i, t, x)`` is called after each step (progress, streaming); when it
    returns a (B,) bool tensor, only those rows go on, and the result has only them (module docstring).
    condition: what each of the B images is conditioned on (``ddpm.conditioning.Condition``, row-aligned with
    x_T; a (B,) label tensor is short for class labels), guided with ``guidance_scale`` w (:func:`predict`).
    """
    ts, ab = plan(schedule, sampler, steps, spacing, eta, variance, prediction_type)
    x = x_T.float()
    condition = None if condition is None else as_condition(condition).to(x.device)
    history = None  # DPM-Solver++'s previous (x_0, lambda)

    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        ab_t, ab_prev = ab[t], (ab[t_prev] if t_prev >= 0 else 1.0)
        out = predict(model, x, t, condition, guidance_scale)
        x0, eps = x0_eps(out, x, ab_t, prediction_type, clip_x0)
        x, history = update(sampler, x, x0, eps, ab_t, ab_prev, final=t_prev < 0, eta=eta, variance=variance,
                           generator=generator, history=history)
        x, condition, generator, history = watch(callback, i, t, x, condition, generator, history)
        if x.shape[0] == 0:  # every row left
            break
    return x
