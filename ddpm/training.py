"""One optimisation step and its schedules, shared by the single-process loop and the Ray Train workers."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .conditioning import Condition
from .losses import diffusion_loss
from .schedule import NoiseSchedule


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, decay: str = "constant",
          time_spent: float = 0.0) -> float:
    """Linear warm-up over ``warmup_steps``, then constant (DDPM) or cosine decay to 0 at ``total_steps``.

    A run with a time budget as well passes ``time_spent``, the fraction of it used so far: the cosine then runs on
    whichever is further along, steps after the warm-up or time (from the start), and reaches 0 when either runs out,
    even within the warm-up.
    """
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if decay == "constant":
        return base_lr * warm
    if decay == "cosine":
        progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps), time_spent))
        return base_lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr decay {decay!r}; expected 'constant' or 'cosine'")


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions that oneDNN runs convolutions and matmuls on: AMX tiles (Intel Sapphire
    Rapids and later) or AVX512-BF16 (Intel Cooper Lake, AMD Zen 4 and later). On either, a bf16 autocast step is
    faster than fp32 (benchmarks/RESULTS.md, "bf16 on the CPU")."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype to autocast the forward pass to, or None for fp32.

    ``precision`` is "fp32", "bf16" or "auto": bf16 where the hardware runs it faster than fp32, i.e. on CUDA and on
    CPUs with bf16 instructions, fp32 elsewhere. Weights, gradients and the optimizer stay fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
        precision = "bf16" if fast else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image of (B, C, H, W) left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device if generator is None else generator.device)
    flip = (flip < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, x.flip(-1), x)


def drop_labels(y: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label with -1 (the null class) with probability p: trains the unconditional branch for CFG."""
    if p <= 0:
        return y
    drop = torch.rand(y.shape[0], generator=generator, device=y.device if generator is None else generator.device)
    return torch.where((drop < p).to(y.device), torch.full_like(y, -1), y)


def drop_condition(condition: Condition, p: float, generator: torch.Generator | None = None, *,
                   image_p: float | None = None) -> Condition:
    """Replace each row with its null form (``Condition.null``: label -1, the empty caption's encoding that
    ``encode_prompts`` carries as the negative, a zero image embedding) with probability p: caption / label /
    embedding dropout, which trains the unconditional branch of classifier-free guidance. The result has no
    negative.

    ``image_p``: a decoder that reads the caption and the image embedding drops each on its own rows, the image
    embedding with this probability (unCLIP: 10%) and the caption with p (unCLIP: 50%); None: the same rows.
    """
    null = condition.null()
    if p <= 0 and not image_p:
        return Condition(condition.labels, condition.text, condition.pooled, image=condition.image)
    device = next(getattr(condition, f) for f in condition.fields()).device

    def rows_dropped(prob: float) -> torch.Tensor:  # (B,) True = use the null row
        u = torch.rand(len(condition), generator=generator, device=device if generator is None else generator.device)
        return (u < prob).to(device)

    drop = rows_dropped(p)
    drop_image = drop if image_p is None else rows_dropped(image_p)

    def mix(kept: torch.Tensor | None, dropped: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
        if kept is None:
            return None
        return torch.where(rows.reshape(-1, *([1] * (kept.dim() - 1))), dropped.to(kept.device), kept)

    return Condition(mix(condition.labels, null.labels, drop), mix(condition.text, null.text, drop),
                     mix(condition.pooled, null.pooled, drop), image=mix(condition.image, null.image, drop_image))


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: NoiseSchedule,
    x_0: torch.Tensor,
    *,
    lr: float,
    condition: Condition | torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    min_snr_gamma: float | None = None,
    timestep_sampling: str = "uniform",
    grad_clip: float | None = 1.0,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """Loss, backward, clip, step. Returns (loss, gradient norm before clipping).

    condition: what each row of x_0 is conditioned on (a ``Condition``, or (B,) labels); None: unconditional.
    ``model`` may be a DistributedDataParallel wrapper: the backward pass then all-reduces the gradients.
    ``autocast_dtype`` (e.g. torch.bfloat16, see :func:`autocast_dtype`) runs the forward pass under autocast; the
    loss is fp32.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    autocast = (torch.autocast(device_type=x_0.device.type, dtype=autocast_dtype)
                if autocast_dtype is not None else contextlib.nullcontext())
    with autocast:
        loss = diffusion_loss(model, schedule, x_0, condition=condition, prediction_type=prediction_type,
                              min_snr_gamma=min_snr_gamma, timestep_sampling=timestep_sampling)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = grad_clip if grad_clip else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)  # CPUs too (default: GPUs)
    optimizer.step()
    return loss.item(), float(grad_norm)
