"""``ddpm encode``: map an autoencoder's encoder over a processed dataset with Ray Data, writing a latent dataset.

Latent diffusion (Rombach et al. 2022) trains the diffusion model on ``ae.encode(x)`` rather than on pixels. The
latents of a dataset do not change from one epoch to the next, so they are computed once, here, and training reads
them like any other dataset (:mod:`pipelines.data.dataset`).

The work, and where it runs::

    driver  read the source manifest; refuse an OUTPUT that is the source or holds another kind of dataset; resolve
            and load the autoencoder (registry or folder); check the images fit it (channels, sides divisible by
            f); save the autoencoder in our folder format (a diffusers folder is converted) and put those bytes in
            the object store, so actors need no registry or driver disk (``pipelines.actors``)
    driver  cut the source shards (row counts from their Parquet footers) into pieces of at most ``shard_rows``
    actors  one per GPU with --use-gpu, else CPU actors sharing the cluster's CPUs as torch threads; each encodes
            its pieces into latent shards of the new generation (:mod:`pipelines.data.encoder_actor`); only a
            small summary row comes back, so pixels never pass through the driver, and no Ray Data read or write
            task needs a CPU beside the actors.
    driver  progress from the summaries; the autoencoder copy into the new generation; then manifest.json, written
            last and atomically; then the previous generation is deleted

Output layout (what the training code reads; see :mod:`pipelines.data.dataset`)::

    OUTPUT/manifest.json                      kind "latents", dtype float32, image_shape [h, w, c], pixel_shape
                                              [H, W, C], shards, counts, fingerprint, source, autoencoder, flip;
                                              a captioned source's caption_policy, captions and source_manifest
                                              (the shards then carry its caption column)
    OUTPUT/data-<run>/part-*.parquet          the shards of the generation that manifest.json names
    OUTPUT/data-<run>/autoencoder/            the autoencoder they were made with: config.json + model.safetensors
                                              (ddpm.autoencoder's format); the manifest names it and its sha256
    OUTPUT/_tmp-<run>/                        a run's scratch, deleted when the run ends

The autoencoder copy lives in its generation, as the shards do: manifest.json switches both at once, so a run that
dies before its commit leaves the previous latents and the decoder they were made with, together. Training checks
the copy's sha256 against the manifest when it loads it (:func:`pipelines.data.dataset.autoencoder_copy`).

``--flip``: a random flip cannot be applied to latents at training time (the mirror of a latent is not the latent
of the mirrored image), so both are stored: 2N rows for N images. Rates are in source images per second.

One run at a time per OUTPUT, as for ``ddpm preprocess``.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from pipelines import storage
from pipelines.actors import cpu_split, map_actors, put_payload
from pipelines.data.encoder_actor import LatentEncoder
from pipelines.data.generations import delete_quietly, delete_stale, new_run
from pipelines.errors import UserError

KIND, DTYPE = "latents", "float32"
AUTOENCODER_FOLDER = "autoencoder"  # inside the generation folder (an older layout kept it beside the manifest)
DEFAULT_BATCH_SIZE = 64  # rows per encoder call (the last chunk of a shard is padded to it)
CPUS_PER_ACTOR = 2  # default: one CPU actor per this many CPUs of the cluster (see benchmarks/encode.py)
PROGRESS_EVERY_S = 10.0
_SHARD_BYTES = 64 * 2**20  # source pixels per actor call and per output shard, at most


def fingerprint(source_fingerprint: str, autoencoder_sha256: str, flip: bool, scaling_factor: float = 1.0,
                shift_factor: float = 0.0) -> str:
    """sha256 of what the latents depend on: the source images, the autoencoder's weights, whether mirrors are
    included, and the scaling and shift (they live in config.json, not in the weights file, and change every
    latent)."""
    settings = {"source": source_fingerprint, "autoencoder": autoencoder_sha256, "flip": bool(flip),
                "scaling_factor": float(scaling_factor), "shift_factor": float(shift_factor)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


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

    from pipelines.data.dataset import MANIFEST, check_output, is_captioned, is_latent, read_manifest
    from pipelines.registry import resolve_autoencoder
    from pipelines.tracking import redact_uri

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if num_actors is not None and num_actors < 1:
        raise UserError(f"--num-actors must be at least 1, got {num_actors}")
    log = progress or (lambda _: None)
    endpoint_url = storage.resolve_endpoint(endpoint_url)  # resolved once here, so every actor uses the same one

    # 1. Driver: the source, the autoencoder, and whether they fit together; an OUTPUT this run may replace.
    source = read_manifest(data_uri, endpoint_url=endpoint_url)
    check_output(output_uri, KIND, "ddpm encode", inputs={"--data": data_uri, "--autoencoder": autoencoder_uri},
                 endpoint_url=endpoint_url)
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
    generation, scratch = new_run()
    scratch_uri = storage.join(output_uri, scratch)
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

        # 3. Commit: the autoencoder copy into the new generation, then manifest.json (naming both) in one atomic
        #    write. Until then the previous manifest names the previous generation and its own copy.
        copy = f"{generation}/{AUTOENCODER_FOLDER}"
        for name in (ae_format.WEIGHTS_FILE, ae_format.CONFIG_FILE):
            storage.write_bytes(storage.join(output_uri, copy, name), payload[name], endpoint_url)
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
                "downsample_factor": f, "latent_channels": cfg.latent_channels, "folder": copy,
            },
            "flip": bool(flip),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if is_captioned(source):  # the captions travel with their latents (the source fingerprint covers them)
            manifest.update({k: source[k] for k in ("caption_policy", "captions", "source_manifest") if k in source})
        storage.write_json(storage.join(output_uri, MANIFEST), manifest, endpoint_url)
    except BaseException:
        delete_quietly(generation_uri, endpoint_url)  # no manifest names it
        raise
    finally:
        delete_quietly(scratch_uri, endpoint_url)

    # 4. Only now is the previous generation unreferenced: delete it, with any leftovers of crashed runs.
    delete_stale(output_uri, keep=generation, endpoint_url=endpoint_url, also=(AUTOENCODER_FOLDER,))
    log(f"[encode] {total:,} images in {seconds:.1f} s: {total / max(seconds, 1e-9):,.1f} images/s "
        f"({rows:,} latents of {h}x{w}x{c} from {height}x{width}x{channels} images"
        f"{', each image and its mirror' if flip else ''}) -> {redact_uri(output_uri)}")
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
    from pipelines.data.dataset import is_captioned
    from pipelines.ray_utils import init_ray

    init_ray()
    actors, cpus = cpu_split(num_actors, use_gpu, CPUS_PER_ACTOR, verb="encode")
    total = int(source["counts"]["rows"])
    pixel_bytes = math.prod(int(v) for v in source["image_shape"])
    if shard_rows is None:
        # About 4 pieces per actor evens out the last wave; at most 64 MiB of pixels bounds an actor's memory.
        balanced = math.ceil(total / (4 * actors))
        shard_rows = max(1, min(balanced, _SHARD_BYTES // pixel_bytes))
        shard_rows = batch_size * math.ceil(shard_rows / batch_size)  # whole encoder calls, but for the last
    items = _work_items(data_uri, list(source["shards"]), shard_rows, endpoint_url)
    actors = max(1, min(actors, len(items)))
    kwargs = dict(payload=put_payload(payload), data_uri=data_uri, pixel_shape=source["image_shape"],
                  generation=generation, output_uri=output_uri, endpoint_url=endpoint_url, forward_rows=batch_size,
                  flip=flip, threads=cpus, use_gpu=use_gpu, captioned=is_captioned(source))
    log(f"[encode] {total:,} images from {data_uri} on {actors} {'GPU' if use_gpu else 'CPU'} actor(s)"
        f"{'' if use_gpu else f' of {cpus:g} CPU(s)'}: {len(items)} shards of up to {shard_rows} images, "
        f"{batch_size} per encoder call")
    shards, done, rows = set(), 0, 0
    started = last = time.monotonic()
    for row in map_actors(items, LatentEncoder, actors=actors, cpus_per_actor=cpus, use_gpu=use_gpu, kwargs=kwargs,
                          errors_name=output_uri):
        shards.add(str(row["shard"]))
        done, rows = done + int(row["images"]), rows + int(row["rows"])
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S and done < total:
            last = now
            log(f"[encode] {done:,}/{total:,} images ({100 * done / total:3.0f}%)  "
                f"{done / (now - started):,.1f} images/s  {now - started:.0f} s")
    return sorted(shards), rows
