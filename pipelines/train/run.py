"""A training run's MLflow run, from the driver's side: open it with its params and lineage tags (or reopen the one
a checkpoint names), and at the end log the final model into it, register that as a model version and close it.
What the workers log during training goes through :class:`pipelines.tracking.RunLogger`."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import ray
import torch
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException

from pipelines import registry, tracking
from pipelines.config import readable
from pipelines.errors import UserError
from pipelines.train.checkpoints import MODEL_DIR, SavedCheckpoint, latest_checkpoint, read_state, stored


CONFIG_ARTIFACT = "config.yaml"  # the resolved config of a run, beside its params


def open_run(uri: str, experiment: str, name: str, config, manifest: dict, data: str,
             previous: SavedCheckpoint | None) -> str:
    """The MLflow run id: a new run with params and lineage tags, or the previous checkpoint's run, reopened.

    A reopened run gets a tag ``resume_<images>_changes`` listing the config values that differ from the checkpoint's.
    A new run also keeps the resolved config as indented YAML, the artifact ``config.yaml``. Says in one line which
    run it is and where its config is.
    """
    run_id = _open_run(uri, experiment, name, config, manifest, data, previous)
    print(f"MLflow run {run_id} at {tracking.redact_uri(uri)}; the resolved config is its params and its "
          f"{CONFIG_ARTIFACT} artifact (--verbose prints it here)", flush=True)
    return run_id


def _open_run(uri: str, experiment: str, name: str, config, manifest: dict, data: str,
              previous: SavedCheckpoint | None) -> str:
    tags = {
        "ddpm.run_name": name,
        "dataset_fingerprint": manifest["fingerprint"],
        "dataset_uri": tracking.redact_uri(data),
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    if manifest.get("kind") == "latents":  # a latent model: which autoencoder its samples are decoded with
        tags["autoencoder"] = autoencoder_tag(manifest)
        tags["autoencoder_sha256"] = str(manifest["autoencoder"].get("sha256"))
    try:
        client = tracking.client(uri)
        experiment_id = tracking.ensure_experiment(experiment, uri)
        run_id = previous.state.mlflow_run_id if previous else None
        if run_id:
            client.update_run(run_id, status="RUNNING")
            changes = tracking.flatten(config.to_dict()).items() - tracking.flatten(previous.state.config).items()
            if changes:
                client.set_tag(run_id, f"resume_{previous.state.images_seen}_changes",
                               ", ".join(f"{k}={v}" for k, v in sorted(changes)))
            return run_id
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        params = [Param(k, v) for k, v in tracking.flatten(config.to_dict()).items()]
        client.log_batch(run.info.run_id, params=params, tags=[RunTag(k, v) for k, v in tags.items()])
        client.log_text(run.info.run_id, readable(config.to_dict()), CONFIG_ARTIFACT)  # the params, as a person reads them
        return run.info.run_id
    except MlflowException as exc:
        raise UserError(f"MLflow at {tracking.redact_uri(uri)}: {str(exc).splitlines()[0]}") from None


def autoencoder_tag(manifest: dict) -> str:
    """A latent dataset's autoencoder as a lineage tag: its pinned ``models:/NAME/VERSION``, else its (redacted) URI."""
    ae = manifest["autoencoder"]
    if ae.get("name") and ae.get("version"):
        return f"models:/{ae['name']}/{ae['version']}"
    return tracking.redact_uri(str(ae.get("uri")))


