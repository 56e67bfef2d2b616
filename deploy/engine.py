"""The sampling engine behind the Serve app: plain data in, images out. PyTorch and the core only, no Ray.

Kept apart from the Serve deployments (``deploy.sampler``, ``deploy.ingress``) so that it runs, and is tested,
without Ray or FastAPI, on any machine the core runs on (a GPU box included).

Images come from the core's one path (:func:`ddpm.generate_images`, :func:`ddpm.inpaint_images`): per-image seeds
and a fixed-shape forward of ``micro_batch`` rows make an image independent of the requests that shared its batch,
so the PNG bytes match whether a request ran alone or batched, and match ``ddpm generate`` at the same rows.
A text model's prompts are per image, like class labels: requests with different prompts share a batch, and each
distinct prompt of the batch is encoded once (:func:`batch_condition`). unCLIP's decoder varies an image sent to
``POST /variations`` (its CLIP embedding, :class:`Variation`); a whole unCLIP model runs its prior on a prompt
inside the core's generation function.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np
import torch

from ddpm import (DEFAULT_STEPS, SAMPLERS, checkpoint, fixed_size_forward, from_labels, from_uint8, generate_images,
                  image_seeds, inpaint_images, strength_steps)
from ddpm.conditioning import Condition, describe, embed_images, slerp, with_image
from ddpm.images import EditInputError, decode_edit_inputs
from ddpm.inpainting import model_calls
from ddpm.settings import MAX_PROMPT_BYTES, PRIOR_GUIDANCE_SCALE, PRIOR_STEPS, SettingError, guided
from deploy.schemas import MAX_EDIT_PIXELS


# -- the work, as plain data ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    """What ``POST /inpaint`` and ``POST /edit`` add to a job: the image and mask as sent (encoded, decoded by the
    replica against the model that runs the job; no mask: the whole image), RePaint's resampling settings and the
    edit's strength (SDEdit: below 1 the masked region starts from the noised image; ``ddpm.inpaint``)."""

    image: bytes
    mask: bytes | None
    resize: bool = False
    resample_jumps: int = 1
    resample_times: int = 1
    strength: float = 1.0


@dataclass(frozen=True)
class Variation:
    """What ``POST /variations`` adds to a job: the image as sent (decoded by the replica at its model's CLIP size),
    and optionally a second image ``toward`` whose embedding the first's is slerped to by ``mix`` (0: the image's
    own embedding, exactly; 1: toward's)."""

    image: bytes
    resize: bool = False
    toward: bytes | None = None
    mix: float = 0.5


@dataclass(frozen=True)
class Job:
    """One request, with its defaults filled in, as the ingress sends it to a sampler replica."""

    num_images: int
    sampler: str
    steps: int
    eta: float
    seed: int
    class_label: int | None
    guidance_scale: float
    edit: Edit | None = None  # None: sample; else inpaint ``edit.image``, one result per seed
    prompt: str | None = None  # a text model's prompt; None or "": the empty prompt, the unconditional model
    negative_prompt: str | None = None  # what guidance pushes away from; None: the empty prompt
    variation: Variation | None = None  # unCLIP's decoder: the image whose CLIP embedding conditions every image
    prior_steps: int | None = None  # a whole unCLIP model's prior: None = ddpm.settings.PRIOR_STEPS
    prior_guidance_scale: float | None = None  # ... None = ddpm.settings.PRIOR_GUIDANCE_SCALE

    def seeds(self) -> list[int]:
        """Image i's seed: (seed + i) mod 2^32 (``ddpm.image_seeds``)."""
        return image_seeds(self.seed, self.num_images)

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one call to ``ddpm.sample``.

        The key holds every setting that ``sample`` takes once per batch: sampler, step count, eta, guidance scale
        and the conditioning mode (class labels and prompts themselves are per image, so a prompt is not in the
        key). A setting the sampler ignores is normalized away (eta outside DDIM, guidance without a label or
        prompt) so that it does not split batches for nothing. A variation's condition is an image embedding, a
        prompt's for a whole unCLIP model text for its prior: they never share a call; nor do prior settings.
        """
        conditional = self.class_label is not None
        resampling = None if self.edit is None else (
            (self.edit.resample_jumps, self.edit.resample_times) if self.edit.resample_times > 1 else (1, 1),
            self.edit.strength)
        return (self.sampler, self.steps, self.eta if self.sampler == "ddim" else 0.0,
                self.guidance_scale if self.guided() else 1.0, conditional, resampling, self.variation is not None,
                self.prior_settings())

    def prior_settings(self) -> tuple[int, float]:
        """(steps, guidance scale) a whole unCLIP model's prior runs with, defaults filled in."""
        return (PRIOR_STEPS if self.prior_steps is None else self.prior_steps,
                PRIOR_GUIDANCE_SCALE if self.prior_guidance_scale is None else self.prior_guidance_scale)

    def guided(self) -> bool:
        """Classifier-free guidance on (``ddpm.settings.guided``): each model call runs two network rows per image."""
        condition = self.class_label if self.class_label is not None else (
            self.variation if self.variation is not None else self.prompt)
        return guided(condition, self.guidance_scale)

    def model_calls(self) -> int:
        """Network evaluations per image: ``steps``; an edit's share of them (``ddpm.strength_steps``) plus RePaint's
        re-denoising (``ddpm.inpainting.model_calls``)."""
        if self.edit is None:
            return self.steps
        return model_calls(strength_steps(self.steps, self.edit.strength), self.edit.resample_jumps,
                           self.edit.resample_times)

    def network_rows(self) -> int:
        """Rows one image sends through the U-Net: model calls x 2 when guided (conditional and null rows)."""
        return self.model_calls() * (2 if self.guided() else 1)


