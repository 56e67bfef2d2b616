"""Batch generation on Ray Data: seeds -> sampler actors -> shards, resumable, the same pixels as every other path.

``ddpm generate --output FOLDER_OR_PREFIX`` runs :func:`generate_to`; ``ddpm evaluate`` runs :func:`run_shards` with a
sink that turns each shard into feature statistics instead of files (:mod:`pipelines.evaluate.features`).

The work, and where it runs::

    driver  resolve the model, check the settings against it, list OUTPUT: which shards are committed already
    Ray     one row per missing shard -> map_batches(ShardSampler, ActorPoolStrategy): each actor loads the model
            once (from the object store, so workers need no access to the registry or the driver's disk), then per
            shard calls ddpm.generate_images on the shard's seeds and hands the images to the sink
    driver  progress (images/s) from the rows coming back; at the end, the manifest from the shards' commit files

Image i (i = 0..N-1) has seed ``(K + i) mod 2^32`` (``ddpm.image_seeds``) and, with labels, the class
``Labels.at(i)``. Shard j holds images ``j*S .. min((j+1)*S, N) - 1``. Every actor samples through the core's one
path with the endpoint's network call (``ddpm.graphs.graphed_forward`` of ``forward_rows`` rows: a CUDA graph on a
GPU, ``ddpm.fixed_size_forward`` on the CPU), so image i is, bit for bit, what ``POST /generate`` and single-process
``ddpm generate`` return for seed K+i with the same settings and rows, whichever actor made it and whatever else
shared its shard.

Output layout (FORMAT png or parquet)::

    OUTPUT/job.json                    what is being made: model, sampler settings, seeds, labels, shard size, format
    OUTPUT/images/seed-000123.png      png: one file per image, named by its seed
    OUTPUT/data/shard-000000.parquet   parquet: one file per shard; rows of pipelines.data.preprocess's schema
                                       (image = H*W*C raw uint8 bytes, label, key = "seed-000123", sha256 of the
                                       pixels) plus ``seed``
    OUTPUT/shards/shard-000000.json    a shard's commit: written after its images, lists their seeds, labels, sha256s
    OUTPUT/manifest.json               written last: job.json's fields, counts, the fingerprint of all the images

Resuming: a shard is committed when its ``shards/`` file exists (each object is written whole: a PUT, or a rename
on a local disk), so a rerun with the same arguments lists OUTPUT once and generates only the shards without one;
an image file left by a shard that died before its commit is simply written again. A rerun whose job.json differs
(another model version, sampler setting, seed range, shard size, format or device type) is refused rather than
mixing two jobs' images. One run at a time per OUTPUT. A Parquet output's manifest is also a dataset manifest
(``pipelines.data.dataset``), so the images can be the ``--data`` of ``ddpm train`` or ``ddpm evaluate``.

The fingerprint is sha256 over the image shape and the per-image sha256 of the raw pixels in seed order
(:func:`images_fingerprint`): it depends on the pixels only, not on the format, the shard size or the actors.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from pipelines import storage
from pipelines.errors import UserError
from pipelines.generate.progress import ProgressLine

FORMATS = ("png", "parquet")
SHARD_IMAGES = 256  # images per shard: the unit of work, of commit and of resumption
JOB, MANIFEST = "job.json", "manifest.json"
KIND, JOB_VERSION = "ddpm-generated", 1
DATASET_FORMAT_VERSION = 1  # pipelines.data.dataset's manifest format, which a Parquet output also satisfies
_IO_THREADS = 8  # concurrent PUTs per actor: an object store answers each after a round trip


def add_actor_arguments(group, what: str = "sampler actors") -> None:
    """The flags that size the actor pool, shared by ``ddpm generate`` and ``ddpm evaluate``."""
    group.add_argument("--num-actors", type=int, default=None, metavar="A",
                       help=f"{what} (default: one per GPU with --use-gpu, else one per --cpus-per-actor CPUs of "
                            f"the cluster)")
    group.add_argument("--use-gpu", action="store_true", help="one GPU per actor (bf16, CUDA graphs)")
    group.add_argument("--cpus-per-actor", type=int, default=1, metavar="C",
                       help="CPUs (and PyTorch threads) per actor (default: 1)")


# ---------------------------------------------------------------------------------------------------------------
# What is generated


@dataclass(frozen=True)
class Sampling:
    """The settings that decide the pixels besides the seed and the label (what ``POST /generate`` takes)."""

    sampler: str = "ddim"
    steps: int | None = None  # None: the sampler's default, resolved by :meth:`resolved`
    eta: float = 0.0
    guidance_scale: float = 1.0
    forward_rows: int = 16  # ddpm.FORWARD_ROWS, the endpoint's micro_batch

    def resolved(self) -> "Sampling":
        from ddpm import DEFAULT_STEPS

        return self if self.steps is not None else Sampling(self.sampler, DEFAULT_STEPS[self.sampler], self.eta,
                                                            self.guidance_scale, self.forward_rows)


@dataclass(frozen=True, eq=False)
class Labels:
    """Image i's class: none (unconditional), one class for all, ``balanced`` (i mod num_classes), or given per image.

    ``balanced`` is a rule, not a list, so it costs nothing at any N; ``given`` (``ddpm evaluate`` labels its samples
    like the held-out images) holds one label per image.
    """

    kind: str = "none"  # none | class | balanced | given
    class_label: int | None = None
    num_classes: int = 0
    given: np.ndarray | None = None

    @classmethod
    def none(cls) -> "Labels":
        return cls()

    @classmethod
    def one(cls, class_label: int) -> "Labels":
        return cls("class", class_label=int(class_label))

    @classmethod
    def balanced(cls, num_classes: int) -> "Labels":
        return cls("balanced", num_classes=int(num_classes))

    @classmethod
    def per_image(cls, labels: Sequence[int]) -> "Labels":
        return cls("given", given=np.asarray(labels, dtype=np.int64))

    def at(self, start: int, stop: int) -> int | np.ndarray | None:
        """The class labels of images start..stop-1 in the form ``ddpm.generate_images`` takes."""
        if self.kind == "none":
            return None
        if self.kind == "class":
            return self.class_label
        if self.kind == "balanced":
            return np.arange(start, stop, dtype=np.int64) % self.num_classes
        return self.given[start:stop]

    def counts(self, num_images: int, num_classes: int) -> list[int] | None:
        """Images per class over the whole job (None when unconditional)."""
        if self.kind == "none":
            return None
        if self.kind == "class":
            return [num_images if c == self.class_label else 0 for c in range(num_classes)]
        if self.kind == "balanced":
            return np.bincount(np.arange(num_images) % self.num_classes, minlength=num_classes).tolist()
        return np.bincount(self.given[:num_images], minlength=num_classes).tolist()

    def describe(self) -> dict:
        if self.kind == "given":
            digest = hashlib.sha256(np.ascontiguousarray(self.given, dtype=np.int64).tobytes()).hexdigest()
            return {"kind": "given", "count": int(len(self.given)), "sha256": digest}
        return {k: v for k, v in {"kind": self.kind, "class_label": self.class_label,
                                  "num_classes": self.num_classes or None}.items() if v is not None}


@dataclass(frozen=True)
class Plan:
    """Seeds K..K+N-1 (mod 2^32) cut into shards of ``shard_images``."""

    seed: int
    num_images: int
    shard_images: int = SHARD_IMAGES

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_images / self.shard_images)

    def rows(self, shard: int) -> range:
        """The image indices i of ``shard``."""
        start = shard * self.shard_images
        return range(start, min(start + self.shard_images, self.num_images))

    def seeds(self, rows: range) -> list[int]:
        from ddpm import image_seeds

        return image_seeds(self.seed + rows.start, len(rows))  # (K + i) mod 2^32 for i in rows

    def describe(self) -> dict:
        last = (self.seed + self.num_images - 1) % 2**32
        return {"first": self.seed, "count": self.num_images, "last": last}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: where its checkpoint folder is on the driver, which version it is, what it can make."""

    uri: str
    path: Path
    name: str | None
    version: str | None
    alias: str | None
    sha256: str              # of the checkpoint folder's files: the weights actually used, even for a plain folder
    image_shape: tuple       # (H, W, C), as the images come out
    num_classes: int
    num_timesteps: int
    class_names: tuple
    autoencoder: Any = None  # a latent model's autoencoder source (uri, name, version, sha256); None for pixels

    @classmethod
    def resolve(cls, uri: str, tracking_uri: str | None = None) -> "ModelSource":
        """Resolve ``uri`` (registry or folder) and read the checkpoint once here, so that a bad one fails now."""
        from ddpm import checkpoint
        from pipelines.registry import resolve_model

        resolved = resolve_model(uri, tracking_uri)
        try:
            loaded = checkpoint.load(resolved.path, device="cpu")
        except checkpoint.CheckpointError as exc:
            raise UserError(f"{uri}: {exc}") from None
        channels, height, width = loaded.image_shape  # a latent model's decoded images
        decoder = checkpoint.read_config(resolved.path).get("autoencoder")  # where a latent model's came from
        return cls(uri, Path(resolved.path), resolved.name, resolved.version, resolved.alias,
                   _folder_sha256(Path(resolved.path)), (height, width, channels), loaded.config.num_classes,
                   loaded.schedule.num_timesteps, tuple(loaded.class_names),
                   decoder.get("source") if decoder else None)

    def identity(self) -> dict:
        """What a job's images depend on about the model (the alias is not: it may move to the same version)."""
        return {"uri": self.uri, "name": self.name, "version": self.version, "sha256": self.sha256,
                "autoencoder": self.autoencoder}

    def payload(self) -> dict[str, bytes]:
        """The checkpoint folder's files by relative name: what actors load the model from."""
        return {p.relative_to(self.path).as_posix(): p.read_bytes()
                for p in sorted(self.path.rglob("*")) if p.is_file()}


