"""One path from seeds to images: per-image noise, the sampler (or RePaint), uint8 pixels.

Every way of getting images out of a model calls :func:`generate_images` (or :func:`inpaint_images` for edits):
``ddpm generate``, the MLflow pyfunc model, ``ddpm evaluate``'s samples, the training run's sample grids,
``ddpm inpaint`` and the Serve endpoint (``deploy.engine``). So a seed gives the same pixels on every path.

Two rules make an image depend only on its seed and settings, never on which images shared its batch:

- **Noise.** Image i draws its x_T and every step's noise from its own CPU generator, seeded with its own seed
  (:func:`ddpm.sampling.noise_from_seeds`). A request for ``num_images`` from ``seed`` names its images by
  :func:`image_seeds`: ``(seed + i) mod 2^32`` (what the HTTP API documents).
- **Kernels.** CPU (oneDNN, MKL) and GPU libraries pick different algorithms for different batch sizes, so the same
  row computed in a batch of 1 and in a batch of 5 can differ in its last bits, and once in a while in a pixel.
  :func:`fixed_size_forward` runs the network on exactly ``forward_rows`` rows at a time, padding the last chunk;
  at one fixed shape a row's result does not depend on the other rows. ``forward_rows`` is therefore a setting
  like the sampler: two paths give the same bytes at the same ``forward_rows`` (the endpoint's ``micro_batch``).
  A prompt's token states obey the same rule (``ddpm.conditioning.encode_prompts`` encodes a fixed number of
  prompts per call), so an image from a prompt does not depend on the other prompts of its batch either.

A latent model (``loaded.autoencoder`` set) samples latents the same way and decodes them here, also ``forward_rows``
at a time, so every path above gets pixels, and an image still depends on its seed alone. Inpainting a latent model
encodes the known image, generates the latent cells that touch the mask (the mask max-pooled by f), decodes, and
pastes the kept pixels back exactly.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import LoadedModel
from .conditioning import Condition, as_condition, with_image
from .images import to_uint8
from .inpainting import check_mask, check_pixels, inpaint, model_calls
from .prior import DiffusionPrior, normalize
from .sampling import Model, noise_from_seeds, plan, sample
from .schedule import NoiseSchedule

SEED_MODULUS = 2**32
# Rows per network call unless a caller says otherwise: the endpoint's default micro_batch, so that by default every
# path returns the same bytes (module docstring). Bulk jobs on a GPU pass more (benchmarks/RESULTS.md, 'Forward rows').
FORWARD_ROWS = 16

Progress = Callable[[int], None]  # called with the number of images finished so far
# watch(done, calls, rows) after each model call: ``done`` of ``calls`` model calls made, ``rows`` the indices (into
# the seeds) of the images still sampling. It returns None to go on, or one bool per row: False takes that image out
# of the batch from the next call on (a cancelled request; ``ddpm.sampling.drop_rows``), and its image comes back
# all zeros. The images that stay are unchanged, byte for byte: their noise is their own and the forward is fixed.
Watch = Callable[[int, int, list[int]], "Sequence[bool] | None"]


def image_seeds(seed: int, count: int) -> list[int]:
    """The seeds of ``count`` images asked for from ``seed``: image i's is ``(seed + i) mod 2^32``."""
    return [(seed + i) % SEED_MODULUS for i in range(count)]


def fixed_size_forward(model: Model, size: int) -> Model:
    """``model`` as a callable that always runs exactly ``size`` rows at a time, padding the last chunk.

    This is what makes batching invisible in the output (see the module docstring): with the shape fixed, each row
    goes through the same kernels whatever the other rows are, so it comes out bit-identical.
    """
    if size < 1:
        raise ValueError(f"forward rows must be at least 1, got {size}")

    def forward(x: torch.Tensor, t: torch.Tensor, cond: Condition | torch.Tensor | None = None) -> torch.Tensor:
        cond = as_condition(cond)
        outputs = []
        for start in range(0, x.shape[0], size):
            n = min(size, x.shape[0] - start)
            # Fresh, padded buffers every time: same shape, same strides, same alignment for every chunk.
            xs = x.new_zeros((size, *x.shape[1:]))  # (size, C, H, W)
            xs[:n] = x[start:start + n]
            ts = t[start:start + 1].repeat(size)  # padding rows take a real timestep, read without a host sync
            ts[:n] = t[start:start + n]
            if cond is None:
                out = model(xs, ts)
            else:  # padding rows take the null class and zero text (Condition.pad_to), in fresh buffers too
                out = model(xs, ts, cond.select(slice(start, start + n)).pad_to(size))
            outputs.append(out[:n])
        return torch.cat(outputs)

    return forward


