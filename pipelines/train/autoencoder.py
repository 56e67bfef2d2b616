"""The ``ddpm train-autoencoder`` driver: train latent diffusion's KL autoencoder on Ray Train with ``ddpm train``'s
machinery (workers and their fit to the cluster, the row order, DDP collectives, checkpoints and exact resume, the
MLflow run and its lineage tags, registration), then register the result as an autoencoder version that
``ddpm encode`` and latent training resolve (:func:`pipelines.registry.resolve_autoencoder`).

The data are a processed dataset (``ddpm preprocess`` output). The first ``train.eval_images`` rows of a seeded
shuffle (by the rows' ``sha256``, so the split does not depend on how Ray reads the shards) are held out: never
trained on, they give the PSNR logged at every checkpoint. The worker loop is
:mod:`pipelines.train.autoencoder_worker`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import ray.train

from pipelines import registry
from pipelines import storage as store
from pipelines import tracking
from pipelines.config import readable
from pipelines.data.dataset import is_latent, load_dataset, read_columns, read_manifest
from pipelines.errors import UserError
from pipelines.ray_utils import init_ray, verbose
from pipelines.train.autoencoder_worker import AutoencoderJob, train_autoencoder_worker
from pipelines.train.checkpoints import MODEL_DIR, STATE_JSON, TrainingState, latest_checkpoint
from pipelines.train.driver import default_cpus_per_worker, run_trainer
from pipelines.train.resources import Workers, check_workers_fit
from pipelines.train.rows import Blocks
from pipelines.train.run import finish_run, killed_on_interrupt, open_run

# train keys a resumed run must keep: the objective, and what defines the held-out split
RESUME_FIXED = ("loss", "kl_weight", "seed", "eval_images")


@dataclass(frozen=True)
class AutoencoderTrainResult:
    run_id: str
    images_seen: int
    checkpoint: str  # URI of the final checkpoint folder (its model/ is the autoencoder)
    model_version: str | None  # None without --register-as
    psnr_heldout: float | None  # dB, at the final checkpoint
    scaling_factor: float | None
    unlogged: list[str] = field(default_factory=list)


def train_autoencoder(
    data: str,
    config,
    *,
    storage: str,
    name: str,
    num_workers: int | str | Workers = 1,
    use_gpu: bool = False,
    cpus_per_worker: int | None = None,
    placement: str | None = None,
    register_as: str | None = None,
    tracking_uri: str | None = None,
    experiment: str = "ddpm",
    resource_wait_s: float | None = None,
) -> AutoencoderTrainResult:
    """Train ``config`` (:class:`pipelines.train.autoencoder_config.AutoencoderRunConfig`) on the images at ``data``,
    checkpoints to STORAGE/NAME; the arguments are those of :func:`pipelines.train.driver.train`.

    Running it again with the same ``name`` resumes from the run's latest complete checkpoint in the same MLflow
    run (raise ``train.total_images`` to train further); a run that already holds its final checkpoint only
    registers (idempotent: the version is found again by its run_id and images_seen tags).
    """
    manifest = read_manifest(data)
    check_dataset(config, manifest, data)
    if verbose():  # else one line below says where the resolved config is: it is 80 lines
        print(readable(config.to_dict()), flush=True)
    previous = latest_checkpoint(storage, name)
    if previous is not None:
        check_resumable(previous.state, config, name)
    workers = Workers.parse(num_workers)
    init_ray()
    cpus_per_worker = cpus_per_worker or default_cpus_per_worker(workers.max)
    check_workers_fit(workers.min, {"CPU": cpus_per_worker, "GPU": 1 if use_gpu else 0}, wait_s=resource_wait_s)
    uri = tracking_uri or tracking.tracking_uri()
    run_id = open_run(uri, experiment, name, config, manifest, data, previous)

    unlogged: list[str] = []
    with killed_on_interrupt(run_id, uri, storage, name):
        if previous is not None and config.train.finished(previous.state.images_seen, previous.state.train_seconds):
            print(f"run {name} already holds its final checkpoint ({previous.state.images_seen} images); "
                  f"skipping to registration", flush=True)
            final_uri = previous.uri
        else:
            result = _fit(data, config, manifest, storage=storage, name=name, workers=workers, use_gpu=use_gpu,
                          cpus_per_worker=cpus_per_worker, placement=placement, run_id=run_id, tracking_uri=uri)
            final_uri = store.join(storage, name, Path(result.checkpoint.path).name)
            unlogged = list((result.metrics or {}).get("unlogged", []))

    final: dict = {}

    def lineage(folder: Path) -> dict:
        """The version's autoencoder tags, read from the final checkpoint (also kept for the result)."""
        ae = json.loads((folder / MODEL_DIR / "config.json").read_text())["autoencoder"]
        metrics = TrainingState.from_json(json.loads((folder / STATE_JSON).read_text())).metrics
        factor = 2 ** (len(ae["block_out_channels"]) - 1)
        final.update(psnr=metrics.get("psnr_heldout"), scaling=ae["scaling_factor"])
        return {"scaling_factor": f"{ae['scaling_factor']:.6g}", "downsample_factor": factor,
                "latent_channels": ae["latent_channels"], "kind": "autoencoder"}

    with killed_on_interrupt(run_id, uri, storage, name):
        images_seen, version = finish_run(final_uri, run_id=run_id, register_as=register_as, tracking_uri=uri,
                                          config=config, manifest=manifest, log_model=registry.log_autoencoder,
                                          extra_tags=lineage)
    return AutoencoderTrainResult(run_id, images_seen, final_uri, version, final.get("psnr"), final.get("scaling"),
                                  unlogged)


