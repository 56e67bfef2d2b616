"""``ddpm preprocess``: turn a bucket of image files into training-ready Parquet shards, with Ray Data.

Input: every object under INPUT (``s3://bucket/prefix`` or a folder). With ``--labels-from-dirs`` (the default) the
first folder level names the class: ``INPUT/cat/a.jpg`` is labelled with the id of ``cat``, ids following the sorted
folder names; objects directly under INPUT are unlabelled (-1).

The work, and where it runs::

    driver  list keys and sizes; set aside what cannot be an image without reading it (empty objects, other
            file extensions)
    tasks   read bytes -> sha256 -> decode (PNG, JPEG, WebP, BMP, GIF's first frame) -> L or RGB -> centre crop
            -> LANCZOS resize -> Parquet shard; Ray Data fuses the map with the write, so pixels never pass through
            the driver. With ``--captions``, each image's ``NAME.txt`` is read in the same task
    driver  fingerprint from the shards' key and sha256 columns; manifest.json written last, as the commit

Output layout::

    OUTPUT/manifest.json           the commit point: shards, counts, classes, skipped objects, fingerprint
    OUTPUT/data-<run>/*.parquet    the shards of the generation that manifest.json names
    OUTPUT/_tmp-<run>/             a run's scratch (its skip reports), deleted when the run ends

A run writes a new generation next to the old one and switches by rewriting manifest.json, one atomic PUT; only then
is the old generation deleted. A run that dies midway leaves the previous output readable, plus leftovers that no
manifest names and the next successful run deletes. One run at a time per OUTPUT: a second concurrent run's commit
would delete the first run's generation.

Shard schema (``format_version`` 1)::

    image   fixed_size_binary(H*W*C)  uint8 pixels in row-major (H, W, C) order; manifest["image_shape"] = [H, W, C]
    label   int64                     class id, -1 when unlabelled
    key     string                    the source object's path relative to INPUT
    sha256  string                    hex digest of the source object's bytes
    caption string                    only with ``--captions``: the image's caption, "" when it has none

Fixed-size binary rather than Ray's tensor extension type: every Parquet reader (pyarrow, pandas, DuckDB, Spark)
reads it as it is, and NumPy views a column of it as (N, H, W, C) without a copy. ``load_dataset`` and
``load_numpy`` do that view.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import posixpath
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from ddpm.images import to_mode  # shared with ddpm inpaint and POST /inpaint
from pipelines import storage
from pipelines.data.captions import (MAX_BYTES, METADATA, POLICIES, SOURCE_MANIFEST, BadCaption, decode_caption,
                                     is_sidecar, read_metadata, text_file)
from pipelines.data.dataset import FORMAT_VERSION, MANIFEST, check_output, read_columns
from pipelines.data.generations import delete_quietly, delete_stale, new_run
from pipelines.data.photos import SETTINGS_FILE as PHOTOS_SETTINGS
from pipelines.errors import UserError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
# Pillow may only pick among these decoders: the formats we promise, and no rarely used parser on untrusted bytes.
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
SMALL_POLICIES = ("skip", "upscale")

# Seconds between two progress lines of a running ingest (the last line comes at the end, whenever that is).
PROGRESS_EVERY_S = 10.0
# Pixels per task and per shard, at most (see _write_shards).
_SHARD_BYTES = 64 * 2**20
# Reads in flight per task on an object store: enough to hide the per-request latency, few enough to bound memory.
_READ_AHEAD = 8
# What Pillow raises for data it cannot decode (truncated, corrupt, or not an image at all).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


class UnusableImage(Exception):
    """An object that is not a usable image: skipped and reported in the manifest, not a failure of the run."""


# ---------------------------------------------------------------------------------------------------------------
# One image


def prepare_image(data: bytes, resolution: int, channels: int, *, upscale: bool = False) -> np.ndarray:
    """Image file bytes -> (resolution, resolution, channels) uint8: decode, centre-crop to a square, resize.

    Raises :class:`UnusableImage` for bytes that do not decode and, unless ``upscale``, for images whose shorter
    side is below ``resolution`` (upscaling adds no detail, and a dataset of blurred small images may be a mistake).
    """
    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as img:
            if min(img.size) < resolution and not upscale:
                raise UnusableImage(f"too small ({img.size[0]}x{img.size[1]} < {resolution})")
            # JPEG only: libjpeg decodes at 1/2, 1/4 or 1/8 scale while both sides stay >= resolution, an
            # averaging downscale in the DCT domain that costs a fraction of a full decode. LANCZOS does the rest.
            img.draft(mode, (resolution, resolution))
            ImageOps.exif_transpose(img, in_place=True)  # phones store pictures sideways plus an EXIF rotation
            img = to_mode(img, mode)
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))  # resize(box=...) would blend in pixels outside
            img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
            pixels = np.asarray(img, dtype=np.uint8)  # (H, W) or (H, W, 3)
    except Image.UnidentifiedImageError:
        raise UnusableImage("not a recognised image (PNG, JPEG, WebP, BMP or GIF)") from None
    except _DECODE_ERRORS as exc:
        detail = (str(exc) or type(exc).__name__).splitlines()[0]
        raise UnusableImage(f"corrupt image ({detail})") from None
    return pixels.reshape(resolution, resolution, channels)


# ---------------------------------------------------------------------------------------------------------------
# Shards


def shard_schema(resolution: int, channels: int, captioned: bool = False) -> pa.Schema:
    fields = [
        pa.field("image", pa.binary(resolution * resolution * channels), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
    ]
    return pa.schema(fields + [pa.field("caption", pa.string(), nullable=False)] if captioned else fields)


def _read_ahead(read: Callable[[int], tuple], keys: Sequence[int]) -> Iterator[tuple]:
    """``read(key)`` for each key, in order, with up to ``_READ_AHEAD`` reads in flight on threads.

    I/O and hashing release the GIL, so they overlap the decoding in the calling thread.
    """
    with ThreadPoolExecutor(_READ_AHEAD) as pool:
        pending: collections.deque = collections.deque()
        for key in keys:
            pending.append(pool.submit(read, key))
            if len(pending) >= _READ_AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _prepare_batch(
    batch: pa.Table,
    *,
    input_uri: str,
    report_uri: str,
    endpoint_url: str | None,
    resolution: int,
    channels: int,
    upscale: bool,
    captioned: bool = False,
) -> pa.Table:
    """Ray Data task: rows (key, label[, caption, caption_file]) -> rows of :func:`shard_schema`, one per usable
    image.

    The bytes are read here, inside the task, so they never travel through the driver or the object store; so is
    a caption file (``caption_file``, where the driver found no ``caption`` in a metadata.jsonl). Objects that are
    not usable images, or whose caption is not usable text, go to a small JSON report under ``report_uri``, named
    after the batch's first key, so that a retried task overwrites its report rather than adding a second one.
    """
    fs, root = storage.filesystem_for(input_uri, endpoint_url)
    keys = batch.column("key").to_pylist()
    labels = batch.column("label").to_numpy()
    given = batch.column("caption").to_pylist() if captioned else [None] * len(keys)
    files = batch.column("caption_file").to_pylist() if captioned else [None] * len(keys)

    def read(i: int) -> tuple[bytes, str, bytes | None]:
        with fs.open_input_stream(f"{root}/{keys[i]}") as f:
            data = f.read()
        text = None
        if files[i] is not None:
            with fs.open_input_stream(f"{root}/{files[i]}") as f:
                text = f.read(MAX_BYTES + 3)  # enough to tell "too long" after stripping a newline
        return data, hashlib.sha256(data).hexdigest(), text

    images = np.empty((len(keys), resolution, resolution, channels), dtype=np.uint8)  # (B, H, W, C)
    kept, digests, captions, skipped = [], [], [], []
    # An object store answers each GET after a network round trip, so reads run ahead on threads; a local disk
    # answers in microseconds, and there threads would only add their own cost (about 15% CPU per image).
    indices = range(len(keys))
    reads = _read_ahead(read, indices) if input_uri.startswith("s3://") else map(read, indices)
    for i, (data, digest, text) in enumerate(reads):
        try:
            images[len(kept)] = prepare_image(data, resolution, channels, upscale=upscale)
            caption = decode_caption(text) if text is not None else given[i] or ""
        except UnusableImage as exc:
            skipped.append({"key": keys[i], "reason": str(exc)})
            continue
        except BadCaption as exc:
            skipped.append({"key": keys[i], "reason": f"caption {files[i]}: {exc}"})
            continue
        kept.append(i)
        digests.append(digest)
        captions.append(caption)

    if skipped:
        name = hashlib.sha256(keys[0].encode()).hexdigest()[:16]
        storage.write_json(storage.join(report_uri, f"skipped-{name}.json"), skipped, endpoint_url)
    n = len(kept)
    schema = shard_schema(resolution, channels, captioned)
    pixels = pa.py_buffer(images[:n])  # the first n rows of a C-contiguous array: one buffer, no copy
    columns = [
        pa.FixedSizeBinaryArray.from_buffers(schema.field("image").type, n, [None, pixels]),
        pa.array(labels[kept], pa.int64()),
        pa.array([keys[i] for i in kept], pa.string()),
        pa.array(digests, pa.string()),
    ]
    if captioned:
        columns.append(pa.array(captions, pa.string()))
    return pa.Table.from_arrays(columns, schema=schema)


# ---------------------------------------------------------------------------------------------------------------
# The run


def fingerprint(rows: Iterable[tuple[str, ...]], settings: dict) -> str:
    """sha256 over the settings and the sorted (key, sha256[, caption sha256]) rows kept.

    Same source bytes and settings, same fingerprint, whatever the order of listing, the bucket, or the machine;
    one changed, added or removed image, or another resolution, gives another. The settings are included so that a
    fingerprint names one dataset: the same images at 32 and at 64 pixels are not the same training data. A
    captioned dataset's rows carry their caption's sha256 (a digest, so that no caption text can fake a field
    separator): one edited caption gives another fingerprint. Rows of (key, sha256) hash as they always did.
    """
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for row in sorted(rows):
        h.update(("\0".join(row) + "\n").encode())
    return h.hexdigest()


def caption_digest(caption: str) -> str:
    """What a row's caption adds to :func:`fingerprint`."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