def in_fixed_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                    rows: int | None) -> torch.Tensor:
    """``fn`` over (N, ...) ``x`` in chunks of exactly ``rows`` rows, the last one zero-padded (None: one call).

    The autoencoder's counterpart of :func:`fixed_size_forward`: a row's output does not depend on the others."""
    if rows is None:
        return fn(x)
    outputs = []
    for start in range(0, x.shape[0], rows):
        n = min(rows, x.shape[0] - start)
        xs = x.new_zeros((rows, *x.shape[1:]))
        xs[:n] = x[start:start + n]
        outputs.append(fn(xs)[:n])
    return torch.cat(outputs) if outputs else fn(x)


def _to_pixels(loaded: LoadedModel, x_0: torch.Tensor, rows: int | None) -> torch.Tensor:
    """The sampler's output as images in about [-1, 1]: itself, or a latent model's latents decoded."""
    if loaded.autoencoder is None:
        return x_0
    return in_fixed_chunks(loaded.autoencoder.decode, x_0.to(next(loaded.autoencoder.parameters()).dtype), rows)


def _device_of(loaded: LoadedModel) -> torch.device:
    return next(loaded.model.parameters()).device


def _autocast(device: torch.device):
    """bf16 autocast on a GPU (what the endpoint serves with); full fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sampler_callback(watch: Watch | None, loaded: LoadedModel, rows: list[int], sampler: str, steps: int | None,
                      eta: float, resample_jumps: int = 1, resample_times: int = 1, strength: float = 1.0):
    """``watch`` as the samplers' ``callback(i, t, x)``, keeping track of which of ``rows`` are still sampling; the
    model calls it reports out of are counted from the sampler's plan (and RePaint's walk).
    Returns (callback or None, a function that gives the rows left)."""
    if watch is None:
        return None, lambda: rows
    ts = plan(loaded.schedule, sampler, steps, "trailing", eta, "fixed_small", loaded.prediction_type, strength)[0]
    calls = model_calls(len(ts), resample_jumps, resample_times)
    alive = list(rows)

    def callback(i: int, t: int, x: torch.Tensor) -> torch.Tensor | None:
        keep = watch(i + 1, calls, list(alive))
        if keep is None or all(keep):
            return None
        alive[:] = [row for row, k in zip(alive, keep) if k]
        return torch.tensor([bool(k) for k in keep])

    return callback, lambda: alive


def _scatter(loaded: LoadedModel, x_0: torch.Tensor, rows: list[int], count: int, offset: int = 0) -> np.ndarray:
    """(count, H, W, C) uint8: the images ``x_0`` (len(rows), C, H, W) at positions ``rows`` - ``offset``, zeros
    elsewhere (the images a watch dropped)."""
    if len(rows) == count:
        return to_uint8(x_0)
    c, h, w = loaded.image_shape  # the images', decoded
    out = np.zeros((count, h, w, c), dtype=np.uint8)
    if rows:
        out[[r - offset for r in rows]] = to_uint8(x_0)
    return out


def _condition(condition: Condition | torch.Tensor | None, count: int) -> Condition | None:
    """The request's condition, checked to have one row per seed."""
    condition = as_condition(condition)
    if condition is not None and len(condition) != count:
        raise ValueError(f"got a condition of {len(condition)} rows for {count} seeds")
    return condition


@torch.no_grad()
def sample_embeddings(prior: DiffusionPrior, schedule: NoiseSchedule, condition: Condition, seeds: Sequence[int], *,
                      sampler: str = "ddim", steps: int | None = None, eta: float = 0.0, guidance_scale: float = 1.0,
                      forward_rows: int | None = FORWARD_ROWS) -> torch.Tensor:
    """Unit-norm image embeddings (len(seeds), E) for ``condition`` (one caption per seed), embedding i drawn from
    ``seeds[i]`` alone and the network run ``forward_rows`` rows at a time: the seed rules of
    ``ddpm.generate_images``, so an embedding never depends on the others sampled beside it (unCLIP's prior,
    ``ddpm.prior``)."""
    if len(condition) != len(seeds):
        raise ValueError(f"got a condition of {len(condition)} rows for {len(seeds)} seeds")
    device = next(prior.parameters()).device
    x_T, generators = noise_from_seeds([int(s) % SEED_MODULUS for s in seeds], (prior.config.embed_dim,), device)
    forward = prior if forward_rows is None else fixed_size_forward(prior, forward_rows)
    x_0 = sample(forward, schedule, x_T, sampler=sampler, steps=steps, eta=eta, prediction_type="sample",
                 condition=condition.to(device), guidance_scale=guidance_scale, generator=generators)  # (B, E)
    return normalize(x_0)


