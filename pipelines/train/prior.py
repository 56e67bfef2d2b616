"""The ``ddpm train-prior`` driver: train unCLIP's prior (``ddpm.prior``) on a captioned dataset and a frozen CLIP
on Ray Train, with the machinery every trainer shares (:func:`pipelines.train.stage.run_stage`: workers, the MLflow
run, checkpoints and exact resume, registration), then register it.

Before the workers start, on the driver:

- ``train.clip`` (``--clip``) is resolved: a registered CLIP (``models:/NAME/VERSION`` or ``@ALIAS``) or a folder
  ``ddpm.clip.load`` reads. Its files go to the workers through Ray's object store, and every checkpoint pins them
  (``model/clip/``); a resume whose CLIP now resolves to other weights is refused;
- ``train.eval_images`` rows are held out (:mod:`pipelines.train.held_out`, the same split rule as train-clip's);
- every distinct caption is tokenized once with the CLIP's tokenizer; a training row carries its caption's index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import ray

from pipelines import registry
from pipelines import storage as store
from pipelines.data.dataset import read_columns
from pipelines.errors import UserError
from pipelines.train import clip as clip_stage
from pipelines.train.checkpoints import STATE_JSON, TrainingState
from pipelines.train.encoders import resolve_clip
from pipelines.train.held_out import check_room_to_hold_out, split
from pipelines.train.loop import LoopJob, train_loop_worker
from pipelines.train.prior_worker import PriorTask
from pipelines.train.resources import Workers
from pipelines.train.stage import Stage, run_stage

@dataclass(frozen=True)
class PriorTrainResult:
    run_id: str
    images_seen: int
    checkpoint: str  # URI of the final checkpoint folder (its model/ is the prior's folder)
    model_version: str | None  # None without --register-as
    scores: dict[str, float] = field(default_factory=dict)  # the held-out evaluation at the final checkpoint
    unlogged: list[str] = field(default_factory=list)


def train_prior(data: str, config, *, storage: str, name: str, num_workers: int | str | Workers = 1,
                use_gpu: bool = False, cpus_per_worker: int | None = None, placement: str | None = None,
                register_as: str | None = None, tracking_uri: str | None = None, experiment: str = "ddpm",
                resource_wait_s: float | None = None) -> PriorTrainResult:
    """Train ``config`` (:class:`pipelines.train.prior_config.PriorRunConfig`) on the captioned dataset at
    ``data``, checkpoints to STORAGE/NAME; the arguments are those of :func:`pipelines.train.stage.run_stage`.
    Running it again with the same ``name`` resumes exactly; a finished run only registers."""
    if not config.train.clip:
        raise UserError("train-prior needs the CLIP whose embeddings it learns: --clip models:/NAME/VERSION")
    loaded, files, source = resolve_clip(config.train.clip, tracking_uri, what="train.clip")
    final: dict = {}

    def tags(folder: Path) -> dict:
        metrics = TrainingState.from_json(json.loads((folder / STATE_JSON).read_text())).metrics
        final.update({k: v for k, v in metrics.items() if k.startswith(("prior_", "text_"))})
        clip_tag = f"models:/{source['name']}/{source['version']}" if source.get("version") else source["uri"]
        return {"kind": "prior", "clip": clip_tag, **{k: f"{v:.4g}" for k, v in final.items()}}

    def check(config, manifest: dict, data: str):
        return check_dataset(config, manifest, data, loaded.model.config, source["uri"])

    def launch(data, config, manifest, *, storage, name, run_id, tracking_uri):
        return _launch(data, config, manifest, loaded=loaded, files=files, source=source, storage=storage,
                       name=name, run_id=run_id, tracking_uri=tracking_uri)

    def check_resumable(state: TrainingState, config, name: str) -> None:
        clip_stage.check_resumable(state, config, name)  # the model, the split, not past the end
        pinned = (state.config.get("train") or {}).get("clip_sha256")
        if pinned and pinned != source["sha256"]:
            raise UserError(f"run {name} was trained on a CLIP with weights sha256 {pinned[:12]}, but "
                            f"train.clip={config.train.clip} is now {source['sha256'][:12]}; pin the version "
                            f"(models:/NAME/VERSION) or use another --name for a new run")

    config = replace(config, train=replace(config.train, clip_sha256=source["sha256"]))
    stage = Stage(check=check, check_resumable=check_resumable, launch=launch,
                  log_model=registry.log_prior, extra_tags=tags)
    result = run_stage(stage, data, config, storage=storage, name=name, num_workers=num_workers, use_gpu=use_gpu,
                       cpus_per_worker=cpus_per_worker, placement=placement, register_as=register_as,
                       tracking_uri=tracking_uri, experiment=experiment, resource_wait_s=resource_wait_s)
    return PriorTrainResult(result.run_id, result.images_seen, result.checkpoint, result.model_version, dict(final),
                            result.unlogged)


def check_dataset(config, manifest: dict, data: str, clip_config, clip_uri: str):
    """Captioned pixels of the size and channels the CLIP (``clip_config``) takes, more than the held-out rows."""
    clip_stage.check_captioned(manifest, data, "the prior")
    h, w, c = manifest["image_shape"]
    cfg = clip_config
    if (h, w, c) != (cfg.image_size, cfg.image_size, cfg.in_channels):
        raise UserError(f"{data} holds {h}x{w}x{c} images; the CLIP {clip_uri} takes {cfg.image_size}x"
                        f"{cfg.image_size}x{cfg.in_channels}")
    check_room_to_hold_out(config, manifest, data)
    return config


def _launch(data: str, config, manifest: dict, *, loaded, files: dict, source: dict, storage: str, name: str,
            run_id: str, tracking_uri: str):
    """(the worker function, its loop config): the split, the captions' ids and the CLIP (``loaded``, and its
    ``files`` for the workers)."""
    from pipelines.actors import put_payload

    tc = config.train
    cfg = loaded.model.config
    table = read_columns(data, manifest["shards"], ["caption"], None)
    distinct = np.asarray(sorted(set(table.column("caption").to_pylist())), dtype=str)
    blocks, held = split(data, manifest, eval_images=tc.eval_images, seed=tc.seed,
                         columns=("image", "caption", "sha256"), train_map=clip_stage.caption_index,
                         train_map_kwargs={"captions": distinct})
    held_captions = [str(row["caption"]) for row in held]
    held_out = {"images": np.stack([np.asarray(row["image"], dtype=np.uint8) for row in held]),  # (N, H, W, C)
                "caption_index": np.searchsorted(distinct, np.asarray(held_captions, dtype=str)).astype(np.int64),
                "caption_ids": loaded.tokenizer.tokenize(held_captions).numpy()}
    print(f"{blocks.num_rows} training images ({len(distinct)} distinct captions), {len(held)} held out; CLIP "
          f"{source['uri']}: embeddings of {cfg.embed_dim}, token states of {cfg.text_width}", flush=True)
    prior_config = config.model.prior_config(cfg.embed_dim, cfg.text_width)
    ids = loaded.tokenizer.tokenize(list(distinct) + [""]).numpy()  # (U + 1, L): the empty caption last
    task = PriorTask(prior_config=prior_config.to_dict(), schedule=config.model.noise_schedule().to_config(),
                     clip_files=put_payload(files), clip_source={k: source[k] for k in ("uri", "name", "version")},
                     caption_ids=ray.put(ids), held_out=ray.put(held_out), caption_dropout=tc.caption_dropout,
                     eval_steps=tc.eval_steps, eval_guidance_scale=tc.eval_guidance_scale)
    job = LoopJob(config=config, task=task, fingerprint=manifest["fingerprint"], run_id=run_id,
                  tracking_uri=tracking_uri, storage=storage, name=name, endpoint_url=store.resolve_endpoint(None),
                  blocks=blocks)
    return train_loop_worker, job.loop_config()

