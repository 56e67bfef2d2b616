"""``ddpm pipeline``: ingest -> train -> evaluate -> register (-> promote when the gate passes), as one job.

Every location comes from the config's ``pipeline`` section (or ``--set pipeline.KEY=VALUE``), so the same command
runs on a laptop with local folders and on a cluster with ``s3://`` URIs and ``MLFLOW_TRACKING_URI``; send it to a
cluster with ``ddpm submit -- pipeline --config ...``. Each stage is the library function its own subcommand calls.

A latent recipe (``pipeline.latents`` set, e.g. ``configs/photos-latent.yaml``) adds two stages after ingest:
train-autoencoder (unless ``pipeline.autoencoder`` names one) and encode; the DDPM then trains on the latents, and
evaluation, registration and the gate see a model that makes pixels (it carries its autoencoder).

A text recipe (``pipeline.clip_config`` set, e.g. ``configs/shapes-text.yaml``) adds train-clip after ingest: a CLIP
trained on the captions, registered, and named as the DDPM's ``train.text_encoder``.

An unCLIP recipe (``pipeline.prior_config`` set too, e.g. ``configs/shapes-unclip.yaml``) names that CLIP as the
DDPM's ``train.image_encoder`` instead, trains a prior on it (train-prior), trains the DDPM as unCLIP's decoder
(registered as ``<register_as>-decoder``), and registers prior + decoder as one model, ``register_as``
(:func:`pipelines.registry.unclip.register_unclip`), which evaluation, the gate and the doors then take prompts for.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

HELP = "run ingest -> train -> evaluate -> register (-> promote) as one job"
EXAMPLE = """example:
  ddpm pipeline --config configs/digits.yaml
  ddpm pipeline --config configs/digits.yaml --set pipeline.processed=s3://bucket/processed/digits \\
      --set pipeline.storage=s3://bucket/runs --set pipeline.run_name=digits-2026-11-26 --set pipeline.num_workers=4
  ddpm submit -- pipeline --config configs/digits.yaml --set pipeline.use_gpu=true
  ddpm pipeline --config configs/photos-latent.yaml      # photos -> autoencoder -> latents -> latent DDPM
  ddpm pipeline --config configs/shapes-text.yaml        # captioned shapes -> CLIP -> text-conditioned DDPM
  ddpm pipeline --config configs/shapes-unclip.yaml      # captioned shapes -> CLIP -> prior + decoder (DALL-E 2)
