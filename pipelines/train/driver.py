"""``ddpm train``: data-parallel training on Ray Train, tracked in MLflow, registered in its model registry.

Who does what::

    driver   read the dataset's manifest, fit the config to it (image shape, number of classes), look for the
             run's latest checkpoint under STORAGE/NAME (resume), open the MLflow run (or reopen the one that
             checkpoint names), read the dataset into Ray's object store, start the TorchTrainer
    workers  N processes, DDP over gloo (CPU) or NCCL (GPU); each streams its shard of the dataset with
             ray.train.get_dataset_shard, normalises to [-1, 1] and flips on the worker, and runs
             ddpm.training.train_step (warm-up, clipping, bf16 autocast on GPUs and bf16 CPUs) and the EMA update
    rank 0   metrics, sample grids and tags to MLflow from a background thread (pipelines.tracking.RunLogger),
             and the checkpoint files every train.checkpoint_every_images images
    driver   log the final checkpoint's model folder into the run as a pyfunc model, register it as a new
             version of --register-as, close the run

A checkpoint is one folder under STORAGE/NAME/checkpoint_<images seen>/, written without pickle::

    model/                        the core's format (ddpm.checkpoint.save): raw + EMA weights, config.json
    training_state.json           step, images seen, EMA updates, restarts, MLflow run id, the resolved config,
                                  the optimizer's param groups and non-tensor state
    training_state.safetensors    the optimizer's tensors ("optimizer.<param>.<name>"), every rank's RNG states

Exactly ``train.total_images`` images, or fewer when ``train.max_minutes`` of training run out first (counted over
resumed attempts, on rank 0's clock): every step takes min(batch_size, images left) images, split across the
workers (rank r gets its contiguous part of the global batch); DDP's gradient average is weighted by each rank's
share (see :func:`_weighted_allreduce`), so a short last batch or a batch that does not divide by the number of
workers still gets the gradient of the mean loss over exactly those images.

Failures: a worker (or node) that dies is replaced by Ray Train (``train.max_failures`` times) and the group restarts
from the last checkpoint, or from a newer complete one in storage that Ray Train had not registered yet (see
:func:`_resume_from`); running the same command again with the same ``--name`` resumes the same way, in the same
MLflow run (its id lives in the checkpoint), with ``restarts`` and ``resumed_at_images`` metrics to show it. A
checkpoint upload waits out about a minute of storage outage (:func:`_upload`), and so does the driver when an outage
stops Ray Train's controller (:func:`_fit`); a folder cut short by a kill or an outage is never taken for the latest
checkpoint (:func:`latest_checkpoint`). When the retries run out, the one-line error names the checkpoint the same
command will resume from. Test hook, for the test suite only:
``DDPM_TEST_FAIL_AFTER_IMAGES=N`` makes the last rank raise right after the first checkpoint at or past N images,
in an attempt that started below N, so the failure happens once and the retry finishes the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from pipelines.errors import UserError

HELP = "train a DDPM on Ray Train (DDP), tracked in MLflow, and register the result as a model version"
EXAMPLE = """example:
  ddpm train --data s3://my-bucket/processed/digits --config configs/digits.yaml \\
      --num-workers 2 --storage s3://my-bucket/runs --name digits-1 --register-as digits
  ddpm train --data .ddpm/data/digits --config configs/digits.yaml --set train.total_images=20000 \\
      --num-workers 1 --storage .ddpm/runs --name quick --register-as digits     # a local folder works too

