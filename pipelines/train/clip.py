"""The ``ddpm train-clip`` driver: train a small CLIP (``ddpm.clip``) on a captioned dataset's image-caption pairs
on Ray Train, with the machinery every trainer shares (:func:`pipelines.train.stage.run_stage`: workers, the MLflow
run, checkpoints and exact resume, registration), then register it as a CLIP version whose text tower
``ddpm.text.load`` reads (the encoder a text-conditioned U-Net pins).

Before the workers start, on the driver:

- ``train.eval_images`` rows are held out (:mod:`pipelines.train.held_out`): never trained on, they give the
  text -> image retrieval logged at every checkpoint, also over the held-out one-object scenes alone (captions that
  ``ddpm data shapes``' grammar reads as one object);
- the tokenizer is learned from the training captions (``ddpm.text.train_tokenizer``, deterministic), or, when the
  run resumes, read from its checkpoint; the checkpoints carry it (``tokenizer/``, JSON and text);
- every distinct caption is tokenized once; a training row carries its caption's index (:mod:`.clip_worker`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import ray

from ddpm import text
from pipelines import registry
from pipelines import storage as store
from pipelines.data.dataset import is_captioned, is_latent, read_columns
from pipelines.data.shapes import parse_caption
from pipelines.errors import UserError
from pipelines.train.checkpoints import MODEL_DIR, STATE_JSON, TrainingState, latest_checkpoint, stored
from pipelines.train.clip_worker import ClipTask, tokenizer_files
from pipelines.train.held_out import check_room_to_hold_out, held_out_keys, split
from pipelines.train.loop import LoopJob, train_loop_worker
from pipelines.train.resources import Workers
from pipelines.train.stage import Stage, check_not_past_end, run_stage

RESUME_FIXED = ("seed", "eval_images")  # train keys that define the held-out split and the row order


@dataclass(frozen=True)
class ClipTrainResult:
    run_id: str
    images_seen: int
    checkpoint: str  # URI of the final checkpoint folder (its model/ is the CLIP folder)
    model_version: str | None  # None without --register-as
    retrieval: dict[str, float] = field(default_factory=dict)  # the held-out retrieval at the final checkpoint
    unlogged: list[str] = field(default_factory=list)


def train_clip(
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
) -> ClipTrainResult:
    """Train ``config`` (:class:`pipelines.train.clip_config.ClipRunConfig`) on the captioned dataset at ``data``,
    checkpoints to STORAGE/NAME; the arguments are those of :func:`pipelines.train.stage.run_stage`. Running it
    again with the same ``name`` resumes exactly (raise ``train.total_images`` to train further); a finished run only
    registers."""
    final: dict = {}

    def tags(folder: Path) -> dict:
        """The version's CLIP tags, read from the final checkpoint (the retrieval also kept for the result)."""
        cfg = json.loads((folder / MODEL_DIR / "clip" / "config.json").read_text())["clip"]
        metrics = TrainingState.from_json(json.loads((folder / STATE_JSON).read_text())).metrics
        final.update({k: v for k, v in metrics.items() if k.startswith("retrieval_")})
        return {"kind": "clip", "embed_dim": cfg["embed_dim"], "vocab_size": cfg["vocab_size"],
                "context_length": cfg["context_length"], **{k: f"{v:.4g}" for k, v in final.items()}}

    stage = Stage(check=check_dataset, check_resumable=check_resumable, launch=_launch,
                  log_model=registry.log_clip, extra_tags=tags)
    result = run_stage(stage, data, config, storage=storage, name=name, num_workers=num_workers, use_gpu=use_gpu,
                       cpus_per_worker=cpus_per_worker, placement=placement, register_as=register_as,
                       tracking_uri=tracking_uri, experiment=experiment, resource_wait_s=resource_wait_s)
    return ClipTrainResult(result.run_id, result.images_seen, result.checkpoint, result.model_version, dict(final),
                           result.unlogged)


def check_dataset(config, manifest: dict, data: str):
    """Captioned pixels of square images, more than the held-out rows; returns the config with the images' side and
    channels."""
    check_captioned(manifest, data, "the CLIP")
    h, w, c = manifest["image_shape"]
    if h != w:
        raise UserError(f"{data} holds {h}x{w} images; the CLIP's image tower takes square images")
    check_room_to_hold_out(config, manifest, data)
    try:
        return replace(config, model=replace(config.model, image_size=h, in_channels=c))
    except ValueError as exc:
        raise UserError(f"{data} holds {h}x{w}x{c} images, which the CLIP's image tower cannot take: {exc}") from None


