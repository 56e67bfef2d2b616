"""The ``ddpm train`` driver: its :class:`pipelines.train.stage.Stage` (fit the config to the dataset, refuse an
incompatible resume, put the dataset in Ray's object store and launch the workers); the rest of the run (workers,
the MLflow run, the TorchTrainer, registration) is :func:`pipelines.train.stage.run_stage`'s. The workers' loop is
:mod:`pipelines.train.worker`."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from pipelines import storage as store
from pipelines.data.dataset import (autoencoder_copy, images_from_arrow, is_captioned, is_latent, load_dataset,
                                    read_columns)
from pipelines.errors import UserError
from pipelines.train.checkpoints import TrainingState
from pipelines.train.resources import Workers
from pipelines.train.rows import Blocks
from pipelines.train.stage import Stage, StageResult, check_not_past_end, run_stage
from pipelines.train.encoders import (IMAGE, TEXT, ResolvedEncoder, check_pinned, for_workers, resolve_image_encoder,
                                      resolve_text_encoder, tag)
from pipelines.train.worker import FAIL_AFTER_ENV, SAMPLE_TEXT_ROWS, WorkerJob, train_worker

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

    A text model (``train.text_encoder``) and unCLIP's decoder (``train.image_encoder``, a CLIP) resolve their
    encoders here, once, before anything else (:mod:`pipelines.train.encoders`); a resumed run must resolve them to
    the weights its checkpoints carry.
    """
    stage = DDPM_STAGE
    tc = config.train
    encoders = {"text_encoder": resolve_text_encoder(tc.text_encoder, tracking_uri) if tc.text_encoder else None,
                "image_encoder": resolve_image_encoder(tc.image_encoder, tracking_uri) if tc.image_encoder else None}
    if any(encoders.values()):
        for resolved in filter(None, encoders.values()):
            check_pinned(resolved, storage, name)
        stage = replace(stage, check=partial(fit_to_dataset, **encoders), launch=partial(_launch, **encoders))
    return run_stage(stage, data, config, storage=storage, name=name, num_workers=num_workers, use_gpu=use_gpu,
                     cpus_per_worker=cpus_per_worker, placement=placement, register_as=register_as,
                     tracking_uri=tracking_uri, experiment=experiment, resource_wait_s=resource_wait_s)


def fit_to_dataset(config, manifest: dict, data: str, text_encoder: ResolvedEncoder | None = None,
                   image_encoder: ResolvedEncoder | None = None):
    """Check the model's image shape against the dataset's; set the number of classes for conditional training,
    the width of the text encoder's token states (``model.text_dim``) for a text model, and the width of the CLIP's
    image embedding (``model.image_dim``) for unCLIP's decoder.

    A latent dataset (``ddpm encode``) sets the model's input shape from its manifest: the latents' side and
    channels follow from the autoencoder, not from the recipe. ``text_encoder`` / ``image_encoder``:
    ``train.text_encoder`` / ``train.image_encoder`` resolved (:mod:`pipelines.train.encoders`; resolved here when
    not given).
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
    return _fit_image(_fit_text(config, manifest, data, text_encoder), manifest, data, image_encoder)


def _fit_text(config, manifest: dict, data: str, text_encoder: ResolvedEncoder | None):
    """A text model's checks: captions to condition on, no class labels beside them; text_dim = the encoder's
    width."""
    tc = config.train
    if not tc.text_encoder:
        if config.model.text_dim:
            raise UserError(f"model.text_dim={config.model.text_dim} is set from the text encoder's width: set "
                            f"--set train.text_encoder=URI (or model.text_dim=0)")
        return config
    if not is_captioned(manifest):
        raise UserError(f"{data} has no captions for train.text_encoder to encode: run ddpm preprocess --captions "
                        f"on captioned images (or set --set train.text_encoder=null)")
    if tc.class_conditional:
        raise UserError("train.class_conditional and train.text_encoder: a model is conditioned on class labels or "
                        "on captions, not both; set --set train.class_conditional=false")
    text_encoder = text_encoder or resolve_text_encoder(tc.text_encoder)
    return replace(config, model=replace(config.model, text_dim=text_encoder.width))


def _fit_image(config, manifest: dict, data: str, image_encoder: ResolvedEncoder | None):
    """unCLIP's decoder's checks: pixels of the size the CLIP embeds, no class labels beside the embedding;
    image_dim = the CLIP's embedding width."""
    tc = config.train
    if not tc.image_encoder:
        if config.model.image_dim:
            raise UserError(f"model.image_dim={config.model.image_dim} is set from the CLIP's embedding width: set "
                            f"--set train.image_encoder=URI (or model.image_dim=0)")
        return config
    if is_latent(manifest):
        raise UserError(f"{data} holds latents, but unCLIP's decoder embeds each training image with its CLIP, which "
                        f"reads pixels: train the decoder on the processed images (a latent decoder is not built yet)")
    if tc.class_conditional:
        raise UserError("train.class_conditional and train.image_encoder: a decoder is conditioned on image "
                        "embeddings, not class labels; set --set train.class_conditional=false")
    image_encoder = image_encoder or resolve_image_encoder(tc.image_encoder)
    shape = tuple(manifest["image_shape"])
    if shape != image_encoder.image_shape:
        h, w, c = image_encoder.image_shape
        raise UserError(f"{data} holds {'x'.join(map(str, shape))} images; the CLIP {tc.image_encoder} embeds "
                        f"{h}x{w}x{c}")
    return replace(config, model=replace(config.model, image_dim=image_encoder.width))