def prior_seeds(seeds: Sequence[int]) -> list[int]:
    """The seeds the prior draws image i's embedding from: ``(seeds[i] + 2^31) mod 2^32``, so that its noise is
    not the first E numbers of the decoder's noise for the same image."""
    return [(int(s) + SEED_MODULUS // 2) % SEED_MODULUS for s in seeds]


def unclip_condition(loaded: LoadedModel, condition: Condition | None, seeds: Sequence[int], *,
                     prior_steps: int | None = None, prior_guidance_scale: float | None = None) -> Condition | None:
    """A whole unCLIP model's decoder condition: the prompt's text condition (``loaded.condition``) through the prior,
    image i's embedding sampled from :func:`prior_seeds` (DDIM, ``prior_steps``, guided with
    ``prior_guidance_scale``; defaults ``ddpm.settings.PRIOR_*``), with the text kept when the decoder reads it.
    Anything else (a model without a prior, an image condition already) is returned as it is."""
    if loaded.prior is None or condition is None or condition.image is not None or condition.text is None:
        return condition
    from .settings import PRIOR_GUIDANCE_SCALE, PRIOR_STEPS

    z = sample_embeddings(loaded.prior.model, loaded.prior.schedule, condition, prior_seeds(seeds),
                          steps=PRIOR_STEPS if prior_steps is None else prior_steps,
                          guidance_scale=PRIOR_GUIDANCE_SCALE if prior_guidance_scale is None
                          else prior_guidance_scale)  # (N, E) unit norm, each from its own seed
    return with_image(z, condition if loaded.config.text_dim else None)


def generate_images(
    loaded: LoadedModel,
    seeds: Sequence[int],
    *,
    condition: Condition | None = None,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    forward_rows: int | None = FORWARD_ROWS,
    forward: Model | None = None,
    batch_size: int = 256,
    progress: Progress | None = None,
    watch: Watch | None = None,
    prior_steps: int | None = None,
    prior_guidance_scale: float | None = None,
) -> np.ndarray:
    """Images (len(seeds), H, W, C) uint8 from ``loaded`` (its network on its own device), image i from ``seeds[i]``.

    condition: None, or one row per seed (``ddpm.conditioning.Condition``: ``from_labels`` for class labels,
    ``encode_prompts`` or ``loaded.condition`` for prompts). sampler, steps, eta, guidance_scale: as for
    :func:`ddpm.sampling.sample`. forward_rows: rows per network call (:func:`fixed_size_forward`); None runs each
    batch at its own size (faster for one odd-sized request, but then an image can depend on its batch).
    forward: a ready-made replacement for the network call (x, t, cond) -> output, e.g. a captured CUDA graph; it
    must keep the fixed-shape property itself. batch_size: images per sampler call; it bounds memory only and
    never changes a pixel. progress(n): called after each batch with the images done so far. watch: called after
    each model call, and may take images out of the batch (``Watch``). A whole unCLIP model first samples each
    image's CLIP embedding from its prompt with the prior (:func:`unclip_condition`: ``prior_steps``,
    ``prior_guidance_scale``).
    """
    device = _device_of(loaded)
    if forward is None:
        forward = loaded.model if forward_rows is None else fixed_size_forward(loaded.model, forward_rows)
    condition = unclip_condition(loaded, _condition(condition, len(seeds)), seeds, prior_steps=prior_steps,
                                 prior_guidance_scale=prior_guidance_scale)
    chunks = []
    for start in range(0, len(seeds), batch_size):
        part = [int(s) % SEED_MODULUS for s in seeds[start:start + batch_size]]
        x_T, generators = noise_from_seeds(part, loaded.sample_shape, device)  # (B, C, H, W), latent or pixels
        c = None if condition is None else condition.select(slice(start, start + len(part))).to(device)
        callback, left = _sampler_callback(watch, loaded, list(range(start, start + len(part))), sampler, steps, eta)
        with torch.inference_mode(), _autocast(device):
            x_0 = sample(forward, loaded.schedule, x_T, sampler=sampler, steps=steps, eta=eta,
                         prediction_type=loaded.prediction_type, condition=c, guidance_scale=guidance_scale,
                         generator=generators, callback=callback)
            x_0 = _to_pixels(loaded, x_0, forward_rows) if x_0.shape[0] else x_0
        chunks.append(_scatter(loaded, x_0, left(), len(part), start))  # (B, H, W, C)
        if progress is not None:
            progress(start + len(part))
    if not chunks:
        c, h, w = loaded.image_shape  # the images', decoded
        return np.zeros((0, h, w, c), dtype=np.uint8)
    return np.concatenate(chunks)


def inpaint_images(
    loaded: LoadedModel,
    seeds: Sequence[int],
    known: torch.Tensor,
    masks: torch.Tensor | None,
    *,
    condition: Condition | None = None,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    resample_jumps: int = 1,
    resample_times: int = 1,
    strength: float = 1.0,
    forward_rows: int | None = FORWARD_ROWS,
    forward: Model | None = None,
    watch: Watch | None = None,
    prior_steps: int | None = None,
    prior_guidance_scale: float | None = None,
) -> np.ndarray:
    """RePaint (:func:`ddpm.inpainting.inpaint`) with the same seed and kernel rules as :func:`generate_images`.

    known: (N, C, H, W) images in [-1, 1], one per seed; masks: (N, 1, H, W) or (N, C, H, W), 1 = generate, or
    None for the whole image. strength in (0, 1]: below 1 the masked region starts from the image noised to that
    share of the plan (SDEdit; :func:`ddpm.inpaint`), so an edit keeps the image's layout; with no mask that is
    editing the whole image. Image i draws all its noise from ``seeds[i]``; ``condition`` (one row per seed, as for
    :func:`generate_images`) is what the masked region is repainted to, e.g. a new prompt. Returns (N, H, W, C) uint8
    whose kept pixels equal ``known``'s. watch: as for :func:`generate_images`, after each model call (RePaint's
    re-denoising included). A whole unCLIP model's prompt goes through its prior first, as for
    :func:`generate_images`.
    A latent model runs RePaint on the latents (module docstring) and pastes the kept pixels back after decoding.
    Both are checked here, in pixels (:func:`ddpm.inpainting.check_pixels`, ``check_mask``): the latents a
    latent model encodes them to have unit standard deviation and leave [-1, 1], as they should.
    """
    device = _device_of(loaded)
    if forward is None:
        forward = loaded.model if forward_rows is None else fixed_size_forward(loaded.model, forward_rows)
    if known.shape[0] != len(seeds):
        raise ValueError(f"got {known.shape[0]} images for {len(seeds)} seeds")
    generators = [torch.Generator().manual_seed(int(s) % SEED_MODULUS) for s in seeds]  # inpaint draws x_T itself
    condition = unclip_condition(loaded, _condition(condition, len(seeds)), seeds, prior_steps=prior_steps,
                                 prior_guidance_scale=prior_guidance_scale)
    if masks is None:  # edit everything
        masks = torch.ones(known.shape[0], 1, *known.shape[2:])
    known, masks = known.to(device), masks.to(device)
    check_mask(known, masks)  # in pixels, before a latent model's mask is pooled to the latents' grid
    check_pixels(known)
    callback, left = _sampler_callback(watch, loaded, list(range(len(seeds))), sampler, steps, eta, resample_jumps,
                                       resample_times, strength)
    with torch.inference_mode(), _autocast(device):
        if loaded.autoencoder is None:
            target, target_mask = known, masks
        else:
            f = loaded.autoencoder.downsample_factor
            target = in_fixed_chunks(loaded.autoencoder.encode, known, forward_rows)  # (N, c, H / f, W / f)
            # a latent cell is generated when any pixel it decodes to is: (N, 1, H / f, W / f)
            target_mask = F.max_pool2d(masks.float().amax(dim=1, keepdim=True), f)
        x_0 = inpaint(forward, loaded.schedule, target, target_mask, sampler=sampler, steps=steps,
                      eta=eta, prediction_type=loaded.prediction_type,
                      condition=None if condition is None else condition.to(device), guidance_scale=guidance_scale,
                      resample_jumps=resample_jumps, resample_times=resample_times, strength=strength,
                      generator=generators, callback=callback)
        rows = torch.tensor(left(), dtype=torch.long, device=device)  # the images still there: all, without a watch
        if loaded.autoencoder is not None and len(rows):
            x_0 = _to_pixels(loaded, x_0, forward_rows)
            keep = masks[rows].float() < 0.5  # (N, 1 or C, H, W): the decoder only approximates the known pixels
            x_0 = torch.where(keep, known[rows].to(x_0.dtype), x_0.clamp(-1, 1))
    return _scatter(loaded, x_0, left(), len(seeds))  # (N, H, W, C)