def check_captioned(manifest: dict, data: str, what: str) -> None:
    """Refuse a dataset that is not captioned pixels: a latent dataset, or one preprocessed without captions;
    ``what`` is the model that trains on it ("the CLIP")."""
    if is_latent(manifest):
        raise UserError(f"{data} is a latent dataset (ddpm encode output); train {what} on the processed images "
                        f"(ddpm preprocess --captions output)")
    if not is_captioned(manifest):
        raise UserError(f"{data} has no captions: run ddpm preprocess --captions on captioned images")


def check_resumable(state: TrainingState, config, name: str) -> None:
    """A run resumes only with the same model and held-out split, and never past its end."""
    saved, current = state.config, config.to_dict()
    for key in sorted(set(saved["model"]) | set(current["model"])):
        if saved["model"].get(key) != current["model"].get(key):
            raise UserError(f"run {name} was trained with model.{key}={saved['model'].get(key)!r}, "
                            f"not {current['model'].get(key)!r}; use another --name for a new run")
    for key in RESUME_FIXED:
        if saved["train"].get(key) != current["train"].get(key):
            raise UserError(f"run {name} was trained with train.{key}={saved['train'].get(key)!r}, "
                            f"not {current['train'].get(key)!r}; use another --name for a new run")
    check_not_past_end(state, config, name)


def one_object(caption: str) -> bool:
    """Whether ``caption`` is a one-object scene's in ``ddpm data shapes``' grammar."""
    try:
        return len(parse_caption(caption)["objects"]) == 1
    except ValueError:
        return False


def caption_index(batch: dict, captions: np.ndarray) -> dict:
    """Ray Data map: ``caption`` -> ``label``, its index in the sorted distinct ``captions``; images kept."""
    return {"image": batch["image"],
            "label": np.searchsorted(captions, batch["caption"].astype(str)).astype(np.int64)}


def _tokenizer(config, storage: str, name: str, training_captions: list[str]) -> text.ClipTokenizer:
    """The run's checkpoint's tokenizer when it resumes, else one learned from the training captions."""
    previous = latest_checkpoint(storage, name)
    if previous is not None:
        with stored(previous.uri).as_directory() as folder:
            return text.load_tokenizer(Path(folder) / MODEL_DIR / text.TOKENIZER_DIR)
    m = config.model
    return text.train_tokenizer(training_captions, vocab_size=m.vocab_size, context_length=m.context_length)


def _launch(data: str, config, manifest: dict, *, storage: str, name: str, run_id: str, tracking_uri: str):
    """(the worker function, its loop config): the split, the tokenizer and the captions' ids for the workers."""
    tc = config.train
    keys = set(held_out_keys(data, manifest, tc.eval_images, tc.seed))
    table = read_columns(data, manifest["shards"], ["sha256", "caption"], None)
    all_captions = table.column("caption").to_pylist()
    training = [c for k, c in zip(table.column("sha256").to_pylist(), all_captions) if k not in keys]
    tokenizer = _tokenizer(config, storage, name, training)
    distinct = np.asarray(sorted(set(all_captions)), dtype=str)
    blocks, held = split(data, manifest, eval_images=tc.eval_images, seed=tc.seed,
                         columns=("image", "caption", "sha256"), train_map=caption_index,
                         train_map_kwargs={"captions": distinct})
    captions = [str(row["caption"]) for row in held]
    held_out = {"images": np.stack([np.asarray(row["image"], dtype=np.uint8) for row in held]),  # (E, H, W, C)
                "captions": captions, "one_object": np.array([one_object(c) for c in captions], dtype=bool)}
    print(f"{blocks.num_rows} training images ({len(distinct)} distinct captions), {len(held)} held out "
          f"({int(held_out['one_object'].sum())} one-object); tokenizer of {tokenizer.vocab_size} tokens", flush=True)
    task = ClipTask(clip_config=config.model.clip_config(tokenizer).to_dict(), tokenizer=tokenizer_files(tokenizer),
                    caption_ids=ray.put(tokenizer.tokenize(list(distinct)).numpy()), held_out=ray.put(held_out))
    job = LoopJob(config=config, task=task, fingerprint=manifest["fingerprint"], run_id=run_id,
                  tracking_uri=tracking_uri, storage=storage, name=name, endpoint_url=store.resolve_endpoint(None),
                  blocks=blocks)
    return train_loop_worker, job.loop_config()
