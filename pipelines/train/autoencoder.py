"""The ``ddpm train-autoencoder`` driver: train latent diffusion's KL autoencoder on Ray Train with ``ddpm train``'s
machinery (workers and their fit to the cluster, the row order, DDP collectives, checkpoints and exact resume, the
MLflow run and its lineage tags, registration), then register the result as an autoencoder version that
``ddpm encode`` and latent training resolve (:func:`pipelines.registry.resolve_autoencoder`).

The data are a processed dataset (``ddpm preprocess`` output). ``train.eval_images`` rows are held out
(:mod:`pipelines.train.held_out`): never trained on, they give the PSNR logged at every checkpoint. The run is
:func:`pipelines.train.stage.run_stage`'s; the worker loop is :mod:`pipelines.train.loop` with
:class:`pipelines.train.autoencoder_worker.AutoencoderTask`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from pipelines import registry
from pipelines import storage as store
from pipelines.data.dataset import is_latent
from pipelines.errors import UserError
from pipelines.train.autoencoder_worker import AutoencoderTask
from pipelines.train.checkpoints import MODEL_DIR, STATE_JSON, TrainingState
from pipelines.train.held_out import check_room_to_hold_out, split
from pipelines.train.loop import LoopJob, train_loop_worker
from pipelines.train.resources import Workers
from pipelines.train.rows import Blocks
from pipelines.train.stage import Stage, check_not_past_end, run_stage

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
    checkpoints to STORAGE/NAME; the arguments are those of :func:`pipelines.train.stage.run_stage`.

    Running it again with the same ``name`` resumes from the run's latest complete checkpoint in the same MLflow
    run (raise ``train.total_images`` to train further); a run that already holds its final checkpoint only
    registers (idempotent: the version is found again by its run_id and images_seen tags).
    """
    final: dict = {}

    def lineage(folder: Path) -> dict:
        """The version's autoencoder tags, read from the final checkpoint (also kept for the result)."""
        ae = json.loads((folder / MODEL_DIR / "config.json").read_text())["autoencoder"]
        metrics = TrainingState.from_json(json.loads((folder / STATE_JSON).read_text())).metrics
        factor = 2 ** (len(ae["block_out_channels"]) - 1)
        final.update(psnr=metrics.get("psnr_heldout"), scaling=ae["scaling_factor"])
        return {"scaling_factor": f"{ae['scaling_factor']:.6g}", "downsample_factor": factor,
                "latent_channels": ae["latent_channels"], "kind": "autoencoder"}

    stage = Stage(check=check_dataset, check_resumable=check_resumable, launch=_launch,
                  log_model=registry.log_autoencoder, extra_tags=lineage)
    result = run_stage(stage, data, config, storage=storage, name=name, num_workers=num_workers, use_gpu=use_gpu,
                       cpus_per_worker=cpus_per_worker, placement=placement, register_as=register_as,
                       tracking_uri=tracking_uri, experiment=experiment, resource_wait_s=resource_wait_s)
    return AutoencoderTrainResult(result.run_id, result.images_seen, result.checkpoint, result.model_version,
                                  final.get("psnr"), final.get("scaling"), result.unlogged)


def check_dataset(config, manifest: dict, data: str):
    """Pixels (not latents), of the model's channels, with sides divisible by its downsampling factor f; returns
    ``config`` unchanged."""
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
    check_room_to_hold_out(config, manifest, data)
    return config


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
    check_not_past_end(state, config, name)


def _split(data: str, manifest: dict, config) -> tuple[Blocks, np.ndarray]:
    """(the training rows as Blocks, the held-out images (eval_images, H, W, C) uint8 in their fixed order)."""
    tc = config.train
    blocks, held = split(data, manifest, eval_images=tc.eval_images, seed=tc.seed)
    return blocks, np.stack([np.asarray(row["image"], dtype=np.uint8) for row in held])  # (E, H, W, C)


def _launch(data: str, config, manifest: dict, *, storage: str, name: str, run_id: str, tracking_uri: str):
    """(the worker function, its loop config): the split in Ray's object store and the workers' job."""
    blocks, held_images = _split(data, manifest, config)
    print(f"{blocks.num_rows} training images, {len(held_images)} held out", flush=True)
    job = LoopJob(config=config, task=AutoencoderTask(config=config, held_out=ray.put(held_images)),
                  fingerprint=manifest["fingerprint"], run_id=run_id, tracking_uri=tracking_uri, storage=storage,
                  name=name, endpoint_url=store.resolve_endpoint(None), blocks=blocks)
    return train_loop_worker, job.loop_config()
