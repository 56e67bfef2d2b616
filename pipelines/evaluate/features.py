"""Feature statistics at scale, for ``ddpm evaluate --num-samples`` in the tens of thousands: Ray Data actors, partial
sums per block, and a cache of the real side beside the data.

Two jobs, one row format::

    samples    pipelines.generate.sampler_actor.run_shards with a FeatureSink: each sampler actor samples a shard (the same
               pixels as ddpm generate and POST /generate) and passes it straight to its extractors, on its own GPU
               with --use-gpu; no image leaves the actor but the first few (the grid)
    real data  FeatureActor: feature actors over blocks of the reference or held-out rows, one block per shard
               that holds some; each actor reads its shard itself (pipelines.evaluate.real.RealData), so the real
               images stream through the actors like the samples and the driver never holds them
    each block -> {count, per metric: n, mean, scatter (ddpm.metrics.FeatureStats), the features of rows < keep}
    driver     merges the blocks' FeatureStats (Chan's pairwise update: exact in any order), keeps the first rows'
               features for precision/recall

Extractors travel as bytes (:class:`ExtractorSpec`: the FD-cls classifier's safetensors, or the Inception TorchScript
file), so actors on other machines need neither the driver's disk nor its cache. The real side's statistics
{mean, cov, n} (and the first rows' FD-cls features) are cached as ``.npz`` (read with ``allow_pickle=False``) under
``<data>/_stats/`` in the data's own store (``<DDPM_HOME>/stats/`` for ``digits``), keyed by the dataset
fingerprint, the split recipe, the extractor's hash, the role and n: the second evaluation against the same data
reads them instead of recomputing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ddpm.metrics import FeatureStats
from pipelines import storage
from pipelines.errors import UserError

@dataclass(frozen=True, eq=False)
class ExtractorSpec:
    """An extractor as bytes: ``kind`` "classifier" (FD-cls) or "inception" (FID); ``digest`` hashes what decides
    its features (the classifier's tensors, not its file's header, whose key order safetensors does not fix)."""

    metric: str
    kind: str
    data: bytes
    digest: str

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.digest}"

    def build(self, device) -> Callable[[np.ndarray], np.ndarray]:
        """(N, H, W, C) uint8 -> (N, D) float64 features, on ``device``."""
        if self.kind == "classifier":
            from pipelines.evaluate.classifier import net_features, net_from_bytes

            net = net_from_bytes(self.data).to(device)
            return lambda images: net_features(net, images)
        from pipelines.evaluate.inception import InceptionFeatures

        return InceptionFeatures.from_bytes(self.data, device=str(device))


# ---------------------------------------------------------------------------------------------------------------
# One block -> one row


def block_row(extractors: dict[str, Callable], images: np.ndarray, first_index: int, keep: int, grid: int) -> dict:
    """Features of a block of images as partial statistics, plus the features of rows < ``keep`` (precision and
    recall need points, not moments) and the images of rows < ``grid`` (the sample grid). Arrays go as bytes."""
    row: dict = {"first_index": first_index, "count": len(images)}
    kept = max(0, min(len(images), keep - first_index))
    for metric, extract in extractors.items():
        features = np.asarray(extract(images), dtype=np.float64)  # (B, D)
        stats = FeatureStats.of(features)
        row[f"{metric}_dim"] = features.shape[1]
        row[f"{metric}_mean"] = stats.mean.tobytes()
        row[f"{metric}_scatter"] = stats.scatter.tobytes()
        row[f"{metric}_kept"] = features[:kept].tobytes()
    row["grid"] = np.ascontiguousarray(images[:max(0, min(len(images), grid - first_index))]).tobytes()
    return row


class Reduction:
    """The driver's side: merge rows of :func:`block_row` into FeatureStats per metric, kept features and grid."""

    def __init__(self, metrics: list[str], image_shape: tuple):
        self.stats = {m: FeatureStats(0, np.zeros(0), np.zeros((0, 0))) for m in metrics}
        self.kept: dict[str, dict[int, np.ndarray]] = {m: {} for m in metrics}
        self.grid: dict[int, np.ndarray] = {}
        self.image_shape = tuple(image_shape)
        self.count = 0

    def add(self, row: dict) -> None:
        first, n = int(row["first_index"]), int(row["count"])
        self.count += n
        for m in self.stats:
            d = int(row[f"{m}_dim"])
            part = FeatureStats(n, np.frombuffer(row[f"{m}_mean"], np.float64),
                                np.frombuffer(row[f"{m}_scatter"], np.float64).reshape(d, d))
            self.stats[m] = part if self.stats[m].n == 0 else self.stats[m].merge(part)
            kept = np.frombuffer(row[f"{m}_kept"], np.float64).reshape(-1, d)
            if len(kept):
                self.kept[m][first] = kept
        grid = np.frombuffer(row["grid"], np.uint8).reshape(-1, *self.image_shape)
        if len(grid):
            self.grid[first] = grid

    def kept_features(self, metric: str) -> np.ndarray:
        parts = [self.kept[metric][k] for k in sorted(self.kept[metric])]
        return np.concatenate(parts) if parts else np.zeros((0, 0))

    def grid_images(self) -> np.ndarray:
        parts = [self.grid[k] for k in sorted(self.grid)]
        return np.concatenate(parts) if parts else np.zeros((0, *self.image_shape), np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# The samples: a sink for the batch job's sampler actors


class FeatureSink:
    """``pipelines.generate.sampler_actor`` sink: a shard's images -> :func:`block_row` (nothing is written)."""

    def __init__(self, specs: dict[str, ExtractorSpec], keep: int, grid: int):
        self.specs, self.keep, self.grid = specs, keep, grid

    def setup(self, device) -> None:
        self.extractors = {m: spec.build(device) for m, spec in self.specs.items()}

    def committed(self, shard: int) -> dict | None:
        return None

    def put(self, shard: int, rows: range, seeds: list[int], labels, images: np.ndarray) -> dict:
        return block_row(self.extractors, images, rows.start, self.keep, self.grid) | {"shard": shard, "new": len(rows)}


# ---------------------------------------------------------------------------------------------------------------
# The real side: feature actors over blocks of images


class FeatureActor:
    """Ray Data callable class: builds the extractors once, then maps blocks {shard, rows within it, first_index}
    of ``real`` (a :class:`pipelines.evaluate.real.RealData`) to :func:`block_row`, reading each shard itself."""

    def __init__(self, real, specs: dict[str, ExtractorSpec], keep: int, threads: int, use_gpu: bool):
        from pipelines.actors import setup_torch

        device = setup_torch(threads, use_gpu)
        self.real = real
        self.extractors = {m: spec.build(device) for m, spec in specs.items()}
        self.keep = keep

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [block_row(self.extractors, self.real.read_shard(int(s))[np.asarray(local, np.int64)], int(first),
                          self.keep, 0)
                for s, local, first in zip(batch["shard"], batch["rows"], batch["first_index"])]
        return {k: np.array([r[k] for r in rows], dtype=object if isinstance(rows[0][k], bytes) else None)
                for k in rows[0]}


def real_stats(real, rows: np.ndarray, specs: dict[str, ExtractorSpec], *, keep: int, num_actors: int | None = None,
               cpus_per_actor: int = 1, use_gpu: bool = False) -> Reduction:
    """FeatureStats per metric of the images of ``rows`` (sorted) of ``real`` (a RealData), and the features of the
    first ``keep`` of them, on feature actors: one block per shard that holds some of ``rows``. The driver holds
    the blocks' moments, never the images."""
    from pipelines.actors import actor_count, map_actors

    blocks = [{"shard": s, "rows": local.tolist(), "first_index": first} for s, local, first in real.shard_parts(rows)]
    reduction = Reduction(list(specs), real.image_shape)
    kwargs = dict(real=real, specs=specs, keep=keep, threads=max(1, int(cpus_per_actor)), use_gpu=use_gpu)
    for row in map_actors(blocks, FeatureActor, actors=actor_count(num_actors, use_gpu, cpus_per_actor, len(blocks)),
                          cpus_per_actor=cpus_per_actor, use_gpu=use_gpu, kwargs=kwargs,
                          errors_name="feature actors"):
        reduction.add(row)
    return reduction


# ---------------------------------------------------------------------------------------------------------------
# The cache of the real side


@dataclass
class CachedStats:
    """What the cache holds for one (data, extractor, role, n): the moments and the first rows' features."""

    stats: FeatureStats
    kept: np.ndarray  # (k, D) features of the first k rows (k = 0 when not kept)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, n=np.int64(self.stats.n), mean=self.stats.mean, cov=self.stats.cov, kept=self.kept)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "CachedStats":
        with np.load(io.BytesIO(data), allow_pickle=False) as f:  # plain arrays only, never a pickle
            n = int(f["n"])
            return cls(FeatureStats(n, f["mean"], f["cov"] * (n - 1)), f["kept"])


def cache_root(data: str) -> str:
    """Where a dataset's statistics live: ``<data>/_stats`` beside its shards; ``<DDPM_HOME>/stats`` for digits."""
    if data == "digits":
        from pipelines.tracking import home

        return str(home() / "stats")
    return storage.join(data, "_stats")


def cache_key(fingerprint: str, recipe: str, spec: ExtractorSpec, role: str, n: int) -> str:
    return f"{fingerprint[:32]}-{recipe}-{spec.metric}-{spec.key}-{role}-n{n}.npz"


def read_cached(root: str, key: str, log) -> CachedStats | None:
    uri = storage.join(root, key)
    try:
        if not storage.exists(uri):
            return None
        return CachedStats.from_bytes(storage.read_bytes(uri))
    except (UserError, ValueError, KeyError, OSError) as exc:  # unreadable: recompute, and say so
        log(f"[evaluate] ignoring the cached statistics {uri}: {exc}")
        return None


def write_cached(root: str, key: str, cached: CachedStats, log) -> None:
    uri = storage.join(root, key)
    try:
        storage.write_bytes(uri, cached.to_bytes())
    except UserError as exc:  # a read-only bucket: the evaluation still stands, the next one recomputes
        log(f"[evaluate] could not cache the statistics at {uri}: {exc}")
