"""The sampling engine behind the Serve app: plain data in, images out. PyTorch and the core only, no Ray.

Kept apart from ``deploy.serve_app`` so that it runs, and is tested, without Ray or FastAPI, on any machine the
core runs on (a GPU box included).

Batching rests on one fact about kernels: CPU (oneDNN, MKL) and GPU libraries pick different algorithms for
different batch sizes, so the same image computed in a batch of 1 and in a batch of 5 differs in its last bits,
and once in a while in a pixel. :func:`fixed_size_forward` runs the network on exactly ``micro_batch`` rows at a
time, padding the last chunk; at one fixed shape a row's result does not depend on the other rows. Together with one
noise generator per image (``ddpm.noise_from_seeds``), an image depends only on its seed and settings, never on
which requests shared its batch: the PNG bytes match whether a request ran alone or batched.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from ddpm import DEFAULT_STEPS, SAMPLERS, checkpoint, from_uint8, inpaint, noise_from_seeds, sample, to_uint8
from ddpm.images import EditInputError, decode_edit_inputs
from deploy.schemas import MAX_EDIT_PIXELS


# -- the work, as plain data ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    """What ``POST /inpaint`` adds to a job: the image and mask as sent (encoded, decoded by the replica against the
    model that runs the job) and RePaint's resampling settings (``ddpm.inpaint``)."""

    image: bytes
    mask: bytes
    resize: bool = False
    resample_jumps: int = 1
    resample_times: int = 1


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

    def seeds(self) -> list[int]:
        """Image i's seed: (seed + i) mod 2^32."""
        return [(self.seed + i) % 2**32 for i in range(self.num_images)]

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one call to ``ddpm.sample``.

        The key holds every setting that ``sample`` takes once per batch: sampler, step count, eta, guidance scale
        and the conditioning mode (class labels themselves are per image). A setting the sampler ignores is
        normalized away (eta outside DDIM, guidance without labels) so that it does not split batches for nothing.
        """
        conditional = self.class_label is not None
        resampling = None if self.edit is None else (
            (self.edit.resample_jumps, self.edit.resample_times) if self.edit.resample_times > 1 else (1, 1))
        return (self.sampler, self.steps, self.eta if self.sampler == "ddim" else 0.0,
                self.guidance_scale if conditional else 1.0, conditional, resampling)

    def model_calls(self) -> int:
        """Network evaluations per image: ``steps``, plus RePaint's re-denoising (``ddpm.inpainting.repaint_walk``):
        steps + (r - 1) * j * (number of jump points k = steps - 1, steps - 1 - j, ... >= j)."""
        if self.edit is None or self.edit.resample_times == 1:
            return self.steps
        j, r = self.edit.resample_jumps, self.edit.resample_times
        return self.steps + (r - 1) * j * len(range(self.steps - 1, j - 1, -j))


@dataclass(frozen=True)
class Queued:
    """A job and when its replica received it (``time.monotonic``), to report the time it spent queued."""

    job: Job
    received: float


@dataclass(frozen=True)
class Generated:
    images: np.ndarray  # (N, H, W, C) uint8
    seeds: list[int]
    model: dict  # name, version, alias of the weights that made the images
    timings_ms: dict
    batch: dict  # requests and images that shared the forward passes


@dataclass(frozen=True)
class Rejected:
    """A request that cannot run on this model; the ingress turns it into a 422 naming ``field``."""

    field: str
    message: str


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

    def describe(self) -> dict:
        c = self.loaded.config
        classes = self.loaded.class_names or [str(i) for i in range(c.num_classes)]
        return self.identity() | {
            "resolution": c.image_size, "channels": c.in_channels, "num_classes": c.num_classes, "classes": classes,
            "samplers": list(SAMPLERS), "default_steps": dict(DEFAULT_STEPS),
            "num_timesteps": self.loaded.schedule.num_timesteps, "prediction_type": self.loaded.prediction_type,
            "device": str(self.device),
        }


# -- loading and sampling ------------------------------------------------------------------------------------------
def load_served(uri: str, tracking_uri: str | None, device: torch.device) -> ServedModel:
    """Resolve ``uri`` (registry alias or version, or a checkpoint folder) and load its EMA weights onto ``device``."""
    from pipelines.registry import resolve_model  # MLflow is imported only when a replica loads a model

    resolved = resolve_model(uri, tracking_uri=tracking_uri)
    loaded = checkpoint.load(resolved.path, device=device, weights="ema")
    return ServedModel(loaded, device, resolved.name, resolved.version, resolved.alias)


def pick_device() -> torch.device:
    """The GPU Ray gave this replica (``num_gpus`` > 0), else the CPU; on a GPU, kernels that don't vary run to run."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    torch.backends.cudnn.benchmark = False  # autotuning may choose a different convolution algorithm per process
    torch.backends.cudnn.deterministic = True
    return torch.device("cuda")