Run the same command again with the same --name to resume from the last checkpoint (raise
--set train.total_images=... to train further). Tracking: --tracking-uri, else $MLFLOW_TRACKING_URI, else the
embedded store in .ddpm/ (local Ray only: workers on other machines need a tracking server).
"""

MODEL_DIR = "model"
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
STATE_FORMAT = "ddpm-training-state"
FAIL_AFTER_ENV = "DDPM_TEST_FAIL_AFTER_IMAGES"
SAMPLE_STEPS = 25  # DDIM steps for the sample grids: enough to judge progress, cheap next to training
SAMPLE_COLUMNS = 8
UPLOAD_RETRY_WAITS_S = (1, 2, 4, 8, 15, 30)  # a checkpoint upload waits out about a minute of storage outage


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    images_seen: int
    checkpoint: str  # URI of the final checkpoint folder
    model_version: str | None  # None without --register-as
    unlogged: list[str] = field(default_factory=list)  # what never reached the tracking server


# ---------------------------------------------------------------------------------------------------------------
# The driver


def train(
    data: str,
    config,
    *,
    storage: str,
    name: str,
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: int | None = None,
    placement: str | None = None,
    register_as: str | None = None,
    tracking_uri: str | None = None,
    experiment: str = "ddpm",
) -> TrainResult:
    """Train ``config`` (a :class:`pipelines.config.Config`) on the dataset at ``data``; see the module docstring.

    ``cpus_per_worker`` defaults to the cluster's CPUs divided among the workers (at most one node's worth): Ray sets
    a worker's thread count from its CPU reservation, and a CPU worker with fewer threads than cores is that much
    slower. ``placement`` defaults to SPREAD on CPUs (each worker gets a node's cores to itself) and PACK on GPUs
    (NCCL within a node is faster than across nodes).
    """
    from pipelines import storage as store
    from pipelines import tracking
    from pipelines.data.dataset import read_manifest

    manifest = read_manifest(data)
    config = fit_to_dataset(config, manifest, data)
    print("config: " + json.dumps(config.to_dict(), sort_keys=True), flush=True)
    previous = latest_checkpoint(storage, name)
    if previous is not None:
        check_resumable(previous.state, config, name)
    uri = tracking_uri or tracking.tracking_uri()
    run_id = _open_run(uri, experiment, name, config, manifest, data, previous)
    print(f"MLflow run {run_id} at {tracking.redact_uri(uri)}", flush=True)

    unlogged: list[str] = []
    if previous is not None and config.train.finished(previous.state["images_seen"],
                                                      previous.state.get("train_seconds", 0.0)):
        print(f"run {name} already holds its final checkpoint ({previous.state['images_seen']} images); "
              f"skipping to registration", flush=True)
        final_uri = previous.uri
    else:
        result = _fit(data, config, manifest, storage=storage, name=name, num_workers=num_workers,
                      use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, placement=placement, run_id=run_id,
                      tracking_uri=uri)
        final_uri = store.join(storage, name, Path(result.checkpoint.path).name)
        unlogged = list((result.metrics or {}).get("unlogged", []))

    images_seen, version = _finish(final_uri, run_id=run_id, register_as=register_as, tracking_uri=uri,
                                   config=config, manifest=manifest)
    return TrainResult(run_id, images_seen, final_uri, version, unlogged)


def fit_to_dataset(config, manifest: dict, data: str):
    """Check the model's image shape against the dataset's; set the number of classes for conditional training."""
    h, w, c = manifest["image_shape"]
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


class SavedCheckpoint(NamedTuple):
    uri: str  # the checkpoint folder
    state: dict  # its training_state.json


def latest_checkpoint(storage_uri: str, name: str, endpoint_url: str | None = None) -> SavedCheckpoint | None:
    """The newest complete checkpoint under STORAGE/NAME, or None for a new run.

    Checkpoint folders are named after the images seen, so the newest sorts last. A folder cut short (a worker killed
    while writing it, an upload interrupted by an outage) is passed over: it must hold all four files, its JSON files
    must parse, and each safetensors file must be as long as its own header says.
    """
    from pipelines import storage as store

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


def complete_checkpoint(uri: str, endpoint_url: str | None = None) -> dict | None:
    """The training state of the checkpoint folder at ``uri`` if it is whole (see :func:`latest_checkpoint`)."""
    from pipelines import storage as store

    return _complete_state(uri, {e.key: e.size for e in store.list_files(uri, endpoint_url)}, endpoint_url)


def _complete_state(uri: str, sizes: dict[str, int], endpoint_url: str | None) -> dict | None:
    """The training state of the checkpoint folder at ``uri`` (file -> size) if all its files are whole, else None."""
    from pipelines import storage as store

    if not {STATE_JSON, STATE_TENSORS, f"{MODEL_DIR}/config.json", f"{MODEL_DIR}/model.safetensors"} <= sizes.keys():
        return None
    for tensors in (STATE_TENSORS, f"{MODEL_DIR}/model.safetensors"):
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
        json.loads(store.read_bytes(store.join(uri, MODEL_DIR, "config.json"), endpoint_url))
        return json.loads(store.read_bytes(store.join(uri, STATE_JSON), endpoint_url))
    except ValueError:
        return None


def check_resumable(state: dict, config, name: str) -> None:
    """A run resumes only with the same model, schedule and objective, and never past its end."""
    saved = state["config"]
    current = config.to_dict()
    for section in ("model", "schedule"):
        for key in sorted(set(saved[section]) | set(current[section])):
            if saved[section].get(key) != current[section].get(key):
                raise UserError(f"run {name} was trained with {section}.{key}={saved[section].get(key)!r}, "
                                f"not {current[section].get(key)!r}; use another --name for a new run")
    if saved["train"]["prediction_type"] != config.train.prediction_type:
        raise UserError(f"run {name} was trained with train.prediction_type={saved['train']['prediction_type']}")
    if state["images_seen"] > config.train.total_images:
        raise UserError(f"run {name} has already seen {state['images_seen']} images, more than "
                        f"train.total_images={config.train.total_images}")


def _open_run(uri: str, experiment: str, name: str, config, manifest: dict, data: str,
              previous: SavedCheckpoint | None) -> str:
    """The MLflow run id: a new run with params and lineage tags, or the previous checkpoint's run, reopened."""
    import ray
    import torch
    from mlflow.entities import Param, RunTag
    from mlflow.exceptions import MlflowException

    from pipelines import tracking

    tags = {
        "ddpm.run_name": name,
        "dataset_fingerprint": manifest["fingerprint"],
        "dataset_uri": tracking.redact_uri(data),
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
    }
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    try:
        client = tracking.client(uri)
        experiment_id = tracking.ensure_experiment(experiment, uri)
        run_id = previous.state.get("mlflow_run_id") if previous else None
        if run_id:
            client.update_run(run_id, status="RUNNING")
            changes = tracking.flatten(config.to_dict()).items() - tracking.flatten(previous.state["config"]).items()
            if changes:
                client.set_tag(run_id, f"resume_{previous.state['images_seen']}_changes",
                               ", ".join(f"{k}={v}" for k, v in sorted(changes)))
            return run_id
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        params = [Param(k, v) for k, v in tracking.flatten(config.to_dict()).items()]
        client.log_batch(run.info.run_id, params=params, tags=[RunTag(k, v) for k, v in tags.items()])
        return run.info.run_id
    except MlflowException as exc:
        raise UserError(f"MLflow at {tracking.redact_uri(uri)}: {str(exc).splitlines()[0]}") from None


def _git_commit() -> str | None:
    """The commit of the checkout this code runs from, if it is one (lineage for the MLflow run)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[2],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _fit(data: str, config, manifest: dict, *, storage: str, name: str, num_workers: int, use_gpu: bool,
         cpus_per_worker: int | None, placement: str | None, run_id: str, tracking_uri: str):
    """Run the TorchTrainer; returns its Result (the final checkpoint in ``result.checkpoint``)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines import storage as store
    from pipelines.data.dataset import load_dataset
    from pipelines.ray_utils import init_ray

    init_ray()
    cpus = cpus_per_worker or default_cpus_per_worker(num_workers)
    fs, root = store.filesystem_for(storage)
    # The dataset is read once into Ray's object store (spilled to disk if it must), shuffled once, and every pass
    # streams from there: a pass then needs no read tasks, so the workers may reserve every CPU of their nodes
    # (a read task waiting for a free CPU would wait forever).
    dataset = load_dataset(data, columns=["image", "label"]).random_shuffle(seed=config.train.seed).materialize()
    dataset.context.enable_progress_bars = False  # a bar per pass per worker is noise in a training log
    fail_after = os.environ.get(FAIL_AFTER_ENV)
    job = {
        "config": config.to_dict(),
        "class_names": manifest.get("class_names") or [],
        "fingerprint": manifest["fingerprint"],
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "fail_after_images": int(fail_after) if fail_after else None,
        "storage": storage,
        "name": name,
        "endpoint_url": store.resolve_endpoint(None),  # the driver's, so every worker reads the same store
    }
    resources = {"CPU": cpus, **({"GPU": 1} if use_gpu else {})}
    trainer_args = dict(
        train_loop_per_worker=_train_worker,
        train_loop_config=job,
        datasets={"train": dataset},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=placement or ("PACK" if use_gpu else "SPREAD")),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=root,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.train.num_checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
        ),
    )
    print(f"training on {num_workers} worker(s) x {cpus} CPU{' + 1 GPU' if use_gpu else ''}; "
          f"checkpoints under {store.join(storage, name)}", flush=True)
    outages = 0
    while True:
        try:
            return TorchTrainer(**trainer_args).fit()
        except ray.train.TrainingFailedError as exc:
            # Ray Train's controller writes its own state to the store when it registers a checkpoint, and does not
            # retry that: a storage outage at that moment ends the run. Wait for the store, then go on from the last
            # complete checkpoint, as the same command run again would (at most train.max_failures times).
            if (isinstance(exc, ray.train.ControllerError) and store.explain(str(exc)) is not None
                    and outages < config.train.max_failures and _store_back(storage, name)):
                outages += 1
                print(f"storage came back after an outage that stopped Ray Train's controller; resuming "
                      f"({outages}/{config.train.max_failures})", flush=True)
                continue
            raise UserError(_failure_message(exc, config, storage, name, run_id, tracking_uri)) from None


