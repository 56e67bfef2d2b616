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

from ddpm import DEFAULT_STEPS, SAMPLERS, checkpoint, noise_from_seeds, sample, to_uint8


# -- the work, as plain data ----------------------------------------------------------------------------------------
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
        return (self.sampler, self.steps, self.eta if self.sampler == "ddim" else 0.0,
                self.guidance_scale if conditional else 1.0, conditional)


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


def generate_images(served: ServedModel, jobs: list[Job], micro_batch: int | None) -> list[np.ndarray]:
    """Sample every job's images, one ``ddpm.sample`` call per group of jobs that share settings.

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
        x_T, generators = noise_from_seeds(seeds, loaded.image_shape, served.device)  # (N, C, H, W)
        labels = None
        if settings.class_label is not None:
            labels = torch.tensor([job.class_label for job in group for _ in range(job.num_images)])
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if served.device.type == "cuda"
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            x_0 = sample(model, loaded.schedule, x_T, sampler=settings.sampler, steps=settings.steps,
                         eta=settings.eta, prediction_type=loaded.prediction_type, class_labels=labels,
                         guidance_scale=settings.guidance_scale, generator=generators)
        images = to_uint8(x_0)  # (N, H, W, C)
        offset = 0
        for i, job in zip(members, group):
            results[i] = images[offset:offset + job.num_images]
            offset += job.num_images
    return [results[i] for i in range(len(jobs))]


def run_batch(served: ServedModel, items: list[Queued], micro_batch: int | None) -> list[Generated | Rejected]:
    """Check each queued job against ``served``, then sample all the valid ones together."""
    started = time.monotonic()
    outcomes: dict[int, Generated | Rejected] = {}
    for i, item in enumerate(items):
        if (rejection := check(item.job, served)) is not None:
            outcomes[i] = rejection
    valid = [i for i in range(len(items)) if i not in outcomes]
    images = generate_images(served, [items[i].job for i in valid], micro_batch)
    sample_ms = (time.monotonic() - started) * 1000
    batch = {"requests": len(valid), "images": sum(items[i].job.num_images for i in valid)}
    for i, imgs in zip(valid, images):
        outcomes[i] = Generated(imgs, items[i].job.seeds(), served.identity(),
                                {"queue": (started - items[i].received) * 1000, "sample": sample_ms}, batch)
    return [outcomes[i] for i in range(len(items))]
