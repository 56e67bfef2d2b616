"""Training checkpoints: the folder format (no pickle), finding a run's newest whole one in storage, storing one
through a storage outage, and handing it to Ray Train.

A checkpoint is one folder, STORAGE/NAME/checkpoint_<images seen, 12 digits>/::

    model/                        the core's format (ddpm.checkpoint.save): raw + EMA weights, config.json;
                                  or another stage's model folder (an autoencoder; a CLIP: clip/, text_encoder/,
                                  tokenizer/; a prior: its folder and the CLIP's in clip/; see MODEL_LAYOUTS)
    training_state.json           a TrainingState's fields, "format", "version", and the optimizer's param groups
                                  and non-tensor state ("optimizer")
    training_state.safetensors    the optimizer's tensors ("optimizer.<param index>.<name>"), every rank's RNG
                                  states ("rng.<cpu|cuda>.<rank>")
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import pyarrow.fs as pafs
import ray.train
import torch
from safetensors.torch import load_file, save_file

from ddpm import checkpoint
from pipelines import storage as store
from pipelines.train import ddp

MODEL_DIR = "model"
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
STATE_FORMAT, STATE_VERSION = "ddpm-training-state", 1
# the files a whole model/ holds: a DDPM's or an autoencoder's (one folder), a CLIP's (ddpm.clip.save), or an
# unCLIP prior's (ddpm.prior.save, with the CLIP it was trained on in clip/)
_FOLDER = ("config.json", "model.safetensors")
_TEXT = ("text_encoder/config.json", "text_encoder/model.safetensors",  # ddpm.text.save's layout
         "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json")
_CLIP = ("clip/config.json", "clip/model.safetensors", *_TEXT)
MODEL_LAYOUTS = {"single": _FOLDER, "clip": _CLIP, "prior": (*_FOLDER, *(f"clip/{name}" for name in _CLIP))}
UPLOAD_RETRY_WAITS_S = (1, 2, 4, 8, 15, 30)  # a checkpoint upload waits out about a minute of storage outage


@dataclass(frozen=True)
class TrainingState:
    """Where a run stands at a checkpoint: training_state.json without its format tag and optimizer state."""

    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0  # over all attempts so far, on rank 0's clock (train.max_minutes counts these)
    restarts: int = 0  # attempts resumed from a checkpoint: worker groups replaced, or the command run again
    ema_updates: int = 0
    mlflow_run_id: str | None = None
    world_size: int = 1
    config: dict = field(default_factory=dict)  # the resolved Config.to_dict()
    dataset_fingerprint: str | None = None
    metrics: dict = field(default_factory=dict)  # the last values logged: loss, lr, grad_norm, ...
    cause: str = ""  # why it was written: "interval" (every checkpoint_every_images), "preemption" (SIGTERM), "final"

    def to_json(self, optimizer: dict) -> str:
        """training_state.json's text, with the optimizer's JSON part (see :func:`_flatten_optimizer`)."""
        return json.dumps({"format": STATE_FORMAT, "version": STATE_VERSION, **asdict(self), "optimizer": optimizer},
                          indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, data) -> TrainingState:
        """From training_state.json's parsed contents; a field an older file lacks takes its default."""
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} file")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class SavedCheckpoint(NamedTuple):
    uri: str  # the checkpoint folder
    state: TrainingState


def folder_name(images_seen: int) -> str:
    """The checkpoint folder's name: the images seen, zero-padded so that the newest sorts last."""
    return f"checkpoint_{images_seen:012d}"


def images_in_name(path: str) -> int:
    """The images seen of the checkpoint folder at ``path`` (the inverse of :func:`folder_name`)."""
    return int(Path(path).name.rpartition("_")[2])


# ---------------------------------------------------------------------------------------------------------------
# The files


def write_checkpoint(folder: Path, *, net, schedule, ema, optimizer, state: TrainingState,
                     rng_states: dict[str, torch.Tensor], prediction_type: str, class_names: list[str],
                     autoencoder=None, autoencoder_source: dict | None = None, text_encoder=None,
                     text_encoder_source: dict | None = None, image_encoder=None,
                     image_encoder_source: dict | None = None) -> None:
    """Write the checkpoint layout of the module docstring into ``folder``; a latent model's ``model/`` also
    carries its ``autoencoder``, a text model's its ``text_encoder``, unCLIP's decoder its CLIP (``image_encoder``;
    see ``ddpm.checkpoint``)."""
    checkpoint.save(folder / MODEL_DIR, net, schedule, ema_state=ema.state_dict(), prediction_type=prediction_type,
                    class_names=list(class_names),
                    metadata={"images_seen": state.images_seen, "step": state.step,
                              "mlflow_run_id": state.mlflow_run_id},
                    autoencoder=autoencoder, autoencoder_source=autoencoder_source,
                    text_encoder=text_encoder, text_encoder_source=text_encoder_source,
                    image_encoder=image_encoder, image_encoder_source=image_encoder_source)
    write_training_state(folder, state=state, optimizer=optimizer, rng_states=rng_states)