def git_commit() -> str | None:
    """The commit of the checkout this code runs from, if it is one (lineage for the MLflow run)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[2],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def finish_run(checkpoint_uri: str, *, run_id: str, register_as: str | None, tracking_uri: str, config,
               manifest: dict, attempts: int = 6, wait_s: float = 10.0, log_model=None,
               extra_tags=None) -> tuple[int, str | None]:
    """Log the final model into the run, register it (once: re-running finds the version) and close the run.

    ``log_model(model_dir, run_id=, tracking_uri=) -> models:/ URI`` logs the checkpoint's ``model/`` folder
    (default :func:`pipelines.registry.log_model`, a DDPM; ``ddpm train-autoencoder`` passes
    :func:`pipelines.registry.log_autoencoder`); ``extra_tags(checkpoint folder) -> dict`` adds version tags.

    Returns (images seen, the registered version or None). The tracking server may be down right now; this retries
    for about a minute before giving up with a message that says how to retry (run the same command again: it
    resumes at the end and only registers).
    """
    with stored(checkpoint_uri).as_directory() as folder:
        state = read_state(Path(folder))
        tags = {"run_id": run_id, "images_seen": str(state.images_seen),
                "dataset_fingerprint": manifest["fingerprint"], "config_hash": config.hash(),
                **{f"metric.{k}": f"{v:.6g}" for k, v in state.metrics.items()}}
        if manifest.get("kind") == "latents":  # the autoencoder version the model pins (and carries a copy of)
            tags["autoencoder"] = autoencoder_tag(manifest)
        if extra_tags is not None:
            tags.update({k: str(v) for k, v in extra_tags(Path(folder)).items()})
        for attempt in range(1, attempts + 1):
            try:
                return state.images_seen, _register_and_close(Path(folder) / MODEL_DIR, run_id=run_id,
                                                               register_as=register_as, tags=tags,
                                                               tracking_uri=tracking_uri, log_model=log_model)
            except (MlflowException, OSError) as exc:
                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                if attempt == attempts:
                    raise UserError(f"trained to {state.images_seen} images ({checkpoint_uri}) but MLflow "
                                    f"failed: {reason}; run the same command again to retry") from None
                print(f"MLflow unavailable ({reason}); retrying in {wait_s:.0f} s", flush=True)
                time.sleep(wait_s)


def _register_and_close(model_dir: Path, *, run_id: str, register_as: str | None, tags: dict[str, str],
                        tracking_uri: str, log_model=None) -> str | None:
    """Register ``model_dir`` as a new version of ``register_as`` unless this run's images already are one."""
    version = None
    if register_as:
        version = registry.find_version(register_as, {k: tags[k] for k in ("run_id", "images_seen")}, tracking_uri)
        if version is None:
            model_uri = (log_model or registry.log_model)(model_dir, run_id=run_id, tracking_uri=tracking_uri)
            version = registry.register(model_uri, register_as, tags=tags, tracking_uri=tracking_uri)
        print(f"registered models:/{register_as}/{version} (run {run_id})", flush=True)
    tracking.client(tracking_uri).set_terminated(run_id, "FINISHED")
    return version


def fail_run(run_id: str, tracking_uri: str, status: str = "FAILED") -> None:
    """Mark the run FAILED (or ``status``, e.g. KILLED), if the tracking server answers (it may be what failed; the
    caller's message matters more)."""
    try:
        tracking.client(tracking_uri).set_terminated(run_id, status)
    except Exception:  # noqa: BLE001 - see the docstring
        pass


def resume_hint(storage: str, name: str) -> str:
    """Where the same command will resume: the run's latest complete checkpoint, or that there is none yet."""
    try:
        saved = latest_checkpoint(storage, name)
    except UserError as store_error:  # the store may be what failed
        return f"the checkpoints in {storage} cannot be read now ({store_error})"
    if saved is None:
        return "no checkpoint was written yet"
    return f"run the same command to resume from {saved.uri} ({saved.state.images_seen} images)"


@contextlib.contextmanager
def killed_on_interrupt(run_id: str, tracking_uri: str, storage: str, name: str):
    """Ctrl-C inside the block: the MLflow run marked KILLED rather than left RUNNING, and the interrupt raised
    again with what the CLI's "interrupted" line adds (the run, and where the same command resumes)."""
    try:
        yield
    except KeyboardInterrupt:
        fail_run(run_id, tracking_uri, "KILLED")
        raise KeyboardInterrupt(f"MLflow run {run_id} marked KILLED; {resume_hint(storage, name)}") from None