def _store_back(storage: str, name: str, waits_s=UPLOAD_RETRY_WAITS_S) -> bool:
    """Whether the store answers again within about a minute (the wait of a checkpoint upload, see :func:`_upload`)."""
    for wait_s in waits_s:
        time.sleep(wait_s)
        try:
            latest_checkpoint(storage, name)
            return True
        except UserError:
            continue
    return False


def _failure_message(exc: Exception, config, storage: str, name: str, run_id: str, tracking_uri: str) -> str:
    """One line: why training stopped, and where it will resume (the same command resumes from there)."""
    from pipelines import storage as store
    from pipelines import tracking

    try:
        tracking.client(tracking_uri).set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001 - the tracking server may be what failed; the message matters more
        pass
    cause = exc.__cause__ or exc
    explained = store.explain(str(cause))
    if explained:
        reason = f"{storage}: {explained}"
    elif getattr(cause, "worker_failures", None):  # ray.train.WorkerGroupError: rank -> its error
        # a rank whose process or node died fails its health check; the others' errors are then only echoes of it
        lost = {rank: error for rank, error in cause.worker_failures.items() if "health check" in str(error)}
        reason = "; ".join(f"rank {rank}: {'worker lost: ' if lost else ''}{_one_line(error)[:150]}"
                           for rank, error in sorted((lost or cause.worker_failures).items()))
    else:
        reason = _one_line(getattr(cause, "controller_failure", None) or cause)
    try:
        saved = latest_checkpoint(storage, name)
    except UserError as store_error:  # the store may be what failed
        resume = f"the checkpoints in {storage} cannot be read now ({store_error})"
    else:
        resume = (f"run the same command to resume from {saved.uri} ({saved.state['images_seen']} images)"
                  if saved is not None else "no checkpoint was written yet")
    return f"training failed (train.max_failures={config.train.max_failures}): {reason[:300]}; {resume}"