def fixed_size_forward(model: torch.nn.Module, size: int):
    """``model`` as a callable that always runs exactly ``size`` rows at a time, padding the last chunk.

    This is what makes batching invisible in the output (see the module docstring): with the shape fixed, each row
    goes through the same kernels whatever the other rows are, so it comes out bit-identical.
    """

    def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        outputs = []
        for start in range(0, x.shape[0], size):
            n = min(size, x.shape[0] - start)
            # Fresh, padded buffers every time: same shape, same strides, same alignment for every chunk.
            xs = x.new_zeros((size, *x.shape[1:]))
            xs[:n] = x[start:start + n]
            ts = t.new_full((size,), int(t[start]))  # samplers run one timestep for the whole batch
            ts[:n] = t[start:start + n]
            if y is None:
                out = model(xs, ts)
            else:
                ys = y.new_full((size,), -1)  # padding rows take the null class
                ys[:n] = y[start:start + n]
                out = model(xs, ts, ys)
            outputs.append(out[:n])
        return torch.cat(outputs)

    return forward


def check(job: Job, served: ServedModel) -> Rejected | None:
    """What a valid body can still get wrong about this particular model."""
    cfg, T = served.loaded.config, served.loaded.schedule.num_timesteps
    if job.steps > T:
        return Rejected("steps", f"steps must be at most {T}, this model's number of timesteps; got {job.steps}")
    if job.class_label is None:
        if job.guidance_scale != 1.0:
            return Rejected("guidance_scale", "guidance_scale applies only with a class_label")
        return None
    if cfg.num_classes == 0:
        return Rejected("class_label", "this model is unconditional: send class_label null or leave it out")
    if not 0 <= job.class_label < cfg.num_classes:
        return Rejected("class_label", f"unknown class {job.class_label}; this model has classes "
                                       f"0..{cfg.num_classes - 1} (see GET /v1/model)")
    return None


def decode_edit(edit: Edit, served: ServedModel) -> tuple[np.ndarray, np.ndarray] | Rejected:
    """The job's image (H, W, C) uint8 and mask (H, W) bool (True = generate) at the model's size and channels, or
    the rejection that names the input at fault (``ddpm.images.decode_edit_inputs``, what ``ddpm inpaint`` uses)."""
    cfg = served.loaded.config
    try:
        return decode_edit_inputs(edit.image, edit.mask, size=cfg.image_size, channels=cfg.in_channels,
                                  resize=edit.resize, resize_hint="send \"resize\": true to stretch image and mask "
                                                                  "to it", max_pixels=MAX_EDIT_PIXELS)
    except EditInputError as exc:
        return Rejected(exc.field, str(exc))