def check_dataset(config, manifest: dict, data: str) -> None:
    """Pixels (not latents), of the model's channels, with sides divisible by its downsampling factor f."""
    if is_latent(manifest):
        raise UserError(f"{data} is a latent dataset (ddpm encode output); train the autoencoder on the processed "
                        f"images (ddpm preprocess output)")
    h, w, c = manifest["image_shape"]
    m = config.model
    if c != m.in_channels:
        raise UserError(f"{data} holds {c}-channel images but the autoencoder takes {m.in_channels}; "
                        f"set --set model.in_channels={c}")
    f = m.downsample_factor
    if h % f or w % f:
        raise UserError(f"{data} holds {h}x{w} images, not divisible by the autoencoder's f={f}; preprocess at a "
                        f"--resolution divisible by {f}, or use fewer levels (model.block_out_channels)")
    rows = int((manifest.get("counts") or {}).get("rows") or 0)
    if rows and config.train.eval_images >= rows:
        raise UserError(f"{data} has {rows} images, not more than train.eval_images={config.train.eval_images} "
                        f"held out; set --set train.eval_images=N with N < {rows}")


def check_resumable(state: TrainingState, config, name: str) -> None:
    """A run resumes only with the same model, objective and held-out split, and never past its end."""
    saved, current = state.config, config.to_dict()
    for key in sorted(set(saved["model"]) | set(current["model"])):
        if key in ("scaling_factor", "shift_factor"):
            continue  # measured, not set
        if saved["model"].get(key) != current["model"].get(key):
            raise UserError(f"run {name} was trained with model.{key}={saved['model'].get(key)!r}, "
                            f"not {current['model'].get(key)!r}; use another --name for a new run")
    for key in RESUME_FIXED:
        if saved["train"].get(key) != current["train"].get(key):
            raise UserError(f"run {name} was trained with train.{key}={saved['train'].get(key)!r}, "
                            f"not {current['train'].get(key)!r}; use another --name for a new run")
    if state.images_seen > config.train.total_images:
        raise UserError(f"run {name} has already seen {state.images_seen} images, more than "
                        f"train.total_images={config.train.total_images}")


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


def _split(data: str, manifest: dict, config) -> tuple[Blocks, np.ndarray]:
    """(the training rows as Blocks, the held-out images (eval_images, H, W, C) uint8 in their fixed order)."""
    tc = config.train
    keys = held_out_keys(data, manifest, tc.eval_images, tc.seed)
    base = load_dataset(data, columns=["image", "label", "sha256"])
    base.context.enable_progress_bars = False
    base = base.materialize()
    held = base.map_batches(_select, batch_format="numpy", fn_kwargs={"keys": keys, "keep": True}).take_all()
    rank = {key: i for i, key in enumerate(keys)}
    held = sorted(held, key=lambda row: (rank[str(row["sha256"])], str(row["sha256"])))[:tc.eval_images]
    held_images = np.stack([np.asarray(row["image"], dtype=np.uint8) for row in held])  # (E, H, W, C)
    train = (base.map_batches(_select, batch_format="numpy", fn_kwargs={"keys": keys, "keep": False})
             .random_shuffle(seed=tc.seed).materialize())
    blocks = Blocks.of(train)
    if blocks.num_rows == 0:
        raise UserError(f"{data}: no images left to train on after holding out {len(held_images)}")
    return blocks, held_images


def _fit(data: str, config, manifest: dict, *, storage: str, name: str, workers: Workers, use_gpu: bool,
         cpus_per_worker: int, placement: str | None, run_id: str, tracking_uri: str):
    """Run the TorchTrainer; returns its Result (the final checkpoint in ``result.checkpoint``). Failures, retries
    and storage outages are handled as in ``ddpm train`` (:func:`pipelines.train.driver.run_trainer`)."""
    blocks, held_images = _split(data, manifest, config)
    print(f"{blocks.num_rows} training images, {len(held_images)} held out", flush=True)
    job = AutoencoderJob(
        config=config,
        fingerprint=manifest["fingerprint"],
        run_id=run_id,
        tracking_uri=tracking_uri,
        storage=storage,
        name=name,
        endpoint_url=store.resolve_endpoint(None),
        blocks=blocks,
        held_out=ray.put(held_images),
    )
    return run_trainer(train_autoencoder_worker, job.loop_config(), config, storage=storage, name=name,
                       workers=workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, placement=placement,
                       run_id=run_id, tracking_uri=tracking_uri)