def _one_line(error: BaseException) -> str:
    """An error in one line: its message's first line, or for a quoted traceback its last (the exception)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1] if any(line.startswith("Traceback (most recent call last)") for line in lines) else lines[0]


def default_cpus_per_worker(num_workers: int) -> int:
    """The cluster's CPUs shared among the workers, at most one node's worth (a worker cannot span nodes)."""
    import ray

    per_node = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
    return max(1, min(int(max(per_node, default=1)), int(sum(per_node) // num_workers)))


def _finish(checkpoint_uri: str, *, run_id: str, register_as: str | None, tracking_uri: str, config,
            manifest: dict, attempts: int = 6, wait_s: float = 10.0) -> tuple[int, str | None]:
    """Log the final model into the run, register it (once: re-running finds the version) and close the run.

    Returns (images seen, the registered version or None). The tracking server may be down right now; this retries
    for about a minute before giving up with a message that says how to retry (run the same command again: it
    resumes at the end and only registers).
    """
    import ray.train
    from mlflow.exceptions import MlflowException

    from pipelines import storage as store

    fs, path = store.filesystem_for(checkpoint_uri)
    with ray.train.Checkpoint(path, filesystem=fs).as_directory() as folder:
        state = json.loads((Path(folder) / STATE_JSON).read_text())
        tags = {"run_id": run_id, "images_seen": str(state["images_seen"]),
                "dataset_fingerprint": manifest["fingerprint"], "config_hash": config.hash(),
                **{f"metric.{k}": f"{v:.6g}" for k, v in state.get("metrics", {}).items()}}
        for attempt in range(1, attempts + 1):
            try:
                return state["images_seen"], _register_and_close(Path(folder) / MODEL_DIR, run_id=run_id,
                                                                 register_as=register_as, tags=tags,
                                                                 tracking_uri=tracking_uri)
            except (MlflowException, OSError) as exc:
                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                if attempt == attempts:
                    raise UserError(f"trained to {state['images_seen']} images ({checkpoint_uri}) but MLflow "
                                    f"failed: {reason}; run the same command again to retry") from None
                print(f"MLflow unavailable ({reason}); retrying in {wait_s:.0f} s", flush=True)
                time.sleep(wait_s)


def _register_and_close(model_dir: Path, *, run_id: str, register_as: str | None, tags: dict[str, str],
                        tracking_uri: str) -> str | None:
    """Register ``model_dir`` as a new version of ``register_as`` unless this run's images already are one."""
    from pipelines import registry, tracking

    version = None
    if register_as:
        version = registry.find_version(register_as, {k: tags[k] for k in ("run_id", "images_seen")}, tracking_uri)
        if version is None:
            model_uri = registry.log_model(model_dir, run_id=run_id, tracking_uri=tracking_uri)
            version = registry.register(model_uri, register_as, tags=tags, tracking_uri=tracking_uri)
        print(f"registered models:/{register_as}/{version} (run {run_id})", flush=True)
    tracking.client(tracking_uri).set_terminated(run_id, "FINISHED")
    return version


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint files (no pickle: safetensors for tensors, JSON for the rest)


def write_checkpoint(folder: Path, *, net, schedule, ema, optimizer, state: dict, rng_states: dict,
                     prediction_type: str, class_names: list[str]) -> None:
    """Write the checkpoint layout of the module docstring into ``folder``."""
    from safetensors.torch import save_file

    from ddpm import checkpoint

    checkpoint.save(folder / MODEL_DIR, net, schedule, ema_state=ema.state_dict(), prediction_type=prediction_type,
                    class_names=class_names, metadata={k: state[k] for k in ("images_seen", "step", "mlflow_run_id")})
    tensors, optimizer_json = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors | rng_states, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps({"format": STATE_FORMAT, "version": 1, **state,
                                                 "optimizer": optimizer_json}, indent=2, sort_keys=True))