def _triage(entries: list[storage.FileEntry], exclude: str | None
            ) -> tuple[list[str], list[dict], list[storage.FileEntry]]:
    """Split a listing into candidate image keys, the objects skipped without reading them, and the sidecars
    (captions and manifests of the images, :func:`pipelines.data.captions.is_sidecar`)."""
    entries = [e for e in entries  # ours, not the user's
               if not (exclude and e.key.startswith(exclude) or e.key == PHOTOS_SETTINGS)]
    images = {e.key for e in entries if posixpath.splitext(e.key)[1].lower() in IMAGE_EXTENSIONS}
    texts = {text_file(key) for key in images}
    candidates, skipped, sidecars = [], [], []
    for entry in entries:
        extension = posixpath.splitext(entry.key)[1].lower()
        if is_sidecar(entry.key, texts):
            sidecars.append(entry)
        elif extension not in IMAGE_EXTENSIONS:
            what = f"{extension!r} extension" if extension else "no extension"
            skipped.append({"key": entry.key, "reason": f"not an image file ({what})"})
        elif entry.size == 0:
            skipped.append({"key": entry.key, "reason": "empty object (0 bytes)"})
        else:
            candidates.append(entry.key)
    return candidates, skipped, sidecars


def _find_captions(rows: list[dict], sidecars: list[storage.FileEntry], policy: str, skipped: list[dict],
                   input_uri: str, endpoint_url: str | None) -> dict:
    """Give each row its ``caption`` (from a metadata.jsonl, read here) or its ``caption_file`` (a ``NAME.txt``,
    read by the task), in place; an image with neither is kept with "" or, under "required", moved from ``rows``
    to ``skipped``. Returns the manifest's ``captions`` section; ``uncaptioned`` lists the images with neither.
    """
    listed = {e.key for e in sidecars}
    metadata = read_metadata(input_uri, [k for k in listed if posixpath.basename(k) == METADATA], endpoint_url)
    unmatched = len(metadata.keys() - {row["key"] for row in rows})  # a file_name that names no image file
    found = {"metadata.jsonl": 0, "txt": 0}
    uncaptioned, keep = [], []
    for row in rows:
        text, file = metadata.get(row["key"]), text_file(row["key"])
        if text is not None:
            try:  # the same rules as a caption file's; JSON may hold text that UTF-8 cannot encode (a lone surrogate)
                text = decode_caption(text.encode("utf-8"))
            except UnicodeEncodeError:
                skipped.append({"key": row["key"], "reason": "caption in metadata.jsonl: not UTF-8 (lone surrogate)"})
                continue
            except BadCaption as exc:
                skipped.append({"key": row["key"], "reason": f"caption in metadata.jsonl: {exc}"})
                continue
            row.update(caption=text, caption_file=None)
            found["metadata.jsonl"] += 1
        elif file in listed:
            row.update(caption=None, caption_file=file)
            found["txt"] += 1
        else:
            uncaptioned.append(row["key"])
            if policy == "required":
                skipped.append({"key": row["key"], "reason": "no caption (no NAME.txt, no metadata.jsonl line)"})
                continue
            row.update(caption="", caption_file=None)
        keep.append(row)
    rows[:] = keep
    return {"max_bytes": MAX_BYTES, "found": found, "metadata_unmatched": unmatched,
            "uncaptioned": uncaptioned}


