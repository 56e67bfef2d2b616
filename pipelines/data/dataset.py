"""The reader of preprocessed datasets: the manifest, the shards as a Ray Dataset, or a small one in memory.

A dataset written by ``ddpm preprocess`` (:mod:`pipelines.data.preprocess`) is a folder or prefix with Parquet
shards and ``manifest.json``; each row holds ``image`` (fixed_size_binary of H*W*C uint8), ``label``, ``key`` and
``sha256``, and, in a captioned dataset (``ddpm preprocess --captions``, :func:`is_captioned`), ``caption``.
Training and evaluation read it through this module only.

A latent dataset written by ``ddpm encode`` (:mod:`pipelines.data.encode`) has the same layout with
``manifest["kind"] == "latents"``: ``image`` then holds an (h, w, c) latent as ``manifest["dtype"]`` (float32)
values, ``image_shape`` is the latent's [h, w, c], and the manifest names the autoencoder whose copy sits in the
shards' generation folder (:func:`autoencoder_copy` checks it). :func:`image_dtype` says which; every reader here
returns arrays of that dtype. ``ddpm generate --format parquet`` writes the same layout with ``kind``
"ddpm-generated".

Every job that writes a dataset replaces what its OUTPUT held, so each first calls :func:`check_output`: an OUTPUT
that is one of its inputs, or that holds a dataset of another kind, is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pyarrow as pa

from pipelines import storage
from pipelines.errors import UserError

if TYPE_CHECKING:
    import ray.data

FORMAT_VERSION = 1
# Which of Ray Data's Parquet readers load_dataset uses. Ray 2.60's default (DataSourceV2) lists row groups through
# FooterReader actors (32 by default), each a new worker process, on every read: 1.8-5.9 s per read of a digits
# dataset on a 2-core machine, against 0.2-0.3 s with V1 (benchmarks/parquet_reader.py). Our reads name their shards
# from the manifest, so V2's listing buys nothing here. RAY_DATA_USE_DATASOURCE_V2=1 chooses V2 again.
PARQUET_READER_V2 = os.environ.get("RAY_DATA_USE_DATASOURCE_V2", "0").lower() in ("1", "true")
MANIFEST = "manifest.json"
# manifest["kind"] -> what a person calls it (a manifest without "kind" is ddpm preprocess's)
KINDS = {"images": "processed images (ddpm preprocess)", "latents": "latents (ddpm encode)",
         "ddpm-generated": "generated images (ddpm generate)"}


def images_from_arrow(column: pa.Array | pa.ChunkedArray, shape: Sequence[int], dtype=np.uint8) -> np.ndarray:
    """A fixed_size_binary(H*W*C*itemsize) column -> (N, H, W, C) of ``dtype`` (uint8 pixels, or float32 latents),
    a read-only view of the column's buffer."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    size = math.prod(shape)
    flat = np.frombuffer(array.buffers()[1], dtype=dtype)
    return flat[array.offset * size : (array.offset + len(array)) * size].reshape(len(array), *shape)


def image_dtype(manifest: dict) -> np.dtype:
    """The dtype of the ``image`` column's values: uint8 pixels, or a latent dataset's ``dtype`` (float32)."""
    return np.dtype(manifest.get("dtype", "uint8"))


def is_latent(manifest: dict) -> bool:
    """Whether the dataset holds an autoencoder's latents (``ddpm encode``) rather than pixels."""
    return manifest.get("kind") == "latents"


def is_captioned(manifest: dict) -> bool:
    """Whether the shards have a ``caption`` column (``ddpm preprocess --captions``)."""
    return "caption_policy" in manifest


def dataset_kind(manifest: dict) -> str:
    """"images" (``ddpm preprocess``), "latents" (``ddpm encode``) or "ddpm-generated" (``ddpm generate``)."""
    return str(manifest.get("kind") or "images")


def same_location(a: str, b: str) -> bool:
    """Whether two URIs name the same folder or prefix (``s3://b/x/`` is ``s3://b/x``; local paths resolved, links
    followed). A URI that is no storage location (``models:/...``) is the same as nothing."""
    try:
        (fs_a, path_a), (fs_b, path_b) = storage.filesystem_for(a), storage.filesystem_for(b)
    except UserError:
        return False
    if type(fs_a) is not type(fs_b):
        return False
    if "://" not in path_a and Path(path_a).is_absolute():  # a local path
        return Path(path_a).resolve() == Path(path_b).resolve()
    return path_a.rstrip("/") == path_b.rstrip("/")


def check_output(output_uri: str, kind: str, command: str, *, inputs: Mapping[str, str] = {},
                 endpoint_url: str | None = None) -> None:
    """Refuse, before anything is written, an OUTPUT that ``command`` (which writes a dataset of ``kind``) would
    destroy: one of its ``inputs`` (flag -> URI), whose files a run deletes once it commits, or a folder whose
    manifest is of another kind, which the run would replace. An OUTPUT of the same kind is a rerun: allowed."""
    for flag, uri in inputs.items():
        if uri and same_location(output_uri, uri):
            raise UserError(f"--output {output_uri} is the {flag} of this run, which {command} would overwrite; "
                            f"choose another --output")
    path = storage.join(output_uri, MANIFEST)
    if storage.exists(path, endpoint_url):
        found = dataset_kind(storage.read_json(path, endpoint_url))
        if found != kind:
            raise UserError(f"--output {output_uri} holds {KINDS.get(found, repr(found))}, which {command} would "
                            f"replace with {KINDS[kind]}; choose another --output")