class Control:
    """A request's line between the event loop that holds it and the thread that samples it.

    ``cancelled`` is set by the event loop when the client goes away; the sampling thread reads it after every model
    call and takes the request's images out of the batch (``ddpm.generation.Watch``). ``progress(step, steps,
    images_done)``, when set, is called from the sampling thread after each of the request's model calls, and once
    more when its images are finished (decoded, for a latent model); it must be thread-safe and quick.
    """

    def __init__(self, progress: Callable[[int, int, int], None] | None = None):
        self.cancelled = threading.Event()
        self.progress = progress
        self._taken = False  # a run has started on the request
        self._lock = threading.Lock()

    def cancel(self) -> bool:
        """The client went away: set ``cancelled``. True when no run had taken the request yet, so that its whole
        cost is saved and no run will report it (the caller counts it); False when a run has it (the run reports
        what it saved)."""
        with self._lock:
            self.cancelled.set()
            return not self._taken

    def take(self) -> bool:
        """A run starts on the request: False (and nothing taken) when it was cancelled before."""
        with self._lock:
            self._taken = not self.cancelled.is_set()
            return self._taken


@dataclass(frozen=True)
class Queued:
    """A job, when its replica received it (``time.monotonic``, to report the time it spent queued), and its
    :class:`Control`."""

    job: Job
    received: float
    control: Control = field(default_factory=Control)


@dataclass(frozen=True)
class Generated:
    images: np.ndarray  # (N, H, W, C) uint8
    seeds: list[int]
    model: dict  # name, version, alias of the weights that made the images
    timings_ms: dict
    batch: dict  # requests and images that shared the forward passes
    prompt_report: dict | None = None  # a text model's: what tokenizing the prompts lost (:func:`prompt_report`)


@dataclass(frozen=True)
class Rejected:
    """A request that cannot run on this model; the ingress turns it into a 422 naming ``field``."""

    field: str
    message: str


@dataclass(frozen=True)
class Cancelled:
    """A request whose client went away: its images left the batch with ``image_steps_saved`` (images x model calls)
    still to go. ``ran``: False when it left before a run took it (``Control.cancel`` told its caller to count it)."""

    image_steps_saved: int
    ran: bool = True


Outcome = Generated | Rejected | Cancelled