def read_checkpoint(folder: Path) -> tuple[dict, dict, dict, dict, dict]:
    """(state, optimizer state_dict, raw weights, EMA weights, RNG states) from a checkpoint folder, on the CPU."""
    from safetensors.torch import load_file

    from ddpm import checkpoint

    state = json.loads((folder / STATE_JSON).read_text())
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{folder / STATE_JSON}: not a {STATE_FORMAT} file")
    tensors = load_file(str(folder / STATE_TENSORS))
    raw, ema = checkpoint.load_training_weights(folder / MODEL_DIR)
    optimizer = _unflatten_optimizer(state.pop("optimizer"), tensors)
    rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    return state, optimizer, raw, ema, rng


def _flatten_optimizer(state_dict: dict) -> tuple[dict, dict]:
    """An optimizer state_dict -> (tensors "optimizer.<param index>.<name>", everything else as JSON)."""
    tensors, per_param = {}, {}
    for index, values in state_dict["state"].items():
        per_param[str(index)] = {}
        for key, value in values.items():
            if hasattr(value, "detach"):
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
# The workers


class _RowStream:
    """Exactly ``n`` rows at a time from this worker's shard of the dataset, pass after pass.

    Ray Data hands out batches of its own making and ends each pass over the data; a step needs a given number of
    rows, and a pass rarely divides into steps. So rows are fetched in large chunks (few per pass: Ray Data's cost
    is per batch, not per row), each chunk is put in a new random order (the dataset was shuffled once, when it was
    read; this varies the order from pass to pass), and steps are cut from the chunks, the tail of one pass carrying
    into the next. Every rank takes the same number of rows per step, so the ranks' shards (equal in size,
    ``streaming_split(equal=True)``) run out together and start the next pass together.
    """

    FETCH_BYTES = 4 << 20  # image bytes per chunk, when a step's rows are fewer

    def __init__(self, shard, rows_per_step: int, row_bytes: int, seed: list[int]):
        import numpy as np

        self._rng = np.random.default_rng(seed)
        self._chunks = self._passes(shard, max(rows_per_step, self.FETCH_BYTES // row_bytes))
        self._images, self._labels, self._offset = None, None, 0

    def _passes(self, shard, rows_per_fetch: int):
        while True:
            empty = True
            for batch in shard.iter_batches(batch_size=rows_per_fetch, batch_format="numpy"):
                empty = False
                order = self._rng.permutation(len(batch["label"]))
                yield batch["image"][order], batch["label"][order]  # (k, H, W, C) uint8, (k,) int64: fresh arrays
            if empty:
                raise RuntimeError("this worker's shard of the dataset is empty: use fewer workers than images")

    def take(self, n: int):
        """(n, H, W, C) uint8 images and (n,) int64 labels (views of fresh, writable arrays)."""
        import numpy as np

        images, labels = [], []
        while n > 0:
            if self._labels is None or self._offset == len(self._labels):
                (self._images, self._labels), self._offset = next(self._chunks), 0
            k = min(n, len(self._labels) - self._offset)
            images.append(self._images[self._offset:self._offset + k])
            labels.append(self._labels[self._offset:self._offset + k])
            self._offset, n = self._offset + k, n - k
        if len(labels) == 1:
            return images[0], labels[0]
        return np.concatenate(images), np.concatenate(labels)


class _BatchShare:
    """State of :func:`_weighted_allreduce`: this rank's share of the current global batch, rows_r / rows."""

    weight = 1.0


def _weighted_allreduce(share: _BatchShare, bucket):
    """DDP communication hook: sum over ranks of (rows_r / rows) * grad_r.

    grad_r is the gradient of rank r's mean loss, so the sum is the gradient of the mean loss over the global batch.
    DDP's default, the plain average of the ranks' gradients, equals it only when every rank has as many rows.
    """
    import torch.distributed as dist

    tensor = bucket.buffer().mul_(share.weight)
    return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])


class _TrainingClock:
    """Seconds of training (this attempt's plus those of the attempts before it) against ``train.max_minutes``.

    Every rank takes rank 0's reading, so all of them set the same learning rate and stop after the same step.
    """

    def __init__(self, carried_s: float, train_config, world: int, device):
        self.carried_s, self.start = carried_s, time.monotonic()
        self.train_config, self.world, self.device = train_config, world, device

    def seconds(self) -> float:
        return self.carried_s + time.monotonic() - self.start

    def spent(self) -> float:
        """The fraction of the time budget used so far, rank 0's on every rank; 0 without a budget."""
        if self.train_config.max_minutes is None:
            return 0.0  # nothing to agree on
        fraction = self.train_config.time_spent(self.seconds())
        if self.world > 1:
            import torch
            import torch.distributed as dist

            reading = torch.tensor([fraction], dtype=torch.float64, device=self.device)
            dist.broadcast(reading, src=0)
            fraction = reading.item()
        return fraction