def write_training_state(folder: Path, *, state: TrainingState, optimizer, rng_states: dict[str, torch.Tensor]) -> None:
    """training_state.safetensors, then training_state.json: the layout's files beside ``model/``, whatever model
    that holds (a DDPM here, an autoencoder for ``ddpm train-autoencoder``). Write ``model/`` first."""
    tensors, optimizer_json = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors | rng_states, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(state.to_json(optimizer_json))


def read_state(folder: Path) -> TrainingState:
    """The training state of a local checkpoint folder."""
    return _read_state_json(folder)[0]


def _read_state_json(folder: Path) -> tuple[TrainingState, dict]:
    """(the state, the whole parsed training_state.json) of a local checkpoint folder."""
    path = folder / STATE_JSON
    data = json.loads(path.read_text())
    try:
        return TrainingState.from_json(data), data
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def read_checkpoint(folder: Path) -> tuple[TrainingState, dict, dict, dict, dict]:
    """(state, optimizer state_dict, raw weights, EMA weights, RNG states) from a checkpoint folder, on the CPU."""
    state, optimizer, rng = read_training_state(folder)
    raw, ema = checkpoint.load_training_weights(folder / MODEL_DIR)
    return state, optimizer, raw, ema, rng


def read_training_state(folder: Path) -> tuple[TrainingState, dict, dict]:
    """(state, optimizer state_dict, RNG states) from a checkpoint folder, on the CPU; ``model/`` is not read."""
    state, data = _read_state_json(folder)
    tensors = load_file(str(folder / STATE_TENSORS))
    optimizer = _unflatten_optimizer(data["optimizer"], tensors)
    rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    return state, optimizer, rng


