"""Inpainting and outpainting with an unconditionally trained model: RePaint (Lugmayr et al. 2022).

The model never sees a mask. The known pixels condition the sample through the reverse process itself: at every
step the known region of x_t is replaced by a forward-process sample of the known image at that noise level,

    x_t  =  m * x_t  +  (1 - m) * q_sample(x_0^known, t, eps),   eps ~ N(0, I) fresh each step,

and the unknown region (m = 1) comes from one step of the sampler, which sees both regions. Given x_0^known, the
known part of x_t ~ q(x_t | x_0) is independent of everything else, so replacing it with a fresh sample is exact;
what replacement alone gets wrong is the *unknown* part: it is steered toward agreement with the known part only
through the model's prediction at each step, and ends up biased toward the prior (a known weakness of plain
replacement, Song et al. 2021 app. I; Lugmayr et al. 2022 sec. 4.2). RePaint's resampling fixes this: after
denoising, go *forward* again j steps with q(x_{t+j} | x_t) and denoise once more, r times in all, so the unknown
region is re-generated while already harmonised with the known one (the test suite measures the bias with and
without it on a 2-pixel Gaussian whose exact conditional is known).

In the score view (:func:`ddpm.sampling.score`, ``grad log p_t(x_t) = -eps_theta(x_t, t) / sqrt(1 - alpha_bar_t)``)
the sampler follows the score of the *joint* marginal p_t(x^known, x^unknown); replacement only pins the
x^known coordinates, so the unknown coordinates follow grad_{x^unknown} log p_t at the pinned values, an
approximation of the conditional score grad log p_t(x^unknown | x_0^known) that resampling improves.

Outpainting is the same operation with the image placed on a larger canvas (:func:`outpaint_canvas`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .conditioning import Condition, as_condition
from .sampling import Callback, Generator, Model, plan, predict, randn, update, watch, x0_eps
from .schedule import NoiseSchedule


# -- the time walk ------------------------------------------------------------------------------------------------
def repaint_walk(num_steps: int, jump_length: int = 1, resample_times: int = 1) -> list[int]:
    """The positions RePaint visits in a list of ``num_steps`` timesteps (its ``get_schedule_jump``, in our indices).

    Position ``k`` is the k-th listed timestep ``t_k`` (0 = the noisiest), ``num_steps`` is clean data. A step
    k -> k + 1 denoises; k -> k - j goes forward with q(x_{t_{k-j}} | x_{t_k}). Jump points are every j-th
    position counted back from the last noisy one (``num_steps - 1``, ``num_steps - 1 - j``, ...), those with
    room to jump (k >= j); each jumps back ``resample_times - 1`` times. With j = 1 this is Algorithm 1 with
    U = r; with r = 1 it is the plain walk 0, 1, ..., num_steps. Denoising steps (model calls):
    ``num_steps + (r - 1) * j * (number of jump points)``, about r * num_steps.
    """
    if jump_length < 1 or resample_times < 1:
        raise ValueError(f"resample_jumps and resample_times must be >= 1, got {jump_length} and {resample_times}")
    jumps_left = {k: resample_times - 1 for k in range(num_steps - 1, jump_length - 1, -jump_length)}
    walk, k = [0], 0
    while k < num_steps:
        k += 1
        walk.append(k)
        if jumps_left.get(k, 0) > 0:
            jumps_left[k] -= 1
            k -= jump_length
            walk.append(k)
    return walk


def model_calls(num_steps: int, jump_length: int = 1, resample_times: int = 1) -> int:
    """The model calls of RePaint's walk (:func:`repaint_walk`), its denoising steps k -> k + 1, counted without
    walking it: num_steps + (r - 1) * j * (number of jump points k = num_steps - 1, num_steps - 1 - j, ... >= j)."""
    if resample_times == 1:
        return num_steps
    return num_steps + (resample_times - 1) * jump_length * len(range(num_steps - 1, jump_length - 1, -jump_length))


# -- masks and canvases -------------------------------------------------------------------------------------------
def check_mask(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mask as float32 on the image's device, after checking it: shape (B, 1, H, W) or (B, C, H, W), values
    0 (keep) and 1 (generate) only, at least one pixel to generate in every image. Raises ValueError otherwise."""
    if image.dim() != 4:
        raise ValueError(f"image must have shape (B, C, H, W), got {tuple(image.shape)}")
    b, c, h, w = image.shape
    if mask.dim() != 4 or mask.shape[0] != b or mask.shape[1] not in (1, c) or mask.shape[2:] != image.shape[2:]:
        raise ValueError(f"mask must have shape ({b}, 1, {h}, {w}) or ({b}, {c}, {h}, {w}) to match the image, "
                         f"got {tuple(mask.shape)}")
    m = mask.to(device=image.device, dtype=torch.float32)
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("mask must be binary: 1 = generate, 0 = keep; found other values")
    empty = (m.flatten(1).amax(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mask of image {empty[0]} is empty (all 0 = keep): nothing to generate")
    return m


def check_pixels(image: torch.Tensor) -> None:
    """Refuse images (B, C, H, W) outside [-1, 1] (1e-3 of slack for rounding): the range of pixels, and so of
    what a pixel model samples. A latent model's scaled latents have unit standard deviation and no such bound,
    which is why :func:`inpaint` itself does not check its input's range (:func:`ddpm.inpaint_images` checks the
    pixels, before a latent model encodes them)."""
    if image.numel() and not -1.0 - 1e-3 <= float(image.min()) <= float(image.max()) <= 1.0 + 1e-3:
        raise ValueError(f"image must be in [-1, 1], got values in [{float(image.min()):.3g}, "
                         f"{float(image.max()):.3g}] (use ddpm.from_uint8 for 0..255 pixels)")


def outpaint_canvas(image: torch.Tensor, canvas_size: int | Sequence[int],
                    offset: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Place ``image`` (B, C, h, w) on a canvas of ``canvas_size`` (S or (H, W)) with its top-left corner at
    ``offset`` = (top, left). Returns (canvas (B, C, H, W), zeros outside the image; mask (B, 1, H, W), 1 outside
    the image = generate, 0 on it = keep), ready for :func:`inpaint`."""
    if image.dim() != 4:
        raise ValueError(f"image must have shape (B, C, H, W), got {tuple(image.shape)}")
    b, c, h, w = image.shape
    H, W = (canvas_size, canvas_size) if isinstance(canvas_size, int) else tuple(canvas_size)
    top, left = offset
    if not (0 <= top and top + h <= H and 0 <= left and left + w <= W):
        raise ValueError(f"an image of {h}x{w} at offset (top={top}, left={left}) does not fit a {H}x{W} canvas")
    canvas = image.new_zeros(b, c, H, W)
    canvas[:, :, top:top + h, left:left + w] = image
    mask = image.new_ones(b, 1, H, W, dtype=torch.float32)
    mask[:, :, top:top + h, left:left + w] = 0
    return canvas, mask


# -- RePaint ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def inpaint(
    model: Model,
    schedule: NoiseSchedule,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    spacing: str = "trailing",
    prediction_type: str = "epsilon",
    condition: Condition | torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    resample_jumps: int = 1,
    resample_times: int = 1,
    strength: float = 1.0,
    clip_x0: bool = False,
    generator: Generator = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Fill the masked region of ``image`` (B, C, H, W) with samples consistent with the rest.

    image: the known x_0 in the space ``model`` samples: pixels in [-1, 1] for a pixel model, scaled latents
    (unbounded, unit standard deviation) for a latent one; its range is not checked here (:func:`check_pixels`
    is the pixels' check, which :func:`ddpm.inpaint_images` applies).

    mask: (B, 1, H, W) or (B, C, H, W), 1 = generate, 0 = keep (see :func:`check_mask`).
    sampler, steps, eta, spacing, prediction_type, condition, guidance_scale, clip_x0: as for
    :func:`ddpm.sampling.sample` ("ddpm", "ddim" or "dpm++"; DPM-Solver++ restarts at first order after each jump,
    since its two-step history does not survive a jump back in time).
    resample_jumps (RePaint's jump length j) and resample_times (RePaint's resampling count r, 1 = plain
    replacement): after reaching every j-th timestep of the list, go forward j timesteps and denoise them again,
    r - 1 times (:func:`repaint_walk`). Cost: about r times the model calls of ``steps``. The paper uses j = 10,
    r = 10 with 250 DDPM steps.
    strength: in (0, 1]; below 1 the walk starts from the image itself, noised by the forward process to the
    plan's ``strength`` share (SDEdit, Meng et al. 2022; :func:`ddpm.sampling.strength_steps`),
    x_{t_0} = sqrt(ab_{t_0}) image + sqrt(1 - ab_{t_0}) z, so the masked region keeps the image's layout and colours
    to a degree that falls as strength rises; 1 starts from pure noise x_T, as generation does. With a mask of
    ones this is SDEdit's editing of the whole image "with new conditions" (a new prompt or class).
    generator: as for ``sample``; with a list, image i draws x_T, the known region's forward noise and every
    sampler and jump noise from ``generator[i]`` alone.
    callback(i, t, x): as for ``sample``, after each model call i (resampling jumps call no model); returning a
    (B,) bool tensor keeps only those rows (``ddpm.sampling.drop_rows``), and the result has only them.

    Returns x_0 (B, C, H, W), float32, whose known pixels are exactly ``image``'s. The update rules are the
    samplers' own (``ddpm.sampling.update``); the model is used as an eps/score predictor
    (:func:`ddpm.sampling.score`) of the joint distribution, never told about the mask.
    """
    generate = check_mask(image, mask).bool()  # (B, 1 or C, H, W), True = generate
    ts, ab = plan(schedule, sampler, steps, spacing, eta, "fixed_small", prediction_type, strength)
    n = len(ts)
    if resample_times > 1 and n == 1:
        raise ValueError("resampling needs at least 2 steps")
    if resample_times > 1 and not 1 <= resample_jumps < n:
        raise ValueError(f"resample_jumps must be in [1, steps - 1] = [1, {n - 1}] to resample, got {resample_jumps}")
    walk = repaint_walk(n, resample_jumps, resample_times)
    alpha_bar = [ab[t] for t in ts] + [1.0]  # alpha_bar at each walk position k = 0 .. n (clean data)
    x0_known = image.float()  # (B, C, H, W)
    device = x0_known.device
    condition = None if condition is None else as_condition(condition).to(device)  # a prompt repaints to it

    # 1. x_T ~ N(0, I); an edit (strength < 1) starts at t_0 from the noised image, q(x_{t_0} | x_0 = image)
    x = randn(x0_known.shape, generator, device)  # (B, C, H, W)
    if strength < 1:
        x = schedule.q_sample(x0_known, torch.full((x.shape[0],), ts[0], device=device), x)
    history = None  # DPM-Solver++'s previous (x_0, lambda)
    calls = 0  # model calls so far

    # RePaint's Algorithm 1 replaces the known region at the output of each step (x_{t-1}); here it is replaced at
    # the input (x_t), which gives the model the same joint distribution (the known part of x_t given x_0^known is
    # independent of the rest) and conditions the first step and the first step after each jump too.
    for k, k_next in zip(walk[:-1], walk[1:]):
        if k_next == k + 1:  # a reverse step t_k -> t_{k+1}
            t = ts[k]
            # 4-5. known region: x_t^known = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, a fresh sample of q(x_t | x_0)
            eps_known = randn(x.shape, generator, device)  # (B, C, H, W)
            x_known = schedule.q_sample(x0_known, torch.full((x.shape[0],), t, device=device), eps_known)
            x = torch.where(generate, x, x_known)
            # 6-8. unknown region: one step of the sampler on the combined x_t (it predicts both regions; the
            #      known part of the result is replaced again before the next step, and pasted back at the end)
            out = predict(model, x, t, condition, guidance_scale)
            x0, eps = x0_eps(out, x, alpha_bar[k], prediction_type, clip_x0)
            x, history = update(sampler, x, x0, eps, alpha_bar[k], alpha_bar[k + 1], final=k + 1 == n, eta=eta,
                               generator=generator, history=history)
            x, x0_known, generate, condition, generator, history = watch(
                callback, calls, t, x, x0_known, generate, condition, generator, history)
            calls += 1
            if x.shape[0] == 0:  # every row left
                break
        else:  # 9-10. resample: go forward t_k -> t_{k_next} (j listed steps back up) in one draw of q(x_t' | x_t):
            #          x_t' = sqrt(ab_t' / ab_t) x_t + sqrt(1 - ab_t' / ab_t) z
            ratio = alpha_bar[k_next] / alpha_bar[k]
            x = math.sqrt(ratio) * x + math.sqrt(1 - ratio) * randn(x.shape, generator, device)
            history = None  # the solver's trajectory restarts here

    # 14. return x_0, with the known pixels exactly the input's
    return torch.where(generate, x, x0_known)