class _Throughput:
    """Images per second over training steps only (sampling and checkpointing restart the clock)."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.images, self.start = 0, time.perf_counter()

    def rate(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


def _train_worker(job: dict) -> None:
    """The loop every Ray Train worker runs; rank 0 also logs to MLflow and writes the checkpoints."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from ddpm import EMA, UNet, from_uint8
    from ddpm.training import drop_labels, lr_at, random_flip, train_step
    from pipelines.config import from_dict
    from pipelines.tracking import RunLogger

    config = from_dict(job["config"])
    tc = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    # Model, optimizer and EMA: fresh, or as the last checkpoint left them.
    torch.manual_seed(tc.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    net = UNet(config.model)
    schedule = config.schedule.build()
    state = {"step": 0, "images_seen": 0, "restarts": 0, "ema_updates": 0}
    restored = _resume_from(ray.train.get_checkpoint(), job, rank, world)
    if restored is not None:
        with restored.as_directory() as folder:
            state, optimizer_state, raw, ema_state, rng = read_checkpoint(Path(folder))
        net.load_state_dict(raw)
        state["restarts"] += 1
    model = ray.train.torch.prepare_model(net)  # on the device; wrapped in DDP when world > 1
    optimizer = tc.build_optimizer(net.parameters())
    ema = EMA(net, decay=tc.ema_decay, warmup=tc.ema_warmup)
    if restored is not None:
        optimizer.load_state_dict(optimizer_state)
        ema.load_state_dict({k: v.to(device) for k, v in ema_state.items()}, state["ema_updates"])
        _restore_rng(rng, rank, device)
    else:
        torch.manual_seed(tc.seed * 1_000_003 + rank)  # each rank its own noise and timesteps
    share = _BatchShare()
    if world > 1:
        model.register_comm_hook(share, _weighted_allreduce)

    step, seen, total = state["step"], state["images_seen"], tc.total_images
    clock = _TrainingClock(state.get("train_seconds", 0.0), tc, world, device)
    stream = _RowStream(ray.train.get_dataset_shard("train"), rows_per_step=math.ceil(tc.batch_size / world),
                        row_bytes=config.model.image_size ** 2 * config.model.in_channels, seed=[tc.seed, rank, seen])
    total_steps, warmup_steps = math.ceil(total / tc.batch_size), tc.warmup_images // tc.batch_size
    step_options = tc.step_options(device)
    fail_after = job["fail_after_images"]
    armed = fail_after is not None and seen < fail_after and rank == world - 1

    nodes = _gather_strings(ray.get_runtime_context().get_node_id(), world, device)
    logger = RunLogger(job["run_id"], job["tracking_uri"]) if rank == 0 else None
    if logger is not None:
        logger.set_tag("ray.num_workers", world)
        logger.set_tag("ray.num_nodes", len(set(nodes)))
        logger.set_tag("train.autocast",  # what precision=auto chose
                       "bf16" if step_options["autocast_dtype"] is not None else "fp32")
        if restored is not None:
            logger.set_tag("restarts", state["restarts"])
            logger.log_metrics({"restarts": state["restarts"], "resumed_at_images": seen}, step)
    sampler_net = UNet(config.model).to(device) if rank == 0 else None
    throughput, loss_sum, loss_rows, last = _Throughput(), 0.0, 0, {}
    time_spent = clock.spent()

    while seen < total and time_spent < 1:
        # This step's images: n of them, rank r trains on rows [r*m, r*m + m) of the global batch.
        n = min(tc.batch_size, total - seen)
        m = math.ceil(n / world)
        rows = min(max(n - rank * m, 0), m)
        images, labels = stream.take(m)  # (m, H, W, C) uint8, (m,) int64; every rank takes m to stay in step
        used = max(rows, 1)  # a rank with no rows still runs (DDP needs every rank), with weight 0
        x_0 = from_uint8(images[:used]).to(device)  # (used, C, H, W) in [-1, 1]
        if tc.random_flip:
            x_0 = random_flip(x_0)
        y = None
        if tc.class_conditional:
            y = drop_labels(torch.from_numpy(labels[:used]).to(device), tc.label_dropout)
        share.weight = rows / n
        lr = lr_at(step, base_lr=tc.lr, warmup_steps=warmup_steps, total_steps=total_steps, decay=tc.lr_decay,
                   time_spent=time_spent)
        loss, grad_norm = train_step(model, optimizer, schedule, x_0, lr=lr, class_labels=y, **step_options)
        ema.update(net)
        step, seen = step + 1, seen + n
        loss_sum, loss_rows = loss_sum + loss * rows, loss_rows + rows
        throughput.images += n
        time_spent = clock.spent()
        finished = seen == total or time_spent >= 1

        if step % tc.log_every_steps == 0 or finished:
            loss_sum, loss_rows = _sum_over_ranks([loss_sum, loss_rows], world, device)
            last = {"loss": loss_sum / loss_rows, "lr": lr, "grad_norm": grad_norm,
                    "images_per_sec": throughput.rate(), "images_seen": seen}
            if logger is not None:
                logger.log_metrics(last, step)
            loss_sum, loss_rows = 0.0, 0
            throughput.restart()

        if logger is not None and (_crossed(seen, n, tc.sample_every_images) or finished):
            grid = _sample_grid(sampler_net, ema, schedule, config, device)
            logger.log_file(grid, f"samples/images_{seen:012d}.png")
            throughput.restart()

        if _crossed(seen, n, tc.checkpoint_every_images) or finished:
            state = {"step": step, "images_seen": seen, "train_seconds": clock.seconds(), "restarts": state["restarts"],
                     "ema_updates": ema.num_updates,
                     "mlflow_run_id": job["run_id"], "world_size": world, "config": config.to_dict(),
                     "dataset_fingerprint": job["fingerprint"], "metrics": last}
            unlogged = logger.close() if finished and logger is not None else []
            _report_checkpoint(state, unlogged, net=net, schedule=schedule, ema=ema, optimizer=optimizer,
                               rng_states=_gather_rng(world, device), prediction_type=tc.prediction_type,
                               class_names=job["class_names"], rank=rank, job=job)
            throughput.restart()
            if armed and seen >= fail_after:
                raise RuntimeError(f"{FAIL_AFTER_ENV}={fail_after}: injected failure on rank {rank} at {seen} images")

    if logger is not None:
        logger.close()  # already closed after the last step, unless this attempt resumed at the very end


def _resume_from(registered, job: dict, rank: int, world: int):
    """The checkpoint to resume from: Ray Train's latest, or a newer complete one in storage.

    Ray Train registers a reported checkpoint only when its controller next polls the workers; when a worker dies in
    between, the group restarts from the checkpoint before (or from scratch) although the newer one is complete in
    storage. Rank 0 looks there and every rank takes its choice, so all resume from the same checkpoint.
    """
    import ray.train
    import torch.distributed as dist

    from pipelines import storage as store

    choice = [None]
    if rank == 0:
        saved = latest_checkpoint(job["storage"], job["name"], job["endpoint_url"])
        registered_images = int(Path(registered.path).name.rpartition("_")[2]) if registered is not None else -1
        if saved is not None and saved.state["images_seen"] > registered_images:
            choice = [saved.uri]
    if world > 1:
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return registered
    print(f"resuming from {choice[0]}, newer than Ray Train's latest checkpoint "
          f"({registered.path if registered is not None else 'none'})", flush=True)
    fs, path = store.filesystem_for(choice[0], job["endpoint_url"])
    return ray.train.Checkpoint(path, filesystem=fs)


def _crossed(seen: int, n: int, every: int) -> bool:
    """Whether the last ``n`` images took the count past a multiple of ``every``."""
    return seen // every > (seen - n) // every


def _report_checkpoint(state: dict, unlogged: list[str], *, rank: int, job: dict, **contents) -> None:
    """Every rank calls ray.train.report (it is a barrier); rank 0 alone writes and uploads the files."""
    import ray.train

    from pipelines import storage as store

    metrics = {**state["metrics"], "images_seen": state["images_seen"], "step": state["step"], "unlogged": unlogged}
    name = f"checkpoint_{state['images_seen']:012d}"
    with tempfile.TemporaryDirectory(prefix="ddpm-checkpoint-") as folder:
        checkpoint, persisted = None, None
        if rank == 0:
            write_checkpoint(Path(folder), state=state, **contents)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
            persisted = _upload(Path(folder), store.join(job["storage"], job["name"], name), job["endpoint_url"])
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                         checkpoint_upload_fn=lambda *_: persisted)


