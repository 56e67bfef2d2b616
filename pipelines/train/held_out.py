"""A fixed held-out split of a processed dataset, for the stages that score themselves on images they never train
on (``ddpm train-autoencoder``'s PSNR, ``ddpm train-clip``'s retrieval).

The held-out rows are the first ``eval_images`` of a permutation drawn from ``seed`` over the rows in the manifest's
shard order, named by their ``sha256`` (so the split does not depend on how Ray reads the shards; identical images
are held out together). The rest, shuffled once, are the training rows as :class:`pipelines.train.rows.Blocks`.
"""

from __future__ import annotations

import numpy as np

from pipelines.data.dataset import load_dataset, read_columns
from pipelines.errors import UserError
from pipelines.train.rows import Blocks


def check_room_to_hold_out(config, manifest: dict, data: str) -> None:
    """Refuse, before anything starts, a dataset whose manifest counts no more rows than ``train.eval_images``."""
    rows = int((manifest.get("counts") or {}).get("rows") or 0)
    if rows and config.train.eval_images >= rows:
        raise UserError(f"{data} has {rows} images, not more than train.eval_images={config.train.eval_images} "
                        f"held out; set --set train.eval_images=N with N < {rows}")


def held_out_keys(data: str, manifest: dict, eval_images: int, seed: int) -> list[str]:
    """The sha256 of the held-out rows, in their order: the first ``eval_images`` of a permutation drawn from
    ``seed`` over the rows in the manifest's shard order (only the sha256 column is read)."""
    keys = read_columns(data, manifest["shards"], ["sha256"], None).column("sha256").to_pylist()
    if eval_images >= len(keys):
        raise UserError(f"{data} has {len(keys)} images, not more than train.eval_images={eval_images} held out; "
                        f"set --set train.eval_images=N with N < {len(keys)}")
    order = np.random.default_rng([seed, 0xE7A1]).permutation(len(keys))
    chosen: dict[str, None] = {}  # ordered; identical images (one sha256) are held out together
    for i in order:
        chosen.setdefault(keys[i])
        if len(chosen) == eval_images:
            break
    return list(chosen)


def _select(batch: dict, keys: list[str], keep: bool) -> dict:
    """Ray Data map: the rows whose sha256 is (``keep``) or is not in ``keys``; the sha256 column dropped when not
    kept."""
    mask = np.isin(batch["sha256"].astype(str), np.asarray(keys, dtype=str))
    mask = mask if keep else ~mask
    return {k: v[mask] for k, v in batch.items() if keep or k != "sha256"}


def split(data: str, manifest: dict, *, eval_images: int, seed: int, columns=("image", "label", "sha256"),
          train_map=None, train_map_kwargs: dict | None = None) -> tuple[Blocks, list[dict]]:
    """(the training rows as Blocks, the held-out rows as dicts of ``columns`` in their fixed order).

    ``train_map`` (a Ray Data numpy batch function with ``train_map_kwargs``) turns the training rows into what
    the workers read: ``image`` and ``label`` columns (:class:`pipelines.train.rows.Rows`).
    """
    keys = held_out_keys(data, manifest, eval_images, seed)
    base = load_dataset(data, columns=list(columns))
    base.context.enable_progress_bars = False
    base = base.materialize()
    held = base.map_batches(_select, batch_format="numpy", fn_kwargs={"keys": keys, "keep": True}).take_all()
    rank = {key: i for i, key in enumerate(keys)}
    held = sorted(held, key=lambda row: (rank[str(row["sha256"])], str(row["sha256"])))[:eval_images]
    train = base.map_batches(_select, batch_format="numpy", fn_kwargs={"keys": keys, "keep": False})
    if train_map is not None:
        train = train.map_batches(train_map, batch_format="numpy", fn_kwargs=train_map_kwargs or {})
    blocks = Blocks.of(train.random_shuffle(seed=seed).materialize())
    if blocks.num_rows == 0:
        raise UserError(f"{data}: no images left to train on after holding out {len(held)}")
    return blocks, held