@dataclass(frozen=True)
class ServedModel:
    """An immutable snapshot of what a replica serves: replaced as a whole, never modified."""

    loaded: checkpoint.LoadedModel  # EMA weights, eval mode, on ``device``
    device: torch.device
    name: str | None
    version: str | None
    alias: str | None

    def identity(self) -> dict:
        return {"name": self.name, "version": self.version, "alias": self.alias}

    @cached_property
    def codec_rows(self) -> dict[str, int]:
        """A latent model's autoencoder per image in U-Net rows, rounded up: ``decode`` (every sample) and ``encode``
        (an edit's known image), each = FLOPs of one call / FLOPs of one U-Net row, counted once with
        ``torch.utils.flop_counter`` (photos-latent: decode 10.5, encode 4.0); zero for a pixel model.

        Counted rather than assumed to be one call: the decoder works at the pixels' resolution, the U-Net at the
        latents', so a decode costs about ten steps, a third of a 20-step request."""
        if self.loaded.autoencoder is None and self.loaded.prior is None:
            return {"decode": 0, "encode": 0, "prior": 0}
        from torch.utils.flop_counter import FlopCounterMode

        def flops(fn, *args) -> int:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                fn(*args)
            return counter.get_total_flops()

        device = self.device
        z = torch.zeros(1, *self.loaded.sample_shape, device=device)  # (1, c, h, w)
        t = torch.zeros(1, dtype=torch.long, device=device)
        unet = flops(self.loaded.model, z, t, _one_row_condition(self.loaded, device))
        rows = {"decode": 0, "encode": 0, "prior": 0}
        if self.loaded.prior is not None:  # one prior call for one image: a fraction of a U-Net row, rounded up
            prior = self.loaded.prior.model
            text = self.loaded.condition(1)  # the empty prompt's text condition, as the prior reads it
            rows["prior"] = math.ceil(flops(prior, torch.zeros(1, prior.config.embed_dim, device=device), t,
                                            text.to(device)) / unet)
        if self.loaded.autoencoder is not None:
            ae = self.loaded.autoencoder
            dtype = next(ae.parameters()).dtype
            pixels = torch.zeros(1, *self.loaded.image_shape, device=device, dtype=dtype)  # (1, C, H, W)
            rows |= {"decode": math.ceil(flops(ae.decode, z.to(dtype)) / unet),
                     "encode": math.ceil(flops(ae.encode, pixels) / unet)}
        return rows

    def runs_prior(self, job: Job) -> bool:
        """Whether ``job`` samples its image embeddings with the prior: a whole unCLIP model, not a variation."""
        return self.loaded.prior is not None and job.variation is None

    def prior_rows(self, job: Job) -> int:
        """The prior's cost per image in U-Net rows: its calls (x 2 when guided) x the rows one call costs."""
        if not self.runs_prior(job):
            return 0
        steps, w = job.prior_settings()
        return steps * (2 if w != 1.0 else 1) * self.codec_rows["prior"]

    def cost(self, job: Job) -> int:
        """What ``job`` costs in U-Net rows (image-steps): num_images x (network rows + decode [+ encode] [+ the
        prior's rows, :meth:`prior_rows`]).

        A prompt adds nothing: the text encoder runs once per distinct prompt per batch, not per step, and one
        prompt costs about 1/40 of one U-Net row (configs/shapes-text.yaml with clip-shapes' encoder: 0.013 vs
        0.51 GFLOP, 2.2 vs 103 ms at 8 rows on a loaded 2-core CPU), so a whole number of rows would round it away."""
        codec = self.codec_rows["decode"] + (self.codec_rows["encode"] if job.edit is not None else 0)
        return job.num_images * (job.network_rows() + codec + self.prior_rows(job))

    def describe(self) -> dict:
        c = self.loaded.config
        channels, resolution, _ = self.loaded.image_shape  # a latent model's decoded images
        classes = self.loaded.class_names or [str(i) for i in range(c.num_classes)]
        text, clip = self.loaded.prompt_encoder, self.loaded.image_encoder
        return self.identity() | {
            "resolution": resolution, "channels": channels, "num_classes": c.num_classes, "classes": classes,
            "latent": self.loaded.autoencoder is not None,
            "samplers": list(SAMPLERS), "default_steps": dict(DEFAULT_STEPS),
            "num_timesteps": self.loaded.schedule.num_timesteps, "prediction_type": self.loaded.prediction_type,
            "device": str(self.device), "autoencoder_rows": self.codec_rows,
            "takes_prompt": text is not None,  # a text model: POST /generate takes "prompt", not "class_label"
            "prompt_context_length": None if text is None else text.context_length,  # tokens; the rest is dropped
            "max_prompt_bytes": MAX_PROMPT_BYTES,
            "takes_image": clip is not None,  # unCLIP's decoder: POST /variations takes an image of this size
            "variation_takes_prompt": clip is not None and c.text_dim > 0,  # a decoder that reads captions too
            "image_size": None if clip is None else clip.model.config.image_size,
            "unclip": self.loaded.prior is not None,  # a whole unCLIP model: a prompt runs prior then decoder
            "prior_defaults": None if self.loaded.prior is None else {"prior_steps": PRIOR_STEPS,
                                                                      "prior_guidance_scale": PRIOR_GUIDANCE_SCALE},
        }