def _upload(folder: Path, uri: str, endpoint_url: str | None, waits_s=UPLOAD_RETRY_WAITS_S):
    """Copy the checkpoint files to ``uri``, waiting out an outage of the store; returns the stored Checkpoint.

    Ray Train's own upload tries three times within seconds, and a failed upload restarts the worker group, which
    needs the store too. Retrying here for about a minute lets training go on through a short outage. A copy cut
    short leaves a folder that :func:`latest_checkpoint` passes over; the retry rewrites every file.
    """
    import pyarrow.fs as pafs
    import ray.train

    from pipelines import storage as store

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


def _sample_grid(sampler_net, ema, schedule, config, device) -> bytes:
    """A PNG grid from the EMA weights, DDIM with few steps and fixed seeds (grids over time are comparable).

    Class-conditional: one row per class (the first 10), ``SAMPLE_COLUMNS`` seeds per row; else 8 x 8.
    """
    import torch

    from ddpm import encode_png, make_grid, noise_from_seeds, sample, to_uint8

    ema.copy_to(sampler_net)
    sampler_net.eval()
    num_classes = config.model.num_classes
    rows = min(num_classes, 10) if num_classes else SAMPLE_COLUMNS
    seeds = list(range(rows * SAMPLE_COLUMNS))
    x_T, generators = noise_from_seeds(seeds, (config.model.in_channels, config.model.image_size,
                                               config.model.image_size), device)  # (N, C, H, W)
    labels = torch.arange(rows, device=device).repeat_interleave(SAMPLE_COLUMNS) if num_classes else None
    x_0 = sample(sampler_net, schedule, x_T, sampler="ddim", steps=min(SAMPLE_STEPS, schedule.num_timesteps),
                 prediction_type=config.train.prediction_type, class_labels=labels, generator=generators)
    return encode_png(make_grid(to_uint8(x_0), ncols=SAMPLE_COLUMNS))