def _flatten_optimizer(state_dict: dict) -> tuple[dict, dict]:
    """An optimizer state_dict -> (tensors "optimizer.<param index>.<name>", everything else as JSON)."""
    tensors, per_param = {}, {}
    for index, values in state_dict["state"].items():
        per_param[str(index)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                per_param[str(index)][key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": per_param}


def _unflatten_optimizer(optimizer_json: dict, tensors: dict) -> dict:
    """The inverse of :func:`_flatten_optimizer`: a state_dict for ``optimizer.load_state_dict``."""
    state = {int(index): dict(values) for index, values in optimizer_json["state"].items()}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": optimizer_json["param_groups"]}


# ---------------------------------------------------------------------------------------------------------------
# In storage


def latest_checkpoint(storage_uri: str, name: str, endpoint_url: str | None = None) -> SavedCheckpoint | None:
    """The newest complete checkpoint under STORAGE/NAME, or None for a new run.

    Checkpoint folders are named after the images seen, so the newest sorts last. A folder cut short (a worker killed
    while writing it, an upload interrupted by an outage) is passed over: it must hold all four files, its JSON files
    must parse, and each safetensors file must be as long as its own header says.
    """
    run_uri = store.join(storage_uri, name)
    sizes: dict[str, dict[str, int]] = {}
    for entry in store.list_files(run_uri, endpoint_url):
        folder, _, rest = entry.key.partition("/")
        if folder.startswith("checkpoint_"):
            sizes.setdefault(folder, {})[rest] = entry.size
    for folder in sorted(sizes, reverse=True):
        uri = store.join(run_uri, folder)
        state = _complete_state(uri, sizes[folder], endpoint_url)
        if state is not None:
            return SavedCheckpoint(uri, state)
    return None


def complete_checkpoint(uri: str, endpoint_url: str | None = None) -> TrainingState | None:
    """The training state of the checkpoint folder at ``uri`` if it is whole (see :func:`latest_checkpoint`)."""
    return _complete_state(uri, {e.key: e.size for e in store.list_files(uri, endpoint_url)}, endpoint_url)


def _complete_state(uri: str, sizes: dict[str, int], endpoint_url: str | None) -> TrainingState | None:
    """The training state of the checkpoint folder at ``uri`` (file -> size) if all its files are whole, else None."""
    clip = [k for k in sizes if k.startswith(f"{MODEL_DIR}/clip/")]
    layout = "single" if not clip else "prior" if any(k.startswith(f"{MODEL_DIR}/clip/clip/") for k in clip) else "clip"
    model_files = [f"{MODEL_DIR}/{name}" for name in MODEL_LAYOUTS[layout]]
    if not {STATE_JSON, STATE_TENSORS, *model_files} <= sizes.keys():
        return None
    if layout == "single":  # a DDPM's config.json names the folders it carries: a latent model's, a text model's
        try:
            config = json.loads(store.read_bytes(store.join(uri, MODEL_DIR, "config.json"), endpoint_url))
            model_files += _carried_files(config)
        except (ValueError, TypeError, AttributeError):
            return None
        if not set(model_files) <= sizes.keys():
            return None
    for tensors in (STATE_TENSORS, *(f for f in model_files if f.endswith(".safetensors"))):
        # safetensors: an 8-byte header length n, n bytes of JSON header, then the data the header's offsets cover
        head = store.read_head(store.join(uri, tensors), 8, endpoint_url)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        try:
            header = json.loads(store.read_head(store.join(uri, tensors), 8 + n, endpoint_url)[8:])
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return None
        if sizes[tensors] != 8 + n + end:
            return None
    try:
        for config in (f for f in model_files if f.endswith(".json")):
            json.loads(store.read_bytes(store.join(uri, config), endpoint_url))
        return TrainingState.from_json(json.loads(store.read_bytes(store.join(uri, STATE_JSON), endpoint_url)))
    except (ValueError, TypeError):
        return None


def _carried_files(config: dict) -> list[str]:
    """The files of the folders a ddpm checkpoint's config.json says it carries (``ddpm.checkpoint``: a latent
    model's autoencoder/, a text model's text/, unCLIP's decoder's image_encoder/), as paths under the checkpoint
    folder."""
    if config.get("format") != checkpoint.FORMAT:  # an autoencoder's folder carries nothing
        return []
    files = []
    for entry, folder, names in (("autoencoder", checkpoint.AUTOENCODER_DIR, _FOLDER),
                                 ("text_encoder", checkpoint.TEXT_DIR, _TEXT),
                                 ("image_encoder", checkpoint.IMAGE_ENCODER_DIR, _CLIP)):
        if config.get(entry):
            files += [f"{MODEL_DIR}/{config[entry].get('folder', folder)}/{name}" for name in names]
    return files


def stored(uri: str, endpoint_url: str | None = None) -> ray.train.Checkpoint:
    """The checkpoint folder at ``uri`` as a Ray Train Checkpoint (``as_directory()`` gives a local copy)."""
    fs, path = store.filesystem_for(uri, endpoint_url)
    return ray.train.Checkpoint(path, filesystem=fs)


def upload(folder: Path, uri: str, endpoint_url: str | None, waits_s=UPLOAD_RETRY_WAITS_S) -> ray.train.Checkpoint:
    """Copy the checkpoint files to ``uri``, waiting out an outage of the store; returns the stored Checkpoint.

    Ray Train's own upload tries three times within seconds, and a failed upload restarts the worker group, which
    needs the store too. Retrying here for about a minute lets training go on through a short outage. A copy cut
    short leaves a folder that :func:`latest_checkpoint` passes over; the retry rewrites every file.
    """
    fs, path = store.filesystem_for(uri, endpoint_url)
    for attempt, wait_s in enumerate([*waits_s, None], start=1):
        try:
            fs.create_dir(path)
            pafs.copy_files(str(folder), path, destination_filesystem=fs, use_threads=False)  # threads: arrow#32372
            return ray.train.Checkpoint(path, filesystem=fs)
        except OSError as exc:
            if wait_s is None:
                raise
            reason = str(exc).strip().splitlines()[0][:200]
            print(f"checkpoint upload to {uri} failed (attempt {attempt}: {reason}); retrying in {wait_s} s",
                  flush=True)
            time.sleep(wait_s)


# ---------------------------------------------------------------------------------------------------------------
# With Ray Train (every rank calls these at the same step)


def report_checkpoint(state: TrainingState, unlogged: list[str], *, rank: int, storage: str, name: str,
                      endpoint_url: str | None, write=None, **contents) -> None:
    """Every rank calls ray.train.report (it is a barrier); rank 0 alone writes and uploads the files.

    ``write(folder, state=..., **contents)`` writes the layout: :func:`write_checkpoint` (a DDPM) unless given (the
    autoencoder trainer passes its own); ``contents``: its keyword arguments but ``state``.
    """
    write = write or write_checkpoint
    metrics = {**state.metrics, "images_seen": state.images_seen, "step": state.step, "unlogged": unlogged}
    folder_uri = store.join(storage, name, folder_name(state.images_seen))
    with tempfile.TemporaryDirectory(prefix="ddpm-checkpoint-") as folder:
        written, persisted = None, None
        if rank == 0:
            write(Path(folder), state=state, **contents)
            written = ray.train.Checkpoint.from_directory(folder)
            persisted = upload(Path(folder), folder_uri, endpoint_url)
        ray.train.report(metrics, checkpoint=written, checkpoint_dir_name=folder_name(state.images_seen),
                         checkpoint_upload_fn=lambda *_: persisted)


def resume_from(registered: ray.train.Checkpoint | None, *, storage: str, name: str, endpoint_url: str | None,
                rank: int, world: int) -> ray.train.Checkpoint | None:
    """The checkpoint to resume from: Ray Train's latest (``registered``), or a newer complete one in storage.

    Ray Train registers a reported checkpoint only when its controller next polls the workers; when a worker dies in
    between, the group restarts from the checkpoint before (or from scratch) although the newer one is complete in
    storage. Rank 0 looks there and every rank takes its choice, so all resume from the same checkpoint.
    """
    choice = None
    if rank == 0:
        saved = latest_checkpoint(storage, name, endpoint_url)
        registered_images = images_in_name(registered.path) if registered is not None else -1
        if saved is not None and saved.state.images_seen > registered_images:
            choice = saved.uri
    choice = ddp.object_from_rank0(choice, world)
    if choice is None:
        return registered
    print(f"resuming from {choice}, newer than Ray Train's latest checkpoint "
          f"({registered.path if registered is not None else 'none'})", flush=True)
    return stored(choice, endpoint_url)