def _one_row_condition(loaded: checkpoint.LoadedModel, device: torch.device) -> Condition | None:
    """What one row of the network is conditioned on, to count its FLOPs: a zero image embedding for unCLIP's
    decoder (and the empty prompt if it reads captions), the empty prompt for a text model, class 0 for a class
    model, None for an unconditional one."""
    if loaded.image_encoder is not None:
        return loaded.condition(1, image_embeddings=torch.zeros(loaded.config.image_dim)).to(device)
    if loaded.text_encoder is not None:
        return loaded.condition(1).to(device)
    return None if not loaded.config.num_classes else from_labels(0, 1).to(device)


# -- loading and sampling ------------------------------------------------------------------------------------------
def load_served(uri: str, tracking_uri: str | None, device: torch.device) -> ServedModel:
    """Resolve ``uri`` (registry alias or version, or a checkpoint folder) and load its EMA weights onto ``device``."""
    from pipelines.registry import resolve_model  # MLflow is imported only when a replica loads a model

    resolved = resolve_model(uri, tracking_uri=tracking_uri)
    loaded = checkpoint.load(resolved.path, device=device, weights="ema")
    served = ServedModel(loaded, device, resolved.name, resolved.version, resolved.alias)
    served.codec_rows  # counted now, while loading, not in the first batch
    return served


def pick_device() -> torch.device:
    """The GPU Ray gave this replica (``num_gpus`` > 0), else the CPU; on a GPU, kernels that don't vary run to run."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    torch.backends.cudnn.benchmark = False  # autotuning may choose a different convolution algorithm per process
    torch.backends.cudnn.deterministic = True
    return torch.device("cuda")


def check(job: Job, served: ServedModel, max_cost: int | None = None) -> Rejected | None:
    """What a valid body can still get wrong about this particular model (``ddpm.settings.check_for_model``, the
    rules ``ddpm generate`` applies too), and its cost against ``max_cost`` U-Net rows (:meth:`ServedModel.cost`)."""
    try:
        served.loaded.check_request(steps=job.steps, class_label=job.class_label, prompt=job.prompt,
                                    negative_prompt=job.negative_prompt, image=job.variation,
                                    prior_steps=job.prior_steps, prior_guidance_scale=job.prior_guidance_scale)
    except SettingError as exc:
        hint = " (see GET /v1/model)" if exc.field in ("class_label", "prompt", "negative_prompt", "image",
                                                       "prior_steps", "prior_guidance_scale") else ""
        return Rejected(exc.field, exc.reason + hint)
    cost = served.cost(job)
    if max_cost is not None and cost > max_cost:
        calls, resampling = job.model_calls(), job.edit is not None and job.edit.resample_times > 1
        terms = f"{calls} model calls" + (" (steps plus RePaint's resampling)" if resampling else "")
        terms += " x 2 rows for guidance" if job.guided() else ""
        codec = served.codec_rows
        terms += f" + {codec['decode']} to decode the latents" if codec["decode"] else ""
        terms += f" + {codec['encode']} to encode the image" if codec["encode"] and job.edit is not None else ""
        terms += f" + {served.prior_rows(job)} for the prior" if served.runs_prior(job) else ""
        return Rejected("resample_times" if resampling else "steps",
                        f"{job.num_images} images x ({terms}) = {cost} U-Net rows exceeds this server's budget of "
                        f"{max_cost} per request")
    return None


def decode_edit(edit: Edit, served: ServedModel) -> tuple[np.ndarray, np.ndarray] | Rejected:
    """The job's image (H, W, C) uint8 and mask (H, W) bool (True = generate) at the model's size and channels, or
    the rejection that names the input at fault (``ddpm.images.decode_edit_inputs``, what ``ddpm inpaint`` uses)."""
    channels, size, _ = served.loaded.image_shape
    try:
        return decode_edit_inputs(edit.image, edit.mask, size=size, channels=channels,
                                  resize=edit.resize, resize_hint="send \"resize\": true to stretch image and mask "
                                                                  "to it", max_pixels=MAX_EDIT_PIXELS)
    except EditInputError as exc:
        return Rejected(exc.field, str(exc))


def decode_variation(variation: Variation, served: ServedModel) -> tuple[np.ndarray, np.ndarray | None] | Rejected:
    """The image to vary (and the image ``toward``, or None) as (H, W, C) uint8 at the size and channels of the
    model's CLIP, or the rejection that names the one at fault."""
    cfg = served.loaded.image_encoder.model.config
    decoded = []
    for field_, data in (("image", variation.image), ("toward", variation.toward)):
        if data is None:
            decoded.append(None)
            continue
        try:
            image, _ = decode_edit_inputs(data, None, size=cfg.image_size, channels=cfg.in_channels,
                                          resize=variation.resize, resize_hint="send \"resize\": true to stretch it",
                                          max_pixels=MAX_EDIT_PIXELS)
        except EditInputError as exc:
            return Rejected(field_, str(exc))
        decoded.append(image)
    return decoded[0], decoded[1]


