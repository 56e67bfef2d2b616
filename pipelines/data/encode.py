"""``ddpm encode``: map an autoencoder's encoder over a processed dataset with Ray Data, writing a latent dataset.

Latent diffusion (Rombach et al. 2022) trains the diffusion model on ``ae.encode(x)`` rather than on pixels. The
latents of a dataset do not change from one epoch to the next, so they are computed once, here, and training reads
them like any other dataset (:mod:`pipelines.data.dataset`).

The work, and where it runs::

    driver  read the source manifest; resolve and load the autoencoder (registry or folder); check the images fit it
            (channels, sides divisible by f); save the autoencoder in our folder format (a diffusers folder is
            converted) and put those bytes in the object store, so actors need no registry or driver disk
    driver  cut the source shards (row counts from their Parquet footers) into pieces of at most ``shard_rows``
    actors  ActorPoolStrategy, one per GPU with --use-gpu, else CPU actors with their CPUs' worth of torch threads;
            each loads the autoencoder once, then per piece: read its rows from the source shard -> uint8
            (B, H, W, C) -> [-1, 1] -> encoder in chunks of exactly ``forward_rows`` rows (the last one padded) ->
            latents (B, h, w, c) float32 channels last -> one Parquet shard, written whole (one PUT, or a rename on
            a local disk); only a small summary row comes back, so pixels never pass through the driver, and no
            Ray Data read or write task needs a CPU beside the actors.
    driver  progress from the summaries; then OUTPUT/autoencoder/ (the copy the latents were made with) and
            manifest.json, written last and atomically; then the previous generation is deleted

Output layout (what the training code reads; see :mod:`pipelines.data.dataset`)::

    OUTPUT/manifest.json            kind "latents", dtype float32, image_shape [h, w, c], pixel_shape [H, W, C],
                                    shards, counts, fingerprint, source, autoencoder, flip, created
    OUTPUT/autoencoder/             config.json + model.safetensors (ddpm.autoencoder's format)
    OUTPUT/data-<run>/part-*.parquet   the shards of the generation that manifest.json names
    OUTPUT/_tmp-<run>/              a run's scratch, deleted when the run ends

Shard columns: ``image`` fixed_size_binary(h*w*c*4), the latent as float32 in row-major (h, w, c) order; ``label``
int64, ``key`` and ``sha256`` strings copied from the source row (the mirrored copy of ``--flip`` has key + "#flip").

Exactness: the encoder always runs on ``forward_rows`` rows at a time (``ddpm.fixed_size_forward``'s idea), so an
image's latent does not depend on which other images shared its batch, its actor, or the number of actors: it is,
bit for bit, what a single-process loop of the same chunk size and thread count gives (tests/pipelines/
test_encode.py).

``--flip``: a random flip cannot be applied to latents at training time (the mirror of a latent is not the latent
of the mirrored image), so both are stored: 2N rows.

One run at a time per OUTPUT, as for ``ddpm preprocess``. A run that dies before its commit leaves the previous
output readable, except in one window: the autoencoder copy is written just before manifest.json, so a run with
another autoencoder that dies between the two leaves a copy whose sha256 differs from the manifest's (a reader can
tell by comparing them; the next successful run repairs it).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipelines import storage
from pipelines.errors import UserError

HELP = "encode a processed dataset into an autoencoder's latents with Ray Data actors (latent diffusion)"
EXAMPLE = """example:
  ddpm preprocess --input s3://my-bucket/raw/photos --output s3://my-bucket/processed/photos \\
      --resolution 64 --channels 3
  ddpm encode --data s3://my-bucket/processed/photos --autoencoder models:/photos-ae@production \\
      --output s3://my-bucket/latents/photos --flip

  The output holds Parquet shards of float32 latents (h, w, c), label, key and sha256, a copy of the autoencoder
  (autoencoder/) and manifest.json, written last. --flip also stores each image's left-right mirror (2N rows).
  --autoencoder also takes a local folder: ours, or a downloaded diffusers AutoencoderKL (converted).