def _edit_batch(jobs: list[Job], edits: list[tuple[np.ndarray, np.ndarray]],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The known images (N, C, H, W) in [-1, 1] and masks (N, 1, H, W), 1 = generate: each job's repeated for its
    ``num_images`` seeds, in the order of ``Job.seeds``."""
    images = torch.cat([from_uint8(image[None]).expand(job.num_images, -1, -1, -1)
                        for job, (image, _) in zip(jobs, edits)])
    masks = torch.cat([torch.as_tensor(generate, dtype=torch.float32)[None, None].expand(job.num_images, -1, -1, -1)
                       for job, (_, generate) in zip(jobs, edits)])
    return images.to(device), masks.to(device)


def generate_images(served: ServedModel, jobs: list[Job], micro_batch: int | None,
                    edits: list[tuple[np.ndarray, np.ndarray] | None] | None = None) -> list[np.ndarray]:
    """Sample (or inpaint) every job's images, one ``ddpm.sample`` / ``ddpm.inpaint`` call per group of jobs that
    share settings. ``edits[i]``: job i's decoded (image, mask) (:func:`decode_edit`), for jobs with an ``edit``.

    Returns one (num_images, H, W, C) uint8 array per job, in order.
    """
    loaded = served.loaded
    model = loaded.model if micro_batch is None else fixed_size_forward(loaded.model, micro_batch)
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.batch_key(), []).append(i)

    results: dict[int, np.ndarray] = {}
    for members in groups.values():
        group = [jobs[i] for i in members]
        settings = group[0]
        # Noise: one CPU generator per image, seeded from the image's own seed.
        seeds = [s for job in group for s in job.seeds()]
        if settings.edit is None:
            x_T, generators = noise_from_seeds(seeds, loaded.image_shape, served.device)  # (N, C, H, W)
        else:  # inpaint draws x_T itself, first from each generator
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            known, masks = _edit_batch(group, [edits[i] for i in members], served.device)  # (N, C, H, W), (N, 1, H, W)
        labels = None
        if settings.class_label is not None:
            labels = torch.tensor([job.class_label for job in group for _ in range(job.num_images)])
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if served.device.type == "cuda"
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            if settings.edit is None:
                x_0 = sample(model, loaded.schedule, x_T, sampler=settings.sampler, steps=settings.steps,
                             eta=settings.eta, prediction_type=loaded.prediction_type, class_labels=labels,
                             guidance_scale=settings.guidance_scale, generator=generators)
            else:
                x_0 = inpaint(model, loaded.schedule, known, masks, sampler=settings.sampler, steps=settings.steps,
                              eta=settings.eta, prediction_type=loaded.prediction_type, class_labels=labels,
                              guidance_scale=settings.guidance_scale, resample_jumps=settings.edit.resample_jumps,
                              resample_times=settings.edit.resample_times, generator=generators)
        images = to_uint8(x_0)  # (N, H, W, C)
        offset = 0
        for i, job in zip(members, group):
            results[i] = images[offset:offset + job.num_images]
            offset += job.num_images
    return [results[i] for i in range(len(jobs))]


def run_batch(served: ServedModel, items: list[Queued], micro_batch: int | None) -> list[Generated | Rejected]:
    """Check each queued job against ``served`` (and decode its edit), then sample all the valid ones together."""
    started = time.monotonic()
    outcomes: dict[int, Generated | Rejected] = {}
    edits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i, item in enumerate(items):
        checked = check(item.job, served)
        if checked is None and item.job.edit is not None:
            checked = decode_edit(item.job.edit, served)
        if isinstance(checked, Rejected):
            outcomes[i] = checked
        elif checked is not None:
            edits[i] = checked
    valid = [i for i in range(len(items)) if i not in outcomes]
    images = generate_images(served, [items[i].job for i in valid], micro_batch, [edits.get(i) for i in valid])
    sample_ms = (time.monotonic() - started) * 1000
    batch = {"requests": len(valid), "images": sum(items[i].job.num_images for i in valid)}
    for i, imgs in zip(valid, images):
        outcomes[i] = Generated(imgs, items[i].job.seeds(), served.identity(),
                                {"queue": (started - items[i].received) * 1000, "sample": sample_ms}, batch)
    return [outcomes[i] for i in range(len(items))]