def _edit_batch(jobs: list[Job], edits: list[tuple[np.ndarray, np.ndarray]],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The known images (N, C, H, W) in [-1, 1] and masks (N, 1, H, W), 1 = generate: each job's repeated for its
    ``num_images`` seeds, in the order of ``Job.seeds``."""
    images = torch.cat([from_uint8(image[None]).expand(job.num_images, -1, -1, -1)
                        for job, (image, _) in zip(jobs, edits)])
    masks = torch.cat([torch.as_tensor(generate, dtype=torch.float32)[None, None].expand(job.num_images, -1, -1, -1)
                       for job, (_, generate) in zip(jobs, edits)])
    return images.to(device), masks.to(device)


def network_call(served: ServedModel, micro_batch: int | None):
    """The network as the samplers call it: ``micro_batch`` rows at a time, or the bare network at each batch's own
    size when ``micro_batch`` is None (batching off). On a GPU the fixed-shape forward replays a captured CUDA graph
    (``ddpm.graphs.graphed_forward``, kept per model and micro-batch across batches); on the CPU it is
    ``ddpm.fixed_size_forward``."""
    if micro_batch is None:
        return served.loaded.model
    if served.device.type != "cuda":
        return fixed_size_forward(served.loaded.model, micro_batch)
    from ddpm.graphs import graphed_forward

    return graphed_forward(served.loaded.model, micro_batch)


def batch_condition(served: ServedModel, jobs: list[Job]) -> Condition | None:
    """A text model's Condition for every image of ``jobs``, in order (one row per seed; no prompt = the empty
    prompt): each distinct prompt and negative prompt of the batch is tokenized and encoded once
    (``ddpm.conditioning.encode_prompts``, whose fixed-size encoder calls keep a row independent of the others).
    A whole unCLIP model's prompts are encoded by its CLIP, for the prior. None for a model that reads no text."""
    if served.loaded.prompt_encoder is None or not jobs:
        return None
    per_image = lambda texts: [t or "" for job, t in zip(jobs, texts) for _ in range(job.num_images)]  # noqa
    prompts = per_image([job.prompt for job in jobs])
    return served.loaded.condition(len(prompts), prompts=prompts,
                                   negative_prompts=per_image([job.negative_prompt for job in jobs]))


def prompt_report(job: Job, served: ServedModel) -> dict | None:
    """What tokenizing a text model's ``job`` lost, per prompt it sent (``ddpm.text.TokenReport``): tokens past the
    context (dropped, as CLIP truncates) and words a learned tokenizer never saw, with the warning worded by
    ``ddpm.conditioning.describe``. None for a model without a text encoder."""
    encoder = served.loaded.prompt_encoder
    if encoder is None:
        return None
    sent = {name: text for name, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)) if text}
    reports = dict(zip(sent, encoder.report(list(sent.values())))) if sent else {}
    warnings = [f"{name}: {describe(r, encoder.context_length)}" for name, r in reports.items()
                if r.dropped_tokens or r.unknown_words]
    return {name: {"dropped_tokens": r.dropped_tokens, "unknown_words": list(r.unknown_words)}
            for name, r in reports.items()} | {"warnings": warnings}