def sample_captions(data: str, manifest: dict, count: int = SAMPLE_TEXT_ROWS) -> tuple[str, ...]:
    """The captions of a text model's sample grids: the dataset's first ``count`` distinct non-empty ones, in shard
    order (only the caption column is read)."""
    captions = read_columns(data, manifest["shards"], ["caption"], None).column("caption").to_pylist()
    return tuple(c for c in dict.fromkeys(captions) if c)[:count]


def sample_images(data: str, manifest: dict, count: int = SAMPLE_TEXT_ROWS) -> tuple[np.ndarray, tuple[str, ...]]:
    """The images of unCLIP's decoder's sample grids, one row of variations each: the dataset's first ``count``
    (count, H, W, C) uint8 in shard order, with their captions ("" where the dataset has none)."""
    columns = ["image"] + (["caption"] if is_captioned(manifest) else [])
    table = read_columns(data, manifest["shards"], columns, None).slice(0, count)
    images = images_from_arrow(table.column("image"), manifest["image_shape"], np.uint8).copy()  # (count, H, W, C)
    captions = table.column("caption").to_pylist() if "caption" in columns else [""] * len(images)
    return images, tuple(captions)


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


def _launch(data: str, config, manifest: dict, *, storage: str, name: str, run_id: str, tracking_uri: str,
            text_encoder: ResolvedEncoder | None = None, image_encoder: ResolvedEncoder | None = None):
    """(the worker function, its loop config): the dataset in Ray's object store and the workers' job; a text
    model's rows carry their captions, and its encoders (text, CLIP) travel to the workers the same way."""
    # The dataset is read once into Ray's object store (spilled to disk if it must), shuffled once so that each
    # block mixes the classes, and the workers take their rows from its blocks (pipelines.train.rows): training
    # then needs no read tasks, so the workers may reserve every CPU of their nodes.
    columns = ["image", "label"] + (["caption"] if text_encoder is not None else [])
    dataset = load_dataset(data, columns=columns).random_shuffle(seed=config.train.seed)
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
        text_encoder=for_workers(text_encoder) if text_encoder is not None else None,
        image_encoder=for_workers(image_encoder) if image_encoder is not None else None,
    )
    if image_encoder is not None:  # a row of variations per image, each read with its caption by a text decoder
        images, captions = sample_images(data, manifest)
        job = replace(job, sample_images=images, sample_captions=captions if text_encoder is not None else ())
    elif text_encoder is not None:
        job = replace(job, sample_captions=sample_captions(data, manifest))
    return train_worker, job.loop_config()


def version_tags(folder: Path) -> dict:
    """A text model's registered version names its text encoder (``text_encoder``), unCLIP's decoder its CLIP
    (``image_encoder``), as a latent model names its autoencoder; read from the final checkpoint, which carries
    them."""
    from ddpm.checkpoint import CONFIG_FILE

    from pipelines.train.checkpoints import MODEL_DIR

    config = json.loads((folder / MODEL_DIR / CONFIG_FILE).read_text())
    tags = {}
    for kind in (TEXT, IMAGE):
        source = (config.get(kind) or {}).get("source")
        if source is not None:
            tags |= {kind: tag(source), f"{kind}_sha256": str(source.get("sha256"))}
    return tags


DDPM_STAGE = Stage(check=fit_to_dataset, check_resumable=check_resumable, launch=_launch, extra_tags=version_tags)


