"""A batch job's output, shard by shard: the images' digests, the writer sink, the commit files, the manifest.

Output layout (FORMAT png or parquet)::

    OUTPUT/images/seed-000123.png      png: one file per image, named by its seed; with a prompts file by its
                                       prompt's index too: images/p00007-seed-000123.png
    OUTPUT/data/shard-000000.parquet   parquet: one file per shard; rows of pipelines.data.preprocess's schema
                                       (image = H*W*C raw uint8 bytes, label, key = "seed-000123" or
                                       "p00007-seed-000123", sha256 of the pixels) plus ``seed``, and with
                                       prompts ``caption`` (the image's prompt)
    OUTPUT/shards/shard-000000.json    a shard's commit: written after its images, lists their seeds, labels, sha256s
    OUTPUT/manifest.json               written last: job.json's fields, counts, the fingerprint of all the images

A sink is what a sampler actor does with a shard's images: :class:`ShardWriter` writes them here;
``pipelines.evaluate.features.FeatureSink`` turns them into feature statistics instead.

The fingerprint is sha256 over the image shape and the per-image sha256 of the raw pixels in seed order
(:func:`images_fingerprint`): it depends on the pixels only, not on the format, the shard size or the actors.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from pipelines import storage
from pipelines.generate.job import Labels, Plan
from pipelines.generate.prompts import Prompts

if TYPE_CHECKING:
    from pipelines.generate.model_source import ModelSource

MANIFEST = "manifest.json"
DATASET_FORMAT_VERSION = 1  # pipelines.data.dataset's manifest format, which a Parquet output also satisfies
_IO_THREADS = 8  # concurrent PUTs per actor: an object store answers each after a round trip


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


def image_keys(plan: Plan, rows: range) -> list[str]:
    """The names of images ``rows``: seed-000123, or with a prompts file p00007-seed-000123 (prompt k = 7)."""
    seeds = plan.seeds(rows)
    if not plan.per_prompt:
        return [png_name(s) for s in seeds]
    return [f"p{k:05d}-{png_name(s)}" for k, s in zip(plan.prompt_indices(rows), seeds)]


# ---------------------------------------------------------------------------------------------------------------
# Sinks: what an actor does with a shard's images


class Sink(Protocol):
    def setup(self, device) -> None: ...
    def committed(self, shard: int) -> dict | None: ...
    def put(self, shard: int, rows: range, seeds: list[int], labels, images: np.ndarray) -> dict: ...


class ShardWriter:
    """Writes a shard's images (PNG files or one Parquet file), then its commit file. Returns a small summary."""

    def __init__(self, output: str, fmt: str, endpoint_url: str | None, image_shape: Sequence[int], plan: Plan,
                 prompts: Prompts | None = None):
        self.output, self.fmt, self.endpoint_url, self.image_shape = output, fmt, endpoint_url, tuple(image_shape)
        self.plan, self.prompts = plan, prompts or Prompts.none()

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
        keys = image_keys(self.plan, rows)
        captions, _ = self.prompts.at(self.plan.prompt_indices(rows))
        if self.fmt == "png":
            files = [f"images/{key}.png" for key in keys]
            with ThreadPoolExecutor(_IO_THREADS) as pool:
                list(pool.map(lambda fi: storage.write_bytes(storage.join(self.output, fi[0]), encode_png(fi[1]),
                                                             self.endpoint_url), zip(files, images)))
        else:
            files = [f"data/shard-{shard:06d}.parquet"]
            storage.write_bytes(storage.join(self.output, files[0]),
                                parquet_shard(images, seeds, per_image, digests, keys, captions), self.endpoint_url)
        commit = {"shard": shard, "first_index": rows.start, "seeds": seeds, "labels": per_image, "sha256": digests,
                  "files": files}
        if self.plan.per_prompt:
            commit["prompt_index"] = self.plan.prompt_indices(rows)
        storage.write_json(self.commit_uri(shard), commit, self.endpoint_url)  # the commit: after every image
        return {"shard": shard, "count": len(rows), "new": len(rows)}


def parquet_shard(images: np.ndarray, seeds: list[int], labels: list[int] | None, digests: list[str],
                  keys: list[str] | None = None, captions: list[str] | None = None) -> bytes:
    """One shard as Parquet bytes: ``pipelines.data.preprocess``'s schema (image, label, key, sha256) plus seed,
    and ``caption`` (each image's prompt) when the job has prompts. ``keys`` default to seed-000123."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, h, w, c = images.shape
    image_type = pa.binary(h * w * c)
    arrays = [pa.FixedSizeBinaryArray.from_buffers(image_type, n, [None, pa.py_buffer(np.ascontiguousarray(images))]),
              pa.array(labels if labels is not None else [-1] * n, pa.int64()),
              pa.array(keys if keys is not None else [png_name(s) for s in seeds], pa.string()),
              pa.array(digests, pa.string()),
              pa.array(seeds, pa.int64())]
    fields = [pa.field("image", image_type, nullable=False), pa.field("label", pa.int64(), False),
              pa.field("key", pa.string(), False), pa.field("sha256", pa.string(), False),
              pa.field("seed", pa.int64(), False)]
    if captions is not None:
        arrays.append(pa.array(captions, pa.string()))
        fields.append(pa.field("caption", pa.string(), False))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Commit files and the manifest


def committed_shards(listing: set[str], plan: Plan, fmt: str) -> set[int]:
    """Shards whose commit file and every image file are in ``listing`` (keys relative to the output)."""
    done = set()
    for j in range(plan.num_shards):
        if f"shards/shard-{j:06d}.json" not in listing:
            continue
        if fmt == "png":
            files = [f"images/{key}.png" for key in image_keys(plan, plan.rows(j))]
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
        manifest["files"] = ("images/p<prompt index, 5 digits>-seed-<seed, at least 6 digits>.png for each prompt "
                             "and each seed of the range" if plan.per_prompt else
                             "images/seed-<seed, at least 6 digits>.png for each seed of the range")
    else:  # a dataset manifest too (pipelines.data.dataset.read_manifest)
        manifest |= {"format_version": DATASET_FORMAT_VERSION, "class_names": class_names if per_class else [],
                     "shards": [f"data/shard-{j:06d}.parquet" for j in range(plan.num_shards)],
                     "source": source.uri}
    return manifest