def variation_embeddings(served: ServedModel, jobs: list[Job],
                         decoded: list[tuple[np.ndarray, np.ndarray | None]]) -> torch.Tensor:
    """(sum of num_images, E): each variation job's image's CLIP embedding (``ddpm.conditioning.embed_images``), or
    its slerp ``mix`` of the way to the ``toward`` image's, once per seed. ``decoded[i]``: job i's (image, toward or
    None) from :func:`decode_variation`. A mix of 0 gives the image's embedding exactly: a plain variation's bytes."""
    clip = served.loaded.image_encoder.model
    per_seed = lambda values: np.stack([v for job, v in zip(jobs, values) for _ in range(job.num_images)])  # noqa
    embed = lambda images: embed_images(clip, from_uint8(per_seed(images)).to(served.device))  # noqa
    z = embed([image for image, _ in decoded])
    if all(toward is None for _, toward in decoded):
        return z
    far = embed([image if toward is None else toward for image, toward in decoded])
    mix = per_seed([0.0 if toward is None else job.variation.mix for job, (_, toward) in zip(jobs, decoded)])
    return slerp(z, far, torch.tensor(mix, dtype=z.dtype, device=z.device))


class _GroupWatch:
    """The ``ddpm.generation.Watch`` of one group of jobs (one core call): progress to each job still sampling, and
    the rows of jobs whose ``Control.cancelled`` is set taken out. ``left[i]``: job i's (model calls made, model calls)
    when it left."""

    def __init__(self, group: list[Job], controls: list[Control]):
        self.controls = controls
        self.owner = [k for k, job in enumerate(group) for _ in range(job.num_images)]  # row -> job in the group
        self.left: dict[int, tuple[int, int]] = {}

    def __call__(self, done: int, calls: int, rows: list[int]) -> list[bool] | None:
        for k in sorted({self.owner[row] for row in rows}):
            if self.controls[k].cancelled.is_set():
                self.left.setdefault(k, (done, calls))
            elif self.controls[k].progress is not None:
                self.controls[k].progress(done, calls, 0)
        keep = [self.owner[row] not in self.left for row in rows]
        return None if all(keep) else keep


