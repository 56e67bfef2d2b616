"""The ``ddpm train`` driver: its :class:`pipelines.train.stage.Stage` (fit the config to the dataset, refuse an
incompatible resume, put the dataset in Ray's object store and launch the workers); the rest of the run (workers,
the MLflow run, the TorchTrainer, registration) is :func:`pipelines.train.stage.run_stage`'s. The workers' loop is
:mod:`pipelines.train.worker`."""

from __future__ import annotations

import os
from dataclasses import replace

from pipelines import storage as store
from pipelines.data.dataset import autoencoder_copy, is_latent, load_dataset
from pipelines.errors import UserError
from pipelines.train.checkpoints import TrainingState
from pipelines.train.resources import Workers
from pipelines.train.rows import Blocks
from pipelines.train.stage import Stage, StageResult, check_not_past_end, run_stage
from pipelines.train.worker import FAIL_AFTER_ENV, WorkerJob, train_worker

TrainResult = StageResult  # run_id, images_seen, checkpoint (URI), model_version, unlogged


def train(
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
) -> TrainResult:
    """Train ``config`` (a :class:`pipelines.config.Config`) on the dataset at ``data``, checkpoints to STORAGE/NAME.

    Exactly ``train.total_images`` images, or fewer when ``train.max_minutes`` of training run out first (counted
    over resumed attempts). Running it again with the same ``name`` resumes from the run's latest complete
    checkpoint, in the same MLflow run; a run that already holds its final checkpoint only registers.

    ``num_workers`` is a fixed N or an elastic range ``"MIN-MAX"`` (:class:`pipelines.train.resources.Workers`):
    the global batch, the steps and the order of the images stay those of the config whatever the group's size.
    The rest (workers, CPUs, placement, the MLflow run, registration) is :func:`pipelines.train.stage.run_stage`.
    """
    return run_stage(DDPM_STAGE, data, config, storage=storage, name=name, num_workers=num_workers, use_gpu=use_gpu,
                     cpus_per_worker=cpus_per_worker, placement=placement, register_as=register_as,
                     tracking_uri=tracking_uri, experiment=experiment, resource_wait_s=resource_wait_s)


def fit_to_dataset(config, manifest: dict, data: str):
    """Check the model's image shape against the dataset's; set the number of classes for conditional training.

    A latent dataset (``ddpm encode``) sets the model's input shape from its manifest: the latents' side and
    channels follow from the autoencoder, not from the recipe.
    """
    h, w, c = manifest["image_shape"]
    m = config.model
    if is_latent(manifest):
        if config.train.random_flip:
            raise UserError(f"{data} holds latents, which cannot be mirrored at training time (a mirrored latent is "
                            f"not the latent of the mirrored image): set --set train.random_flip=false, and run "
                            f"ddpm encode --flip to store the mirrored images' latents as well")
        if h != w:
            raise UserError(f"{data} holds {h}x{w} latents; the U-Net takes square inputs")
        try:
            config = replace(config, model=replace(m, image_size=h, in_channels=c))
        except ValueError as exc:
            raise UserError(f"{data} holds {h}x{w}x{c} latents, which model {m.to_dict()} cannot take: {exc}") from None
        m = config.model
    if (m.image_size, m.image_size, m.in_channels) != (h, w, c):
        raise UserError(f"{data} holds {h}x{w}x{c} images but the model takes {m.image_size}x{m.image_size}x"
                        f"{m.in_channels}; set --set model.image_size={h} --set model.in_channels={c}")
    if config.train.class_conditional:
        classes = manifest.get("class_names") or []
        if not classes:
            raise UserError(f"{data} has no class labels; set --set train.class_conditional=false")
        config = config.with_num_classes(len(classes))
    return config


def latent_autoencoder(data: str, manifest: dict) -> dict | None:
    """For a latent dataset: where its copy of the autoencoder is (``uri``) and where that came from
    (``source``: uri, name, version, sha256), which the model's checkpoints carry; None for pixels."""
    if not is_latent(manifest):
        return None
    info = manifest["autoencoder"]
    source = {k: info.get(k) for k in ("uri", "name", "version", "sha256")}
    return {"uri": autoencoder_copy(data, manifest), "source": source}  # its sha256 checked against the manifest


def check_resumable(state: TrainingState, config, name: str) -> None:
    """A run resumes only with the same model, schedule and objective, and never past its end."""
    saved = state.config
    current = config.to_dict()
    for section in ("model", "schedule"):
        for key in sorted(set(saved[section]) | set(current[section])):
            if saved[section].get(key) != current[section].get(key):
                raise UserError(f"run {name} was trained with {section}.{key}={saved[section].get(key)!r}, "
                                f"not {current[section].get(key)!r}; use another --name for a new run")
    if saved["train"]["prediction_type"] != config.train.prediction_type:
        raise UserError(f"run {name} was trained with train.prediction_type={saved['train']['prediction_type']}")
    check_not_past_end(state, config, name)


def _launch(data: str, config, manifest: dict, *, storage: str, name: str, run_id: str, tracking_uri: str):
    """(the worker function, its loop config): the dataset in Ray's object store and the workers' job."""
    # The dataset is read once into Ray's object store (spilled to disk if it must), shuffled once so that each
    # block mixes the classes, and the workers take their rows from its blocks (pipelines.train.rows): training
    # then needs no read tasks, so the workers may reserve every CPU of their nodes.
    dataset = load_dataset(data, columns=["image", "label"]).random_shuffle(seed=config.train.seed)
    dataset.context.enable_progress_bars = False
    blocks = Blocks.of(dataset.materialize())
    fail_after = os.environ.get(FAIL_AFTER_ENV)
    job = WorkerJob(
        config=config,
        class_names=tuple(manifest.get("class_names") or []),
        fingerprint=manifest["fingerprint"],
        run_id=run_id,
        tracking_uri=tracking_uri,
        storage=storage,
        name=name,
        endpoint_url=store.resolve_endpoint(None),
        fail_after_images=int(fail_after) if fail_after else None,
        blocks=blocks,
        autoencoder=latent_autoencoder(data, manifest),
    )
    return train_worker, job.loop_config()


DDPM_STAGE = Stage(check=fit_to_dataset, check_resumable=check_resumable, launch=_launch)