"""


@dataclass
class PipelineResult:
    processed: str  # the images (a latent recipe's DDPM trained on ``latents``, made from these)
    run_id: str
    images_seen: int
    model_name: str
    version: str | None
    promoted: bool
    gate_reason: str
    metrics: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    latents: str | None = None
    autoencoder: str | None = None  # the autoencoder the model decodes with: models:/NAME/VERSION or a folder
    text_encoder: str | None = None  # the text model's encoder: the CLIP trained here, or train.text_encoder
    prior: str | None = None  # an unCLIP recipe's prior and decoder, as models:/NAME/VERSION
    decoder: str | None = None


def absolute(uri: str) -> str:
    """Local paths become absolute (Ray workers do not share the driver's working directory); URIs stay."""
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def ingest(config, *, log=print) -> tuple[str, dict]:
    """Write the built-in digits, photos or shapes if asked, then preprocess, reusing an output whose manifest
    matches the settings."""
    from pipelines import storage
    from pipelines.data.digits import write_digits
    from pipelines.data.dataset import read_manifest
    from pipelines.data.photos import write_photos
    from pipelines.data.preprocess import preprocess
    from pipelines.data.shapes import write_shapes

    p = config.pipeline
    builtin = p.raw in ("digits", "photos", "shapes")
    raw = absolute(p.raw_output) if builtin else absolute(p.raw)
    processed = absolute(p.processed)
    if p.raw == "digits" and not storage.list_files(raw):
        log(f"[data] writing scikit-learn's digits to {raw}")
        write_digits(raw)
    if p.raw == "photos" and not storage.list_files(raw):
        log(f"[data] writing {p.photos_count:,} crops of scikit-image's photographs at {p.resolution}x{p.resolution} "
            f"to {raw}")
        write_photos(raw, count=p.photos_count, size=p.resolution, seed=config.train.seed)
    if p.raw == "shapes" and not storage.list_files(raw):
        log(f"[data] writing {p.shapes_count:,} captioned scenes of shapes at {p.resolution}x{p.resolution} to {raw}")
        write_shapes(raw, count=p.shapes_count, size=p.resolution, seed=config.train.seed)
    if storage.exists(storage.join(processed, "manifest.json")):
        manifest = read_manifest(processed)
        if (tuple(manifest["image_shape"]) == (p.resolution, p.resolution, p.channels)
                and manifest.get("source") in (None, raw)
                and manifest.get("caption_policy") == p.captions):
            log(f"[ingest] reusing {processed} ({manifest['counts']['rows']} images, "
                f"fingerprint {manifest['fingerprint'][:12]})")
            return processed, manifest
    log(f"[ingest] {raw} -> {processed} at {p.resolution}x{p.resolution}x{p.channels}")
    manifest = preprocess(raw, processed, resolution=p.resolution, channels=p.channels, small=p.small,
                          captions=p.captions, progress=log)  # its lines say [ingest] themselves
    log(f"[ingest] {manifest['counts']['rows']} images, {len(manifest['skipped'])} skipped")
    return processed, manifest


def run_pipeline(config, *, tracking_uri: str | None = None, log=print) -> PipelineResult:
    """Run every stage for ``config`` (a :class:`pipelines.config.Config`); returns what happened."""
    from pipelines import tracking
    from pipelines.evaluate.gate import evaluate_and_gate
    from pipelines.ray_utils import init_ray
    from pipelines.registry import promote
    from pipelines.train.driver import train

    p = config.pipeline
    uri = tracking_uri or tracking.tracking_uri()
    seconds = {}
    init_ray()

    start = time.monotonic()
    processed, _ = ingest(config, log=log)
    seconds["ingest"] = time.monotonic() - start

    unclip = p.prior_config is not None
    if p.clip_config is not None:
        clip = clip_stage(config, processed, tracking_uri=uri, seconds=seconds, log=log)
        config = replace(config, train=replace(config.train, **{"image_encoder" if unclip else "text_encoder": clip}))
    prior = prior_stage(config, processed, tracking_uri=uri, seconds=seconds, log=log) if unclip else None

    training_data, autoencoder = processed, None
    if p.latents is not None:
        autoencoder = latent_stages(config, processed, tracking_uri=uri, seconds=seconds, log=log)
        training_data = absolute(p.latents)

    start = time.monotonic()
    limit = f" or {config.train.max_minutes:g} minutes" if config.train.max_minutes is not None else ""
    log(f"[train] {'unCLIP decoder: ' if unclip else ''}{p.num_workers} workers, {config.train.total_images:,} "
        f"images{limit}, run {p.run_name!r}")
    trained_as = f"{p.register_as}-decoder" if unclip else p.register_as
    result = train(training_data, config, storage=absolute(p.storage), name=p.run_name, num_workers=p.num_workers,
                   use_gpu=p.use_gpu, register_as=trained_as, tracking_uri=uri, experiment=p.experiment)
    seconds["train"] = time.monotonic() - start
    log(f"[register] {trained_as} version {result.model_version} (run {result.run_id})")
    version, decoder = result.model_version, None
    if unclip:
        from pipelines.registry.unclip import register_unclip

        decoder = f"models:/{trained_as}/{result.model_version}"
        version = register_unclip(prior, decoder, p.register_as, tracking_uri=uri, experiment=p.experiment,
                                  say=lambda line: log(f"[unclip] {line}")).version

    start = time.monotonic()
    decision = evaluate_and_gate(p.register_as, version, data=processed, alias=p.promote_to,
                                 metric=p.gate_metric, num_samples=p.eval_samples, sampler=p.eval_sampler,
                                 steps=p.eval_steps, guidance_scale=p.eval_guidance_scale,
                                 seed=p.eval_seed, inception_weights=p.inception_weights,
                                 max_ratio=p.gate_max_ratio, min_recall=p.gate_min_recall,
                                 min_alignment=p.gate_min_alignment, images_per_prompt=p.eval_images_per_prompt,
                                 tracking_uri=uri, log=log)
    seconds["evaluate"] = time.monotonic() - start
    if decision.promote:
        promote(p.register_as, version, p.promote_to, tracking_uri=uri)
    log(f"[gate] {'promoted to ' + p.promote_to if decision.promote else 'not promoted'}: {decision.reason}")
    return PipelineResult(processed, result.run_id, result.images_seen, p.register_as, version,
                          decision.promote, decision.reason, dict(decision.metrics), seconds,
                          absolute(p.latents) if p.latents is not None else None, autoencoder,
                          config.train.text_encoder, prior, decoder)


def project_file(path: str) -> Path:
    """A preset named relative to the project root (``configs/...``), wherever the command runs from."""
    found = Path(path)
    if not found.is_absolute() and not found.exists():
        found = Path(__file__).resolve().parents[2] / found
    return found


def clip_stage(config, processed: str, *, tracking_uri: str, seconds: dict, log=print) -> str:
    """train-clip on the captioned data, registered as ``pipeline.clip_name``; returns its ``models:/`` URI.

    Resumable as ``ddpm train-clip`` is: run again with the same run name, it resumes from its last checkpoint (or
    only registers, when it has finished)."""
    from pipelines.train.clip import train_clip
    from pipelines.train.clip_config import load_config as load_clip_config

    p = config.pipeline
    start = time.monotonic()
    name = f"{p.run_name}-clip"
    log(f"[clip] {p.clip_config} on {processed}, run {name!r}")
    trained = train_clip(processed, load_clip_config(project_file(p.clip_config), list(p.clip_set)),
                         storage=absolute(p.storage), name=name, num_workers=p.num_workers, use_gpu=p.use_gpu,
                         register_as=p.clip_name, tracking_uri=tracking_uri, experiment=p.experiment)
    clip = f"models:/{p.clip_name}/{trained.model_version}"
    seconds["clip"] = time.monotonic() - start
    scores = ", ".join(f"{k.removeprefix('retrieval_')} {v:.3f}" for k, v in sorted(trained.retrieval.items()))
    log(f"[clip] registered {clip}; held-out text->image retrieval: {scores or 'not measured'}")
    return clip


def prior_stage(config, processed: str, *, tracking_uri: str, seconds: dict, log=print) -> str:
    """train-prior on the captioned data and the decoder's CLIP (``train.image_encoder``), registered as
    ``pipeline.prior_name``; returns its ``models:/`` URI. Resumable as ``ddpm train-prior`` is."""
    from pipelines.errors import UserError
    from pipelines.train.prior import train_prior
    from pipelines.train.prior_config import load_config as load_prior_config

    p = config.pipeline
    clip = config.train.image_encoder
    if not clip:
        raise UserError("pipeline.prior_config: an unCLIP recipe needs its CLIP: set pipeline.clip_config (train one) "
                        "or train.image_encoder")
    start = time.monotonic()
    name = f"{p.run_name}-prior"
    log(f"[prior] {p.prior_config} on {processed} and {clip}, run {name!r}")
    prior_config = load_prior_config(project_file(p.prior_config), [*p.prior_set, f"train.clip={clip}"])
    trained = train_prior(processed, prior_config, storage=absolute(p.storage), name=name,
                          num_workers=p.num_workers, use_gpu=p.use_gpu, register_as=p.prior_name,
                          tracking_uri=tracking_uri, experiment=p.experiment)
    prior = f"models:/{p.prior_name}/{trained.model_version}"
    seconds["prior"] = time.monotonic() - start
    scores = ", ".join(f"{k} {v:.3f}" for k, v in sorted(trained.scores.items()))
    log(f"[prior] registered {prior}; held-out: {scores or 'not measured'}")
    return prior


def latent_stages(config, processed: str, *, tracking_uri: str, seconds: dict, log=print) -> str:
    """train-autoencoder (unless ``pipeline.autoencoder`` names one) and encode; returns the autoencoder's URI.

    Each is resumable the way its own command is: run again with the same run name, the autoencoder's training
    resumes from its last checkpoint (or only registers, when it has finished).
    """
    from pipelines.data.encode import encode
    from pipelines.train.autoencoder import train_autoencoder
    from pipelines.train.autoencoder_config import load_config as load_autoencoder_config

    p = config.pipeline
    autoencoder = p.autoencoder
    if autoencoder is None:
        start = time.monotonic()
        ae_config = load_autoencoder_config(project_file(p.autoencoder_config), list(p.autoencoder_set))
        name = f"{p.run_name}-autoencoder"
        log(f"[autoencoder] {p.autoencoder_config} on {processed}, run {name!r}")
        trained = train_autoencoder(processed, ae_config, storage=absolute(p.storage), name=name,
                                    num_workers=p.num_workers, use_gpu=p.use_gpu, register_as=p.autoencoder_name,
                                    tracking_uri=tracking_uri, experiment=p.experiment)
        autoencoder = f"models:/{p.autoencoder_name}/{trained.model_version}"
        seconds["autoencoder"] = time.monotonic() - start
        psnr = f"{trained.psnr_heldout:.2f} dB" if trained.psnr_heldout is not None else "not measured"
        log(f"[autoencoder] registered {autoencoder}; held-out PSNR {psnr}, scaling factor "
            f"{trained.scaling_factor:.4g}")
    start = time.monotonic()
    latents = absolute(p.latents)
    log(f"[encode] {processed} -> {latents} with {autoencoder}")
    encode(processed, autoencoder, latents, use_gpu=p.use_gpu, flip=p.encode_flip, tracking_uri=tracking_uri,
           progress=log)  # its lines say [encode] themselves
    seconds["encode"] = time.monotonic() - start
    return autoencoder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/digits.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. pipeline.storage=s3://bucket/runs; repeatable")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking server (default: $MLFLOW_TRACKING_URI, else the embedded store)")


def main(args: argparse.Namespace) -> int:
    from pipelines.config import load_config

    config = load_config(args.config, args.set)
    result = run_pipeline(config, tracking_uri=args.tracking_uri)
    print(f"done: {result.model_name} version {result.version}, "
          f"{'promoted' if result.promoted else 'not promoted'} ({result.gate_reason})")
    return 0