def _sum_over_ranks(values: list[float], world: int, device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (every rank calls it at the same step)."""
    import torch
    import torch.distributed as dist

    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _gather_rng(world: int, device) -> dict:
    """Every rank's RNG states as uint8 tensors ``rng.<cpu|cuda>.<rank>`` (all ranks call it; rank 0 keeps them)."""
    import torch
    import torch.distributed as dist

    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if world == 1:
        return {f"rng.{kind}.0": t for kind, t in mine.items()}
    states = {}
    for kind, t in mine.items():
        parts = [torch.empty_like(t, device=device) for _ in range(world)]
        dist.all_gather(parts, t.to(device))
        states |= {f"rng.{kind}.{r}": p.cpu() for r, p in enumerate(parts)}
    return states


def _restore_rng(rng: dict, rank: int, device) -> None:
    """This rank's saved RNG states; a rank the checkpoint did not have (more workers now) seeds from its rank."""
    import torch

    if f"rng.cpu.{rank}" not in rng:
        torch.manual_seed(int(rng["rng.cpu.0"].sum()) * 1_000_003 + rank)
        return
    torch.set_rng_state(rng[f"rng.cpu.{rank}"])
    if device.type == "cuda" and f"rng.cuda.{rank}" in rng:
        torch.cuda.set_rng_state(rng[f"rng.cuda.{rank}"], device)


def _gather_strings(value: str, world: int, device) -> list[str]:
    """``value`` from every rank (here: node ids, to record how many nodes the run spans)."""
    import torch.distributed as dist

    if world == 1:
        return [value]
    out: list = [None] * world
    dist.all_gather_object(out, value)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="URI", help="output of ddpm preprocess (has manifest.json)")
    parser.add_argument("--config", required=True, metavar="YAML", help="a preset, e.g. configs/digits.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set train.total_images=20000; repeatable")
    parser.add_argument("--num-workers", type=int, default=1, metavar="N", help="Ray Train workers (default: 1)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    parser.add_argument("--cpus-per-worker", type=int, default=None, metavar="K",
                        help="CPUs reserved per worker, which also sets its thread count "
                             "(default: the cluster's CPUs / N, at most one node's)")
    parser.add_argument("--placement", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"], default=None,
                        help="where the workers go (default: SPREAD on CPU, PACK on GPU)")
    parser.add_argument("--storage", required=True, metavar="URI",
                        help="checkpoints go to URI/NAME/: s3://bucket/prefix or a folder all nodes share")
    parser.add_argument("--name", required=True, help="run name; the same name resumes from its last checkpoint")
    parser.add_argument("--register-as", default=None, metavar="MODEL",
                        help="register the final model as a new version of MODEL")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow server (default: $MLFLOW_TRACKING_URI, else the embedded store in .ddpm/)")
    parser.add_argument("--experiment", default="ddpm", help="MLflow experiment (default: ddpm)")


def main(args: argparse.Namespace) -> int:
    from pipelines.config import load_config

    if args.num_workers < 1 or (args.cpus_per_worker is not None and args.cpus_per_worker < 1):
        raise UserError("--num-workers and --cpus-per-worker must be at least 1")
    config = load_config(args.config, args.set)
    # The driver's MLflow calls fail in seconds, not after MLflow's default minutes of backoff.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    result = train(args.data, config, storage=args.storage, name=args.name, num_workers=args.num_workers,
                   use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker, placement=args.placement,
                   register_as=args.register_as, tracking_uri=args.tracking_uri, experiment=args.experiment)
    print(f"trained {args.name} to {result.images_seen} images; checkpoint {result.checkpoint}; "
          f"MLflow run {result.run_id}" + (f"; models:/{args.register_as}/{result.model_version}"
                                           if result.model_version else ""))
    for item in result.unlogged:
        print(f"warning: not logged to MLflow: {item}")
    return 0