def run_jobs(served: ServedModel, jobs: list[Job], micro_batch: int | None,
             edits: list[tuple[np.ndarray, np.ndarray] | None] | None = None,
             controls: list[Control] | None = None) -> tuple[list[np.ndarray | None], dict[int, int]]:
    """Sample (or inpaint) every job's images, one core call per group of jobs that share settings; a text model's
    prompts are encoded once for the whole batch (:func:`batch_condition`) and each group takes its rows.
    ``edits[i]``: job i's decoded (image, mask) (:func:`decode_edit`), for jobs with an ``edit``, or its decoded
    (image, None) (:func:`decode_variation`) for a variation. ``controls[i]``: job i's :class:`Control` (progress
    out, cancellation in).

    Returns one (num_images, H, W, C) uint8 array per job, in order (None for a job cancelled on the way), and the
    image-steps each cancelled job saved, by job index.
    """
    controls = controls if controls is not None else [Control() for _ in jobs]
    saved: dict[int, int] = {}
    forward = network_call(served, micro_batch)
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.batch_key(), []).append(i)
    text = batch_condition(served, jobs)  # (sum of num_images) rows, or None
    first_row = np.cumsum([0] + [job.num_images for job in jobs])  # job i's images are rows first_row[i]...

    results: dict[int, np.ndarray] = {}
    for members in groups.values():
        group = [jobs[i] for i in members]
        settings = group[0]
        seeds = [s for job in group for s in job.seeds()]
        if text is not None:
            condition = text.select(torch.tensor([r for i in members
                                                  for r in range(first_row[i], first_row[i] + jobs[i].num_images)]))
        elif served.loaded.image_encoder is not None:  # unCLIP's decoder without a prompt: zero embeddings
            condition = served.loaded.condition(len(seeds))
        else:
            labels = None
            if settings.class_label is not None:
                labels = [job.class_label for job in group for _ in range(job.num_images)]
            condition = from_labels(labels, len(seeds))
        if settings.variation is not None:
            z = variation_embeddings(served, group, [edits[i] for i in members])  # (N, E)
            condition = with_image(z, condition if served.loaded.config.text_dim else None)
        watch = _GroupWatch(group, [controls[i] for i in members])
        prior_steps, prior_guidance_scale = settings.prior_settings()
        common = dict(condition=condition, sampler=settings.sampler, steps=settings.steps,
                      eta=settings.eta, guidance_scale=settings.guidance_scale, forward=forward, watch=watch,
                      prior_steps=prior_steps, prior_guidance_scale=prior_guidance_scale)
        if settings.edit is None:
            images = generate_images(served.loaded, seeds, batch_size=len(seeds), **common)  # (N, H, W, C)
        else:
            known, masks = _edit_batch(group, [edits[i] for i in members], served.device)  # (N, C, H, W), (N, 1, H, W)
            images = inpaint_images(served.loaded, seeds, known, masks, resample_jumps=settings.edit.resample_jumps,
                                    resample_times=settings.edit.resample_times, strength=settings.edit.strength,
                                    **common)
        offset = 0
        for k, (i, job) in enumerate(zip(members, group)):
            if k in watch.left:
                done, calls = watch.left[k]
                results[i], saved[i] = None, job.num_images * (calls - done)
            else:
                results[i] = images[offset:offset + job.num_images]
                if controls[i].progress is not None:  # sampled (and decoded): the images are finished
                    controls[i].progress(job.model_calls(), job.model_calls(), job.num_images)
            offset += job.num_images
    return [results[i] for i in range(len(jobs))], saved


def _checked(job: Job, served: ServedModel, max_cost: int | None) -> Rejected | tuple[np.ndarray, np.ndarray] | None:
    """:func:`check`, then an edit's inputs (:func:`decode_edit`): the refusal, the decoded (image, mask), or None."""
    checked = check(job, served, max_cost)
    if checked is None and job.edit is not None:
        return decode_edit(job.edit, served)
    if checked is None and job.variation is not None:
        return decode_variation(job.variation, served)
    return checked


def precheck(job: Job, served: ServedModel, max_cost: int | None = None) -> Rejected | None:
    """What :func:`run_batch` would refuse ``job`` for, checked before it queues (a stream answers a refusal as a
    422 before it starts)."""
    checked = _checked(job, served, max_cost)
    return checked if isinstance(checked, Rejected) else None


def run_batch(served: ServedModel, items: list[Queued], micro_batch: int | None,
              max_cost: int | None = None) -> list[Outcome]:
    """Check each queued job against ``served`` and ``max_cost`` (and decode its edit), then sample all the valid
    ones together."""
    started = time.monotonic()
    outcomes: dict[int, Outcome] = {}
    edits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i, item in enumerate(items):
        if not item.control.take():  # its client left while it queued
            outcomes[i] = Cancelled(item.job.num_images * item.job.model_calls(), ran=False)
            continue
        checked = _checked(item.job, served, max_cost)
        if isinstance(checked, Rejected):
            outcomes[i] = checked
        elif checked is not None:
            edits[i] = checked
    valid = [i for i in range(len(items)) if i not in outcomes]
    images, saved = run_jobs(served, [items[i].job for i in valid], micro_batch, [edits.get(i) for i in valid],
                             [items[i].control for i in valid])
    sample_ms = (time.monotonic() - started) * 1000
    batch = {"requests": len(valid), "images": sum(items[i].job.num_images for i in valid)}
    for k, (i, imgs) in enumerate(zip(valid, images)):
        if imgs is None:
            outcomes[i] = Cancelled(saved[k])
            continue
        outcomes[i] = Generated(imgs, items[i].job.seeds(), served.identity(),
                                {"queue": (started - items[i].received) * 1000, "sample": sample_ms}, batch,
                                prompt_report(items[i].job, served))
    return [outcomes[i] for i in range(len(items))]