"""

KIND, DTYPE = "latents", "float32"
AUTOENCODER_FOLDER = "autoencoder"
FLIP_SUFFIX = "#flip"
DEFAULT_BATCH_SIZE = 64  # rows per encoder call (the last chunk of a shard is padded to it)
CPUS_PER_ACTOR = 2  # default: one CPU actor per this many CPUs of the cluster (see benchmarks/encode.py)
PROGRESS_EVERY_S = 10.0
_SHARD_BYTES = 64 * 2**20  # source pixels per actor call and per output shard, at most


# ---------------------------------------------------------------------------------------------------------------
# The encoding itself (runs in the actors; also what a single process would do)


def encode_fixed(ae, images: np.ndarray, rows: int, mirror: bool = False):
    """``ae.encode`` of uint8 images (B, H, W, C), always ``rows`` images per call, the last chunk zero-padded:
    (B, h, w, c) float32 latents, channels last, each independent of its batch-mates. ``mirror``: of the images'
    left-right mirrors. One chunk at a time is converted to float, so memory stays at the uint8 input plus the
    latents."""
    import torch

    from ddpm import from_uint8

    device = next(ae.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), rows):
            x = from_uint8(images[start:start + rows]).to(device)  # (n, C, H, W) in [-1, 1]
            if mirror:
                x = x.flip(-1)  # along W
            chunk = x.new_zeros((rows, *x.shape[1:]))  # (rows, C, H, W): a fresh buffer of the same shape every call
            chunk[:len(x)] = x
            z = ae.encode(chunk)[:len(x)]  # (n, c, h, w)
            out.append(z.permute(0, 2, 3, 1).float().cpu().numpy())  # (n, h, w, c)
    return np.ascontiguousarray(np.concatenate(out))


def encode_images(ae, images: np.ndarray, rows: int, flip: bool = False) -> np.ndarray:
    """uint8 images (B, H, W, C) -> latents (B, h, w, c) float32, channels last; with ``flip`` (2B, h, w, c): the
    images' latents, then their left-right mirrors'."""
    latents = encode_fixed(ae, images, rows)
    if flip:
        latents = np.concatenate([latents, encode_fixed(ae, images, rows, mirror=True)])
    return latents


def shard_bytes(latents: np.ndarray, labels: np.ndarray, keys: list[str], digests: list[str]) -> bytes:
    """One shard as Parquet bytes: image (float32 h*w*c, row-major), label, key, sha256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, h, w, c = latents.shape
    image_type = pa.binary(h * w * c * 4)
    data = np.ascontiguousarray(latents, dtype="<f4")
    table = pa.Table.from_arrays(
        [pa.FixedSizeBinaryArray.from_buffers(image_type, n, [None, pa.py_buffer(data)]),
         pa.array(labels, pa.int64()), pa.array(keys, pa.string()), pa.array(digests, pa.string())],
        schema=pa.schema([pa.field("image", image_type, nullable=False), pa.field("label", pa.int64(), False),
                          pa.field("key", pa.string(), False), pa.field("sha256", pa.string(), False)]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


class LatentEncoder:
    """Ray Data callable class: loads the autoencoder once per actor, then turns each batch of source rows into one
    latent shard under the generation folder and returns its summary."""

    def __init__(self, payload, data_uri: str, pixel_shape, generation: str, output_uri: str,
                 endpoint_url: str | None, forward_rows: int, flip: bool, threads: int, use_gpu: bool):
        import ray
        import torch

        torch.set_num_threads(max(1, int(threads)))
        if use_gpu:
            if not torch.cuda.is_available():
                raise UserError("--use-gpu: this actor was given a GPU but PyTorch sees none (CUDA build?)")
            torch.backends.cudnn.benchmark = False  # the same kernels for every chunk
            torch.backends.cudnn.deterministic = True
        payload = payload[0]
        if isinstance(payload, ray.ObjectRef):
            payload = ray.get(payload)
        self.ae = _load_payload(payload, "cuda" if use_gpu else "cpu")
        self.pixel_shape = tuple(pixel_shape)
        self.data_uri = data_uri
        self._cached: tuple[str, Any] | None = None  # the last source shard read: pieces of one often follow
        self.generation, self.output_uri, self.endpoint_url = generation, output_uri, endpoint_url
        self.forward_rows, self.flip = forward_rows, flip

    def _source(self, shard: str):
        """The source shard's rows (a pyarrow Table), read once per run of consecutive pieces of it."""
        import pyarrow.parquet as pq

        if self._cached is None or self._cached[0] != shard:
            self._cached = None  # free the previous one first
            fs, root = storage.filesystem_for(self.data_uri, self.endpoint_url)
            with storage.user_errors(storage.join(self.data_uri, shard), self.endpoint_url):
                table = pq.read_table(f"{root}/{shard}", filesystem=fs, columns=["image", "label", "key", "sha256"])
            self._cached = (shard, table)
        return self._cached[1]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [self.piece(str(s), int(a), int(b)) for s, a, b in zip(batch["shard"], batch["start"], batch["stop"])]
        return {key: np.array([o[key] for o in out], dtype=object if key == "shard" else None) for key in out[0]}

    def piece(self, source_shard: str, start: int, stop: int) -> dict:
        from pipelines.data.dataset import images_from_arrow

        began = time.perf_counter()
        rows = self._source(source_shard).slice(start, stop - start)
        images = images_from_arrow(rows.column("image"), self.pixel_shape, np.uint8)  # (B, H, W, C)
        keys = rows.column("key").to_pylist()
        labels = rows.column("label").to_numpy().astype(np.int64)
        digests = rows.column("sha256").to_pylist()
        latents = encode_images(self.ae, images, self.forward_rows, self.flip)  # (B or 2B, h, w, c)
        if self.flip:
            keys = keys + [k + FLIP_SUFFIX for k in keys]
            labels, digests = np.concatenate([labels, labels]), digests + digests
        # Named after its rows, so that a retried call overwrites its own shard rather than adding a second one.
        name = hashlib.sha256(f"{keys[0]}\0{len(keys)}".encode()).hexdigest()[:16]
        shard = f"{self.generation}/part-{name}.parquet"
        storage.write_bytes(storage.join(self.output_uri, shard), shard_bytes(latents, labels, keys, digests),
                            self.endpoint_url)
        return {"shard": shard, "rows": len(keys), "images": len(images), "seconds": time.perf_counter() - began}


def _load_payload(payload: dict[str, bytes], device: str):
    from ddpm import autoencoder

    with tempfile.TemporaryDirectory(prefix="ddpm-ae-") as tmp:
        for name, data in payload.items():
            (Path(tmp) / name).write_bytes(data)
        return autoencoder.load(tmp, device=device)


# ---------------------------------------------------------------------------------------------------------------
# The run


def fingerprint(source_fingerprint: str, autoencoder_sha256: str, flip: bool, scaling_factor: float = 1.0,
                shift_factor: float = 0.0) -> str:
    """sha256 of what the latents depend on: the source images, the autoencoder's weights, whether mirrors are
    included, and the scaling and shift (they live in config.json, not in the weights file, and change every
    latent)."""
    settings = {"source": source_fingerprint, "autoencoder": autoencoder_sha256, "flip": bool(flip),
                "scaling_factor": float(scaling_factor), "shift_factor": float(shift_factor)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def actor_plan(num_actors: int | None, use_gpu: bool) -> tuple[int, float, int]:
    """(actors, CPUs per actor, torch threads per actor) for the connected cluster.

    GPU: one actor per GPU (or ``num_actors``), one CPU each. CPU: ``num_actors`` actors (default one per
    ``CPUS_PER_ACTOR`` CPUs) splitting the cluster's CPUs between them, never more than one node holds; an actor's
    torch threads are its CPUs.
    """
    import ray

    if num_actors is not None and num_actors < 1:
        raise UserError(f"--num-actors must be at least 1, got {num_actors}")
    resources = ray.cluster_resources()
    if use_gpu:
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise UserError("--use-gpu: the Ray cluster has no GPU; leave --use-gpu out to encode on CPUs")
        if num_actors is not None and num_actors > gpus:
            raise UserError(f"--num-actors {num_actors}: the Ray cluster has {gpus} GPU(s), one per actor")
        return (num_actors or gpus), 1, 1
    cpus = max(1, int(resources.get("CPU", 1)))
    if num_actors is not None and num_actors > cpus:
        raise UserError(f"--num-actors {num_actors}: the Ray cluster has {cpus} CPU(s), at least one per actor")
    node_cpus = max([int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [cpus])
    actors = num_actors or max(1, cpus // CPUS_PER_ACTOR)
    per_actor = max(1, min(cpus // actors, max(1, node_cpus)))
    return actors, per_actor, per_actor


def encode(
    data_uri: str,
    autoencoder_uri: str,
    output_uri: str,
    *,
    num_actors: int | None = None,
    use_gpu: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    flip: bool = False,
    tracking_uri: str | None = None,
    endpoint_url: str | None = None,
    shard_rows: int | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """Encode the processed dataset at ``data_uri`` with the autoencoder ``autoencoder_uri`` (``models:/NAME/VERSION``,
    ``models:/NAME@ALIAS`` or a folder) into a latent dataset at ``output_uri``; returns the manifest written.

    ``batch_size``: images per encoder call (fixed; the last chunk of a shard is padded). ``shard_rows``: source
    images per actor call and per output shard (default: a multiple of ``batch_size``, about 4 per actor, at most
    64 MiB of pixels). ``progress`` gets a line every ``PROGRESS_EVERY_S`` seconds and a final one.
    """
    from ddpm import autoencoder as ae_format

    from pipelines.data.dataset import MANIFEST, is_latent, read_manifest
    from pipelines.registry import resolve_autoencoder
    from pipelines.tracking import redact_uri

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if num_actors is not None and num_actors < 1:
        raise UserError(f"--num-actors must be at least 1, got {num_actors}")
    log = progress or (lambda _: None)
    endpoint_url = storage.resolve_endpoint(endpoint_url)  # resolved once here, so every actor uses the same one

    # 1. Driver: the source, the autoencoder, and whether they fit together.
    source = read_manifest(data_uri, endpoint_url=endpoint_url)
    if is_latent(source):
        origin = source.get("source")
        origin = origin.get("uri") if isinstance(origin, dict) else origin
        raise UserError(f"{data_uri}: is a latent dataset already (made by ddpm encode); give the processed images "
                        f"it was encoded from{f' ({origin})' if origin else ''}")
    resolved = resolve_autoencoder(autoencoder_uri, tracking_uri)
    try:
        ae = ae_format.load(resolved.path)
    except ae_format.AutoencoderError as exc:
        raise UserError(f"{autoencoder_uri}: {exc}") from None
    height, width, channels = (int(v) for v in source["image_shape"])
    cfg, f = ae.config, ae.downsample_factor
    if channels != cfg.in_channels:
        raise UserError(f"{data_uri}: images have {channels} channel(s) but the autoencoder {autoencoder_uri} takes "
                        f"{cfg.in_channels}; preprocess with --channels {cfg.in_channels}")
    if height % f or width % f:
        raise UserError(f"{data_uri}: images of {height}x{width} pixels do not fit the autoencoder "
                        f"{autoencoder_uri}: their sides must be divisible by its downsampling factor f = {f}")
    c, h, w = ae.latent_shape((channels, height, width))
    total = int(source["counts"]["rows"])
    if total < 1 or not source.get("shards"):
        raise UserError(f"{data_uri}: the dataset has no rows")

    # The autoencoder as the actors will use it and the output will keep it: our format, its scaling included.
    with tempfile.TemporaryDirectory(prefix="ddpm-encode-") as tmp:
        ae_format.save(Path(tmp), ae, metadata={"registered_name": resolved.name, "version": resolved.version})
        payload = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    del ae
    weights_sha = hashlib.sha256(payload[ae_format.WEIGHTS_FILE]).hexdigest()

    # 2. A new generation next to whatever is committed now; the first write checks that OUTPUT is writable.
    run = uuid.uuid4().hex[:12]
    generation, scratch_uri = f"data-{run}", storage.join(output_uri, f"_tmp-{run}")
    generation_uri = storage.join(output_uri, generation)
    storage.write_json(storage.join(scratch_uri, "started.json"),
                       {"data": redact_uri(data_uri), "autoencoder": redact_uri(autoencoder_uri), "flip": flip},
                       endpoint_url)
    try:
        started = time.monotonic()
        shards, rows = _run_actors(
            data_uri, source, payload, generation, output_uri, endpoint_url, num_actors=num_actors,
            use_gpu=use_gpu, batch_size=batch_size, shard_rows=shard_rows, flip=flip, log=log)
        seconds = time.monotonic() - started
        expected = total * (2 if flip else 1)
        if rows != expected:
            raise UserError(f"{output_uri}: wrote {rows} rows, expected {expected}; nothing was committed")

        # 3. Commit: the autoencoder copy (weights before config.json), then manifest.json in one atomic write.
        for name in (ae_format.WEIGHTS_FILE, ae_format.CONFIG_FILE):
            storage.write_bytes(storage.join(output_uri, AUTOENCODER_FOLDER, name), payload[name], endpoint_url)
        per_class = {name: int(n) * (2 if flip else 1) for name, n in source["counts"].get("per_class", {}).items()}
        manifest = {
            "format_version": source["format_version"],
            "kind": KIND,
            "dtype": DTYPE,
            "image_shape": [h, w, c],
            "pixel_shape": [height, width, channels],
            "class_names": list(source.get("class_names", [])),
            "counts": {"rows": rows, "per_class": per_class},
            "shards": shards,
            "fingerprint": fingerprint(source["fingerprint"], weights_sha, flip, cfg.scaling_factor,
                                       cfg.shift_factor),
            "source": {"uri": redact_uri(data_uri), "fingerprint": source["fingerprint"]},
            "autoencoder": {
                "uri": redact_uri(autoencoder_uri), "name": resolved.name, "version": resolved.version,
                "sha256": weights_sha, "scaling_factor": cfg.scaling_factor, "shift_factor": cfg.shift_factor,
                "downsample_factor": f, "latent_channels": cfg.latent_channels, "folder": AUTOENCODER_FOLDER,
            },
            "flip": bool(flip),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        storage.write_json(storage.join(output_uri, MANIFEST), manifest, endpoint_url)
    except BaseException:
        _delete_quietly(generation_uri, endpoint_url)  # no manifest names it
        raise
    finally:
        _delete_quietly(scratch_uri, endpoint_url)

    # 4. Only now is the previous generation unreferenced: delete it, with any leftovers of crashed runs.
    _delete_stale(output_uri, keep=generation, endpoint_url=endpoint_url)
    log(f"[encode] {rows:,} rows of latents {h}x{w}x{c} (from {height}x{width}x{channels} images"
        f"{', with mirrors' if flip else ''}) in {seconds:.1f} s: {rows / max(seconds, 1e-9):,.1f} images/s "
        f"-> {redact_uri(output_uri)}")
    return manifest


def _work_items(data_uri: str, shards: list[str], shard_rows: int, endpoint_url: str | None) -> list[dict]:
    """(source shard, first row, end row) pieces of at most ``shard_rows`` rows, from the shards' Parquet footers."""
    import pyarrow.parquet as pq
    from concurrent.futures import ThreadPoolExecutor

    fs, root = storage.filesystem_for(data_uri, endpoint_url)

    def rows_in(shard: str) -> int:
        with fs.open_input_file(f"{root}/{shard}") as f:
            return pq.ParquetFile(f).metadata.num_rows

    with storage.user_errors(data_uri, endpoint_url), ThreadPoolExecutor(16) as pool:
        counts = list(pool.map(rows_in, shards))
    return [{"shard": shard, "start": start, "stop": min(start + shard_rows, n)}
            for shard, n in zip(shards, counts) for start in range(0, n, shard_rows)]


def _run_actors(data_uri: str, source: dict, payload: dict[str, bytes], generation: str, output_uri: str,
                endpoint_url: str | None, *, num_actors: int | None, use_gpu: bool, batch_size: int,
                shard_rows: int | None, flip: bool, log: Callable[[str], None]) -> tuple[list[str], int]:
    """Ray Data: pieces of the source shards -> LatentEncoder actors (which read their piece, encode it and write
    one latent shard) -> summaries; returns (sorted shard paths, rows).

    The actors read the pixels themselves, as the sampler actors of ``ddpm generate`` write theirs: no Ray Data read
    or write task needs a CPU beside the actors (with every CPU held by an actor, such tasks would wait forever),
    and only a few integers per shard travel through the driver.
    """
    import ray
    from ray.data import ActorPoolStrategy

    from pipelines.generate.batch import user_error_in
    from pipelines.ray_utils import init_ray

    init_ray()
    actors, cpus, threads = actor_plan(num_actors, use_gpu)
    total = int(source["counts"]["rows"])
    pixel_bytes = math.prod(int(v) for v in source["image_shape"])
    if shard_rows is None:
        # About 4 pieces per actor evens out the last wave; at most 64 MiB of pixels bounds an actor's memory.
        balanced = math.ceil(total / (4 * actors))
        shard_rows = max(1, min(balanced, _SHARD_BYTES // pixel_bytes))
        shard_rows = batch_size * math.ceil(shard_rows / batch_size)  # whole encoder calls, but for the last
    items = _work_items(data_uri, list(source["shards"]), shard_rows, endpoint_url)
    actors = max(1, min(actors, len(items)))
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4096))
    ds = ds.map_batches(
        LatentEncoder, batch_size=1, compute=ActorPoolStrategy(size=actors), num_cpus=cpus,
        num_gpus=1 if use_gpu else 0,
        fn_constructor_kwargs=dict(payload=[ray.put(payload)], data_uri=data_uri, pixel_shape=source["image_shape"],
                                   generation=generation, output_uri=output_uri, endpoint_url=endpoint_url,
                                   forward_rows=batch_size, flip=flip, threads=threads, use_gpu=use_gpu),
    )
    log(f"[encode] {total:,} images from {data_uri} on {actors} {'GPU' if use_gpu else 'CPU'} actor(s)"
        f"{'' if use_gpu else f' of {cpus:g} CPU(s)'}: {len(items)} shards of up to {shard_rows} images, "
        f"{batch_size} per encoder call")
    shards, done, rows = set(), 0, 0
    started = last = time.monotonic()
    try:
        for row in ds.iter_rows():
            shards.add(str(row["shard"]))
            done, rows = done + int(row["images"]), rows + int(row["rows"])
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S and done < total:
                last = now
                log(f"[encode] {done:,}/{total:,} images ({100 * done / total:3.0f}%)  "
                    f"{done / (now - started):,.1f} images/s  {now - started:.0f} s")
    except Exception as exc:
        error = user_error_in(exc, output_uri)
        if error is exc:
            raise
        raise error from exc
    return sorted(shards), rows


def _delete_quietly(uri: str, endpoint_url: str | None) -> None:
    from pipelines.data.preprocess import _delete_quietly as delete

    delete(uri, endpoint_url)


def _delete_stale(output_uri: str, *, keep: str, endpoint_url: str | None) -> None:
    """Every generation and scratch prefix but ``keep`` (preprocess's rule; the autoencoder/ folder stays)."""
    from pipelines.data.preprocess import _delete_stale as delete

    delete(output_uri, keep=keep, endpoint_url=endpoint_url)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="URI",
                        help="a processed dataset (the --output of ddpm preprocess): s3://bucket/prefix or a folder")
    parser.add_argument("--autoencoder", required=True, metavar="URI",
                        help="models:/NAME/VERSION, models:/NAME@ALIAS, or a local autoencoder folder (ours or a "
                             "diffusers AutoencoderKL)")
    parser.add_argument("--output", required=True, metavar="URI", help="where the latent shards and manifest go")
    parser.add_argument("--num-actors", type=int, default=None, metavar="A",
                        help=f"encoder actors (default: one per GPU with --use-gpu, else one per {CPUS_PER_ACTOR} "
                             f"CPUs of the cluster); each loads the autoencoder once and gets its share of the CPUs "
                             f"as torch threads")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="B",
                        help=f"images per encoder call, fixed (the last chunk is padded), so that a latent never "
                             f"depends on its batch-mates (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--flip", action="store_true",
                        help="also store each image's left-right mirror's latent (2N rows): flips cannot be applied "
                             "to latents at training time")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow server for a models:/ URI (default: $MLFLOW_TRACKING_URI, else the embedded "
                             "store)")
    parser.add_argument("--endpoint-url", default=None, metavar="URL",
                        help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL, else AWS)")


def main(args: argparse.Namespace) -> int:
    manifest = encode(args.data, args.autoencoder, args.output, num_actors=args.num_actors, use_gpu=args.use_gpu,
                      batch_size=args.batch_size, flip=args.flip, tracking_uri=args.tracking_uri,
                      endpoint_url=args.endpoint_url)
    ae: dict[str, Any] = manifest["autoencoder"]
    which = f"{ae['name']} version {ae['version']}" if ae["name"] else ae["uri"]
    print(f"wrote {manifest['counts']['rows']} latents ({'x'.join(map(str, manifest['image_shape']))}) of {which} "
          f"to {args.output} in {len(manifest['shards'])} shards; fingerprint {manifest['fingerprint'][:12]}")
    return 0