def _nested_prefix(output_uri: str, input_uri: str) -> str | None:
    """``"processed/"`` when OUTPUT lies inside INPUT (its files must not be read back as input), else None."""
    inner, outer = storage.filesystem_for(output_uri)[1], storage.filesystem_for(input_uri)[1].rstrip("/") + "/"
    same_store = output_uri.startswith("s3://") == input_uri.startswith("s3://")
    return inner[len(outer):].rstrip("/") + "/" if same_store and inner.startswith(outer) else None


def preprocess(
    input_uri: str,
    output_uri: str,
    *,
    resolution: int,
    channels: int = 3,
    labels_from_dirs: bool = True,
    small: str = "skip",
    captions: str | None = None,
    batch_size: int | None = None,
    endpoint_url: str | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """Preprocess every image under ``input_uri`` into shards under ``output_uri``; returns the manifest written.

    ``small`` says what happens to an image whose shorter side is below ``resolution``: "skip" (reported in the
    manifest) or "upscale". ``captions`` reads each image's caption into a ``caption`` column
    (:mod:`pipelines.data.captions`): None for none (the shards and fingerprint of an uncaptioned dataset), "keep"
    to keep an image without a caption with the empty caption, "required" to quarantine it. ``batch_size`` is the
    number of images per Ray task and per shard; by default about 4 tasks per CPU of the cluster and at most 64 MiB
    of pixels each. ``progress`` gets a line every
    ``PROGRESS_EVERY_S`` seconds while the tasks run (objects done of the total, images/s) and one at the end.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be at least 1, got {resolution}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if small not in SMALL_POLICIES:
        raise ValueError(f"small must be one of {SMALL_POLICIES}, got {small!r}")
    if captions not in (None, *POLICIES):
        raise ValueError(f"captions must be None or one of {POLICIES}, got {captions!r}")
    endpoint_url = storage.resolve_endpoint(endpoint_url)  # resolved once here, so every task uses the same one
    settings = {"format_version": FORMAT_VERSION, "resolution": resolution, "channels": channels,
                "labels_from_dirs": labels_from_dirs, "small": small}
    if captions:  # only then: an uncaptioned dataset keeps the settings, and so the fingerprint, it always had
        settings["caption_policy"] = captions

    # 1. Driver: list, and set aside what cannot be an image without reading it.
    candidates, skipped, sidecars = _triage(storage.list_files(input_uri, endpoint_url),
                                            _nested_prefix(output_uri, input_uri))
    if not candidates:
        if "://" not in input_uri and not Path(input_uri).is_dir():  # an empty s3:// prefix is not an error to name
            raise UserError(f"{input_uri}: no such folder")
        raise UserError(f"no image files under {input_uri} ({len(skipped)} other objects)")
    check_output(output_uri, "images", "ddpm preprocess", inputs={"--input": input_uri}, endpoint_url=endpoint_url)
    objects = len(candidates) + len(skipped) + len(sidecars)
    class_names = sorted({key.split("/", 1)[0] for key in candidates if "/" in key}) if labels_from_dirs else []
    class_ids = {name: i for i, name in enumerate(class_names)}
    rows = [{"key": key, "label": class_ids.get(key.split("/", 1)[0], -1) if "/" in key else -1} for key in candidates]
    source_manifest = None
    if any(e.key == SOURCE_MANIFEST for e in sidecars):
        source_manifest = storage.read_json(storage.join(input_uri, SOURCE_MANIFEST), endpoint_url)
    caption_info = _find_captions(rows, sidecars, captions, skipped, input_uri, endpoint_url) if captions else None
    if not rows:
        raise UserError(f"no usable images under {input_uri}: all {objects} objects were skipped, "
                        f"e.g. {skipped[0]['key']}: {skipped[0]['reason']}")

    # 2. Ray Data: a new generation of shards, next to whatever is committed now. The first write doubles as a
    #    check that OUTPUT is writable, before any image is decoded.
    generation, scratch = new_run()
    scratch_uri = storage.join(output_uri, scratch)
    generation_uri = storage.join(output_uri, generation)
    storage.write_json(storage.join(scratch_uri, "started.json"), {"input": input_uri, **settings}, endpoint_url)
    try:
        task_kwargs = dict(input_uri=input_uri, report_uri=scratch_uri, endpoint_url=endpoint_url,
                           resolution=resolution, channels=channels, upscale=small == "upscale",
                           captioned=bool(captions))
        _write_shards(rows, generation_uri, batch_size, task_kwargs, progress)

        # 3. Driver: what the tasks kept (from the shards themselves) and skipped (from their reports).
        shards = sorted(storage.join(generation, e.key)
                        for e in storage.list_files(generation_uri, endpoint_url) if e.key.endswith(".parquet"))
        for report in storage.list_files(scratch_uri, endpoint_url):
            if report.key.startswith("skipped-"):
                skipped += storage.read_json(storage.join(scratch_uri, report.key), endpoint_url)
        if not shards:  # Ray Data writes no file for a task that kept no row
            raise UserError(f"no usable images under {input_uri}: all {objects} objects were skipped, "
                            f"e.g. {skipped[0]['key']}: {skipped[0]['reason']}")

        kept = read_columns(output_uri, shards, ["key", "sha256", "label"] + (["caption"] if captions else []),
                            endpoint_url)
        rows_kept = list(zip(kept["key"].to_pylist(), kept["sha256"].to_pylist()))
        if captions:
            rows_kept = [(*row, caption_digest(c)) for row, c in zip(rows_kept, kept["caption"].to_pylist())]

        # 4. Commit: manifest.json names the new generation, in one atomic write.
        labels = kept["label"].to_numpy()
        per_class = np.bincount(labels[labels >= 0], minlength=len(class_names))  # (classes,)
        manifest = {
            **settings,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": input_uri,
            "image_shape": [resolution, resolution, channels],
            "class_names": class_names,
            "counts": {
                "objects": objects,
                "rows": kept.num_rows,
                "skipped": len(skipped),
                "per_class": dict(zip(class_names, per_class.tolist())),
            },
            "skipped": sorted(skipped, key=lambda s: s["key"]),
            "fingerprint": fingerprint(rows_kept, settings),
            "shards": shards,
        }
        if sidecars:
            manifest["counts"]["sidecars"] = len(sidecars)
        if caption_info is not None:
            if captions == "keep":  # an uncaptioned image that did not decode is reported as that, not as this
                kept_keys = set(kept["key"].to_pylist())
                caption_info["uncaptioned"] = [k for k in caption_info["uncaptioned"] if k in kept_keys]
            manifest["counts"]["uncaptioned"] = len(caption_info["uncaptioned"])
            manifest["captions"] = caption_info
        if source_manifest is not None:
            manifest["source_manifest"] = source_manifest
        storage.write_json(storage.join(output_uri, MANIFEST), manifest, endpoint_url)
    except BaseException:
        delete_quietly(generation_uri, endpoint_url)  # no manifest names it
        raise
    finally:
        delete_quietly(scratch_uri, endpoint_url)

    # 5. Only now is the previous generation unreferenced: delete it, with any leftovers of crashed runs.
    delete_stale(output_uri, keep=generation, endpoint_url=endpoint_url)
    return manifest


def _write_shards(rows: list[dict], generation_uri: str, batch_size: int | None, task_kwargs: dict,
                  progress: Callable[[str], None] | None = None) -> None:
    """Ray Data: (key, label) rows -> :func:`_prepare_batch` tasks -> Parquet shards under ``generation_uri``."""
    import ray

    from pipelines.ray_utils import init_ray

    init_ray()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Few tasks: each leaves its worker idle for a while (submission, input fetch, block and file bookkeeping),
    # which 4 tasks per CPU keep small while still evening out the last wave (benchmarks/RESULTS.md, Ingest). At
    # most 64 MiB of pixels per task bounds a worker's memory and keeps shards at a size Parquet readers stream well.
    pixels = task_kwargs["resolution"] ** 2 * task_kwargs["channels"]
    balanced = max(16, math.ceil(len(rows) / (4 * cpus)))
    per_task = batch_size or min(balanced, max(1, _SHARD_BYTES // pixels))
    ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / per_task))  # one block per task
    ds = ds.map_batches(_prepare_batch, batch_size=None, batch_format="pyarrow", fn_kwargs=task_kwargs)
    fs, path = storage.filesystem_for(generation_uri, task_kwargs["endpoint_url"])
    with storage.user_errors(generation_uri, task_kwargs["endpoint_url"]), \
            _ShardWatcher(generation_uri, task_kwargs["endpoint_url"], len(rows), per_task, progress):
        ds.write_parquet(path, filesystem=fs)


class _ShardWatcher:
    """Progress of :func:`_write_shards` while Ray Data runs it: every task writes one shard of (at most) its
    ``per_task`` objects, so the shards written so far say how many objects are done. A thread lists them every
    couple of seconds and reports a line every ``PROGRESS_EVERY_S``; the last line, on the way out, has the exact
    total and the rate over the whole write."""

    def __init__(self, uri: str, endpoint_url: str | None, total: int, per_task: int,
                 report: Callable[[str], None] | None, every_s: float | None = None, poll_s: float = 2.0):
        self.uri, self.endpoint_url, self.total, self.per_task, self.report = uri, endpoint_url, total, per_task, report
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ingest-progress", daemon=True)

    def __enter__(self) -> "_ShardWatcher":
        self.started = self._last = time.monotonic()
        if self.report is not None:
            self._thread.start()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self._stop.set()
        if self.report is None:
            return
        self._thread.join(timeout=5)
        if kind is None:
            self._line(self.total, final=True)

    def _line(self, done: int, final: bool = False) -> None:
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        width = len(f"{self.total:,}")
        when = f"in {elapsed:.1f} s" if final else f"{elapsed:.0f} s"
        self.report(f"[ingest] {done:>{width},}/{self.total:,} objects ({100 * done / self.total:3.0f}%)  "
                    f"{rate:,.0f} images/s  {when}")

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            if time.monotonic() - self._last < self.every_s:
                continue
            try:
                shards = sum(e.key.endswith(".parquet") for e in storage.list_files(self.uri, self.endpoint_url))
            except UserError:  # a store hiccup costs a progress line, never the run
                continue
            self._last = time.monotonic()
            self._line(min(shards * self.per_task, self.total))