def autoencoder_copy(uri: str, manifest: dict, *, endpoint_url: str | None = None) -> str:
    """The folder of a latent dataset's copy of its autoencoder, after checking that its weights are the ones the
    manifest names (sha256): latents decoded by another autoencoder would train a model that decodes garbage."""
    from ddpm.autoencoder import WEIGHTS_FILE

    info = manifest["autoencoder"]
    folder = storage.join(uri, info.get("folder", "autoencoder"))
    weights = storage.join(folder, WEIGHTS_FILE)
    if not storage.exists(weights, endpoint_url):
        raise UserError(f"{weights}: missing; the latent dataset at {uri} is incomplete: run ddpm encode again")
    found = hashlib.sha256(storage.read_bytes(weights, endpoint_url)).hexdigest()
    if found != info.get("sha256"):
        raise UserError(f"{folder}: the autoencoder's weights have sha256 {found}, but {uri}/{MANIFEST} names "
                        f"{info.get('sha256')}; run ddpm encode again")
    return folder


def read_columns(output_uri: str, shards: list[str], columns: list[str], endpoint_url: str | None) -> pa.Table:
    """Some columns of the listed shards (paths relative to ``output_uri``), read with pyarrow on this machine."""
    import pyarrow.dataset as pads

    fs, root = storage.filesystem_for(output_uri, endpoint_url)
    with storage.user_errors(output_uri, endpoint_url):
        dataset = pads.dataset([f"{root}/{s}" for s in shards], filesystem=fs, format="parquet")
        return dataset.to_table(columns=columns)


def read_manifest(uri: str, *, endpoint_url: str | None = None) -> dict:
    """The manifest of the preprocessed dataset at ``uri``; a UserError if there is none or its format is unknown."""
    path = storage.join(uri, MANIFEST)
    if not storage.exists(path, endpoint_url):
        raise UserError(f"no {MANIFEST} at {uri}: run ddpm preprocess first")
    manifest = storage.read_json(path, endpoint_url)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {manifest.get('format_version')!r} is not {FORMAT_VERSION}; "
                        f"run ddpm preprocess again")
    return manifest


def load_dataset(
    uri: str, *, columns: Sequence[str] | None = None, endpoint_url: str | None = None
) -> "ray.data.Dataset":
    """The dataset at ``uri`` as a Ray Dataset, reading only the shards its manifest lists.

    Columns: ``image`` as (H, W, C) uint8 tensors (batches come out as (B, H, W, C)), ``label`` int64, ``key`` and
    ``sha256`` strings, and ``caption`` (str) in a captioned dataset. Pass ``columns`` to read fewer, e.g.
    ``["image", "label"]`` for training.
    """
    import ray.data

    from pipelines.ray_utils import init_ray

    manifest = read_manifest(uri, endpoint_url=endpoint_url)
    fs, root = storage.filesystem_for(uri, endpoint_url)
    init_ray()
    context = ray.data.DataContext.get_current()
    chosen = context.use_datasource_v2
    context.use_datasource_v2 = PARQUET_READER_V2
    try:
        ds = ray.data.read_parquet(
            [f"{root}/{shard}" for shard in manifest["shards"]], filesystem=fs,
            columns=list(columns) if columns else None)
    finally:
        context.use_datasource_v2 = chosen
    if columns is None or "image" in columns:
        ds = ds.map_batches(_image_tensors, batch_format="pyarrow",
                            fn_kwargs={"shape": manifest["image_shape"], "dtype": image_dtype(manifest).str})
    return ds


def _image_tensors(batch: pa.Table, shape: Sequence[int], dtype: str = "|u1") -> dict[str, np.ndarray]:
    """Ray Data map: the ``image`` column's bytes -> (B, H, W, C) of ``dtype``; other columns unchanged."""
    out = {name: batch.column(name).to_numpy() for name in batch.column_names if name != "image"}
    out["image"] = images_from_arrow(batch.column("image"), shape, np.dtype(dtype))
    return out


def load_numpy(uri: str, *, endpoint_url: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A small dataset in memory without Ray: images (N, H, W, C) uint8 (or a latent dataset's float32 latents)
    and labels (N,) int64, in shard order."""
    manifest = read_manifest(uri, endpoint_url=endpoint_url)
    table = read_columns(uri, manifest["shards"], ["image", "label"], endpoint_url)
    images = images_from_arrow(table.column("image"), manifest["image_shape"], image_dtype(manifest)).copy()
    return images, table.column("label").to_numpy()


def load_captions(uri: str, *, endpoint_url: str | None = None) -> list[str]:
    """A captioned dataset's captions without Ray, in shard order: ``captions[i]`` is the caption of
    ``load_numpy(uri)[0][i]`` ("" for an image kept without one). A UserError for a dataset without captions."""
    manifest = read_manifest(uri, endpoint_url=endpoint_url)
    if not is_captioned(manifest):
        raise UserError(f"{uri} has no captions: run ddpm preprocess --captions on captioned images")
    return read_columns(uri, manifest["shards"], ["caption"], endpoint_url).column("caption").to_pylist()