def _folder_sha256(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
            with p.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def load_payload(payload: dict[str, bytes], device, weights: str = "ema") -> Any:
    """A ``ddpm.checkpoint.LoadedModel`` (EMA weights unless ``weights`` = "model") from :meth:`ModelSource.payload`,
    written to a scratch folder."""
    from ddpm import checkpoint

    with tempfile.TemporaryDirectory(prefix="ddpm-model-") as tmp:
        for name, data in payload.items():
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return checkpoint.load(tmp, device=device, weights=weights)


def check_job(source: ModelSource, sampling: Sampling, labels: Labels, fmt: str | None = None) -> None:
    """Refuse, before anything runs, what this model cannot make: the rules of ``POST /generate``
    (``ddpm.settings``) plus the batch job's own (labels for every image, a format that holds the images)."""
    from ddpm.settings import SettingError, check_for_model, check_settings

    from pipelines.errors import flag_error

    class_label = labels.class_label if labels.kind == "class" else None
    try:
        if labels.kind in ("balanced", "given"):
            if source.num_classes == 0:
                raise SettingError("labels", "this model is unconditional: leave the labels out")
            class_label = 0  # stands for every class below: the guidance rule applies as for one class
        check_settings(sampler=sampling.sampler, steps=sampling.steps, eta=sampling.eta, seed=0,
                       class_label=class_label, guidance_scale=sampling.guidance_scale)
        check_for_model(steps=sampling.steps, class_label=class_label if labels.kind == "class" else None,
                        num_classes=source.num_classes, num_timesteps=source.num_timesteps)
        if labels.kind == "given" and len(labels.given) and not 0 <= labels.given.min() <= labels.given.max() \
                < source.num_classes:
            raise SettingError("labels", f"labels must be in 0..{source.num_classes - 1} for this model")
    except SettingError as exc:
        raise flag_error(exc) from None
    if sampling.forward_rows < 1:
        raise UserError(f"--batch-size must be at least 1, got {sampling.forward_rows}")
    if fmt == "png" and source.image_shape[2] not in (1, 3):
        raise UserError(f"--format png: this model makes {source.image_shape[2]}-channel images and PNG holds 1 "
                        f"(grey) or 3 (RGB); use --format parquet")


# ---------------------------------------------------------------------------------------------------------------
# Pixels in, digests out


def image_digests(images: np.ndarray) -> list[str]:
    """sha256 of each image's raw uint8 pixels (H, W, C, row-major)."""
    return [hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest() for img in images]


def fingerprint_of_digests(image_shape: Sequence[int], digests: Sequence[str]) -> str:
    h = hashlib.sha256("x".join(map(str, image_shape)).encode() + b"\0")
    for d in digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


def images_fingerprint(images: np.ndarray) -> str:
    """The manifest's fingerprint of (N, H, W, C) uint8 images, e.g. single-process ``ddpm generate``'s array."""
    return fingerprint_of_digests(images.shape[1:], image_digests(images))


def png_name(seed: int) -> str:
    return f"seed-{seed:06d}"


# ---------------------------------------------------------------------------------------------------------------
# Sinks: what an actor does with a shard's images


class Sink(Protocol):
    def setup(self, device) -> None: ...
    def committed(self, shard: int) -> dict | None: ...
    def put(self, shard: int, rows: range, seeds: list[int], labels, images: np.ndarray) -> dict: ...


class ShardWriter:
    """Writes a shard's images (PNG files or one Parquet file), then its commit file. Returns a small summary."""

    def __init__(self, output: str, fmt: str, endpoint_url: str | None, image_shape: Sequence[int]):
        self.output, self.fmt, self.endpoint_url, self.image_shape = output, fmt, endpoint_url, tuple(image_shape)

    def setup(self, device) -> None:
        pass

    def commit_uri(self, shard: int) -> str:
        return storage.join(self.output, "shards", f"shard-{shard:06d}.json")

    def committed(self, shard: int) -> dict | None:
        """A retried task (its actor died after the commit) finds the shard done and does not write it again."""
        if storage.exists(self.commit_uri(shard), self.endpoint_url):
            info = storage.read_json(self.commit_uri(shard), self.endpoint_url)
            return {"shard": shard, "count": len(info["seeds"]), "new": 0}
        return None

    def put(self, shard: int, rows: range, seeds: list[int], labels, images: np.ndarray) -> dict:
        from ddpm import encode_png

        digests = image_digests(images)
        per_image = None if labels is None else np.broadcast_to(np.asarray(labels), (len(rows),)).tolist()
        if self.fmt == "png":
            files = [f"images/{png_name(s)}.png" for s in seeds]
            with ThreadPoolExecutor(_IO_THREADS) as pool:
                list(pool.map(lambda fi: storage.write_bytes(storage.join(self.output, fi[0]), encode_png(fi[1]),
                                                             self.endpoint_url), zip(files, images)))
        else:
            files = [f"data/shard-{shard:06d}.parquet"]
            storage.write_bytes(storage.join(self.output, files[0]),
                                parquet_shard(images, seeds, per_image, digests), self.endpoint_url)
        commit = {"shard": shard, "first_index": rows.start, "seeds": seeds, "labels": per_image, "sha256": digests,
                  "files": files}
        storage.write_json(self.commit_uri(shard), commit, self.endpoint_url)  # the commit: after every image
        return {"shard": shard, "count": len(rows), "new": len(rows)}


def parquet_shard(images: np.ndarray, seeds: list[int], labels: list[int] | None, digests: list[str]) -> bytes:
    """One shard as Parquet bytes: ``pipelines.data.preprocess``'s schema (image, label, key, sha256) plus seed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, h, w, c = images.shape
    image_type = pa.binary(h * w * c)
    table = pa.Table.from_arrays(
        [pa.FixedSizeBinaryArray.from_buffers(image_type, n, [None, pa.py_buffer(np.ascontiguousarray(images))]),
         pa.array(labels if labels is not None else [-1] * n, pa.int64()),
         pa.array([png_name(s) for s in seeds], pa.string()),
         pa.array(digests, pa.string()),
         pa.array(seeds, pa.int64())],
        schema=pa.schema([pa.field("image", image_type, nullable=False), pa.field("label", pa.int64(), False),
                          pa.field("key", pa.string(), False), pa.field("sha256", pa.string(), False),
                          pa.field("seed", pa.int64(), False)]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# The actor


class ShardSampler:
    """Ray Data callable class: loads the model once per actor, then maps shard numbers to the sink's summaries."""

    def __init__(self, payload, plan: Plan, sampling: Sampling, labels: Labels, sink: Sink, threads: int,
                 use_gpu: bool, weights: str = "ema"):
        import ray
        import torch

        from ddpm.graphs import graphed_forward

        torch.set_num_threads(max(1, int(threads)))
        if use_gpu:
            if not torch.cuda.is_available():
                raise UserError("--use-gpu: this actor was given a GPU but PyTorch sees none (CUDA build?)")
            # what the endpoint's replicas do (deploy.engine.pick_device): kernels that do not vary run to run
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        self.device = torch.device("cuda" if use_gpu else "cpu")
        payload = payload[0]
        if isinstance(payload, ray.ObjectRef):
            payload = ray.get(payload)
        self.loaded = load_payload(payload, self.device, weights)
        self.forward = graphed_forward(self.loaded.model, sampling.forward_rows)  # the endpoint's network call
        self.plan, self.sampling, self.labels, self.sink = plan, sampling, labels, sink
        self.sink.setup(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [self.shard(int(j)) for j in batch["shard"]]
        # bytes as objects: a NumPy bytes dtype would drop trailing zero bytes of packed arrays
        return {key: np.array([row[key] for row in out], dtype=object if isinstance(out[0][key], bytes) else None)
                for key in out[0]}

    def shard(self, shard: int) -> dict:
        from ddpm import generate_images

        done = self.sink.committed(shard)
        if done is not None:
            return done | {"seconds": 0.0}
        rows = self.plan.rows(shard)
        seeds = self.plan.seeds(rows)
        labels = self.labels.at(rows.start, rows.stop)
        start = time.perf_counter()
        s = self.sampling
        images = generate_images(self.loaded, seeds, class_labels=labels, sampler=s.sampler, steps=s.steps, eta=s.eta,
                                 guidance_scale=s.guidance_scale, forward=self.forward, batch_size=len(seeds))
        seconds = time.perf_counter() - start
        return self.sink.put(shard, rows, seeds, labels, images) | {"seconds": seconds}


# ---------------------------------------------------------------------------------------------------------------
# Running it


def actor_count(num_actors: int | None, use_gpu: bool, cpus_per_actor: float, shards: int) -> int:
    """``num_actors``, or one per GPU of the cluster (``use_gpu``), or one per ``cpus_per_actor`` CPUs; never more
    than there are shards to make."""
    import ray

    if num_actors is not None:
        if num_actors < 1:
            raise UserError(f"--num-actors must be at least 1, got {num_actors}")
        return max(1, min(num_actors, shards))
    resources = ray.cluster_resources()
    if use_gpu:
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise UserError("--use-gpu: the Ray cluster has no GPU; leave --use-gpu out to sample on CPUs")
        return max(1, min(gpus, shards))
    return max(1, min(int(resources.get("CPU", 1) // cpus_per_actor), shards))


def run_shards(source: ModelSource, plan: Plan, sampling: Sampling, labels: Labels, sink: Sink, shards: list[int], *,
               num_actors: int | None = None, cpus_per_actor: float = 1, use_gpu: bool = False,
               on_row: Callable[[dict], None] = lambda row: None, weights: str = "ema",
               errors_name: str = "") -> int:
    """Map sampler actors over ``shards``; ``on_row`` gets each shard's summary on the driver as it comes back.

    Returns the number of actors used. Memory stays bounded at any N: shards flow through Ray Data's streaming
    executor and only their summaries reach the driver.
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pipelines.ray_utils import init_ray

    if not shards:
        return 0
    init_ray()
    context = DataContext.get_current()
    context.enable_progress_bars = False  # the job prints its own line: images/s and the time left
    actors = actor_count(num_actors, use_gpu, cpus_per_actor, len(shards))
    threads = max(1, int(cpus_per_actor))
    payload = ray.put(source.payload())
    ds = ray.data.from_items([{"shard": j} for j in shards], override_num_blocks=min(len(shards), 4096))
    ds = ds.map_batches(
        ShardSampler, batch_size=1, compute=ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor, num_gpus=1 if use_gpu else 0,
        fn_constructor_kwargs=dict(payload=[payload], plan=plan, sampling=sampling, labels=labels, sink=sink,
                                   threads=threads, use_gpu=use_gpu, weights=weights),
    )
    try:
        for row in ds.iter_rows():
            on_row(row)
    except Exception as exc:
        raise user_error_in(exc, errors_name) from exc
    return actors


def user_error_in(exc: BaseException, name: str) -> BaseException:
    """The one-line error a failed Ray Data run means: a UserError raised in an actor, a store error it quotes, or
    the exception itself."""
    seen, current = set(), exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, UserError):
            return current
        cause = getattr(current, "cause", None)
        current = current.__cause__ or (cause if isinstance(cause, BaseException) else None) or current.__context__
    text = str(exc)
    if "UserError: " in text:  # raised in an actor and re-raised here as a wrapper quoting it
        return UserError(text.split("UserError: ", 1)[1].strip().splitlines()[0])
    reason = storage.explain(text)
    if reason is not None:
        return UserError(f"{name}: {reason}" if name else reason)
    return exc


def generate_to(output: str, source: ModelSource, plan: Plan, sampling: Sampling, labels: Labels, *,
                fmt: str = "png", num_actors: int | None = None, cpus_per_actor: float = 1, use_gpu: bool = False,
                endpoint_url: str | None = None, progress: bool = True,
                log: Callable[[str], None] = print) -> dict:
    """Generate ``plan``'s images into ``output`` (a folder or an ``s3://`` prefix); returns the manifest.

    Resumes: shards committed by an earlier run with the same job are kept, the rest are generated (module
    docstring). ``progress``: print a line on stderr every few seconds (images done, this run's images/s, time left).
    """
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if plan.num_images < 1 or plan.shard_images < 1:
        raise UserError("--num-images and --shard-size must be at least 1")
    sampling = sampling.resolved()
    check_job(source, sampling, labels, fmt)
    endpoint_url = storage.resolve_endpoint(endpoint_url)  # resolved once here, so every actor uses the same one
    job = describe_job(source, plan, sampling, labels, fmt, use_gpu)

    # 1. What is there: the first request, so a missing bucket or an unreachable store fails before any work.
    if "://" not in output and Path(output).is_file():
        raise UserError(f"--output {output}: is a file; give a folder, an s3:// prefix, or a .png/.npz file name")
    listing = {e.key for e in storage.list_files(output, endpoint_url)}
    if JOB in listing:
        _check_same_job(output, storage.read_json(storage.join(output, JOB), endpoint_url), job)
    else:
        storage.write_json(storage.join(output, JOB), job, endpoint_url)
    committed = committed_shards(listing, plan, fmt)
    missing = [j for j in range(plan.num_shards) if j not in committed]
    already = sum(len(plan.rows(j)) for j in committed)

    # 2. The missing shards, on sampler actors.
    if missing:
        if MANIFEST in listing:  # the output is changing: no manifest vouches for it until the end
            _delete_file(storage.join(output, MANIFEST), endpoint_url)
        for key in sorted(listing):  # leftovers of a local write that died between its temporary file and rename
            if ".tmp-" in key.rsplit("/", 1)[-1]:
                _delete_file(storage.join(output, key), endpoint_url)
        for j in missing:  # a commit whose images went missing vouches for nothing: the actor must not skip it
            if f"shards/shard-{j:06d}.json" in listing:
                _delete_file(storage.join(output, "shards", f"shard-{j:06d}.json"), endpoint_url)
        if "://" not in output:
            _warn_if_local_on_many_nodes(output, log)
        log(f"[generate] {len(committed)} of {plan.num_shards} shards already in {output}; generating "
            f"{plan.num_images - already:,} images in {len(missing)} shards")
        done, started, new = [already], time.monotonic(), [0]
        line = ProgressLine(plan.num_images, already=already) if progress else None

        def on_row(row: dict) -> None:
            done[0] += int(row["count"])
            new[0] += int(row["new"])
            if line is not None:
                line(done[0])

        sink = ShardWriter(output, fmt, endpoint_url, source.image_shape)
        actors = run_shards(source, plan, sampling, labels, sink, missing, num_actors=num_actors,
                            cpus_per_actor=cpus_per_actor, use_gpu=use_gpu, on_row=on_row, errors_name=output)
        seconds = time.monotonic() - started
        log(f"[generate] {new[0]:,} images in {seconds:.1f} s with {actors} actor(s): "
            f"{new[0] / max(seconds, 1e-9):.1f} images/s")
    elif MANIFEST in listing:
        log(f"[generate] {output} is complete already ({plan.num_images:,} images)")
        return storage.read_json(storage.join(output, MANIFEST), endpoint_url)

    # 3. Commit: the manifest, from the shards' own commit files.
    manifest = build_manifest(output, job, plan, fmt, source, labels, endpoint_url)
    storage.write_json(storage.join(output, MANIFEST), manifest, endpoint_url)
    return manifest


def _warn_if_local_on_many_nodes(output: str, log: Callable[[str], None]) -> None:
    import ray

    from pipelines.ray_utils import init_ray

    init_ray()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes > 1:
        log(f"[generate] warning: --output {output} is a local path and the cluster has {nodes} nodes: each actor "
            f"writes to its own node's disk, so unless the path is a shared filesystem, use an s3:// prefix")


def _delete_file(uri: str, endpoint_url: str | None) -> None:
    fs, path = storage.filesystem_for(uri, endpoint_url)
    with storage.user_errors(uri, endpoint_url):
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass


def describe_job(source: ModelSource, plan: Plan, sampling: Sampling, labels: Labels, fmt: str,
                 use_gpu: bool) -> dict:
    """job.json: everything the images depend on (the device type too: GPU kernels and bf16 give other bits)."""
    return {"kind": KIND, "version": JOB_VERSION, "model": source.identity(), "sampling": asdict(sampling.resolved()),
            "seeds": plan.describe(), "labels": labels.describe(), "format": fmt, "shard_images": plan.shard_images,
            "image_shape": list(source.image_shape), "device": "cuda" if use_gpu else "cpu"}


def _check_same_job(output: str, existing: dict, job: dict) -> None:
    if existing.get("kind") != KIND:
        raise UserError(f"{output}: holds other files ({JOB} is not a ddpm generate job); choose another --output")
    def compared(d: dict) -> dict:  # the same version reached by another URI (an alias, a path) is the same model
        return d | {"model": {k: v for k, v in (d.get("model") or {}).items() if k != "uri"}}

    existing, job = compared(existing), compared(job)
    differs = [key for key in sorted(set(existing) | set(job)) if existing.get(key) != job.get(key)]
    if differs:
        first = differs[0]
        raise UserError(f"{output}: holds images of another job ({', '.join(differs)} differ, e.g. {first}: "
                        f"{json.dumps(existing.get(first), sort_keys=True)} there, "
                        f"{json.dumps(job.get(first), sort_keys=True)} now); rerun with the same arguments to "
                        f"resume, or choose another --output")


def committed_shards(listing: set[str], plan: Plan, fmt: str) -> set[int]:
    """Shards whose commit file and every image file are in ``listing`` (keys relative to the output)."""
    done = set()
    for j in range(plan.num_shards):
        if f"shards/shard-{j:06d}.json" not in listing:
            continue
        if fmt == "png":
            files = [f"images/{png_name(s)}.png" for s in plan.seeds(plan.rows(j))]
        else:
            files = [f"data/shard-{j:06d}.parquet"]
        if all(f in listing for f in files):
            done.add(j)
    return done


def build_manifest(output: str, job: dict, plan: Plan, fmt: str, source: ModelSource, labels: Labels,
                   endpoint_url: str | None) -> dict:
    """job.json's fields, counts, the fingerprint; for Parquet also what ``pipelines.data.dataset`` reads."""
    uris = [storage.join(output, "shards", f"shard-{j:06d}.json") for j in range(plan.num_shards)]
    h = hashlib.sha256("x".join(map(str, source.image_shape)).encode() + b"\0")
    with ThreadPoolExecutor(16) as pool:  # in order, a window of reads at a time: memory bounded at any N
        for start in range(0, len(uris), 256):
            for commit in pool.map(lambda u: storage.read_json(u, endpoint_url), uris[start:start + 256]):
                for d in commit["sha256"]:
                    h.update(bytes.fromhex(d))
    per_class = labels.counts(plan.num_images, source.num_classes)
    class_names = list(source.class_names) or [str(c) for c in range(source.num_classes)]
    manifest = {**job, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "fingerprint": h.hexdigest(),
                "counts": {"rows": plan.num_images, "shards": plan.num_shards,
                           "per_class": dict(zip(class_names, per_class)) if per_class is not None else {}}}
    if fmt == "png":
        manifest["files"] = "images/seed-<seed, at least 6 digits>.png for each seed of the range"
    else:  # a dataset manifest too (pipelines.data.dataset.read_manifest)
        manifest |= {"format_version": DATASET_FORMAT_VERSION, "class_names": class_names if per_class else [],
                     "shards": [f"data/shard-{j:06d}.parquet" for j in range(plan.num_shards)],
                     "source": source.uri}
    return manifest
