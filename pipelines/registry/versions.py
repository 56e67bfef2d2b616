"""Logging, registering, promoting and listing model versions in the MLflow registry.

A registered version is an MLflow ``python_function`` model whose artifact is a folder in the core's format: a DDPM
(``checkpoint``, see :mod:`pipelines.pyfunc_model`), an autoencoder (``autoencoder``, see
:mod:`pipelines.pyfunc_autoencoder`) or a CLIP (``clip``, see :mod:`pipelines.pyfunc_clip`), tagged with its lineage: the training run, the dataset fingerprint, the config
hash and the final metrics. Aliases (``staging``, ``production``) point at versions; Serve follows an alias.
"""

from __future__ import annotations

from pathlib import Path

from pipelines import tracking
from pipelines.errors import UserError
from pipelines.registry import cache
from pipelines.registry.canary import CANARY_TAG, record_canary
from pipelines.registry.resolve import autoencoder_kind, checkpoint_kind, find_folder, first_line

ALIASES = ("production", "staging")
CHECKPOINT_ARTIFACT = "checkpoint"  # the pyfunc model's artifact key, and its folder name inside the model
AUTOENCODER_ARTIFACT = "autoencoder"  # the same for a registered autoencoder
CLIP_ARTIFACT = "clip"  # the same for a registered CLIP
PRIOR_ARTIFACT = "prior"  # the same for a registered unCLIP prior
# MLflow "models from code": these files are copied by path into the model artifact (pipelines/, beside this package)
_PYFUNC_MODEL = Path(__file__).resolve().parents[1] / "pyfunc_model.py"
_PYFUNC_AUTOENCODER = Path(__file__).resolve().parents[1] / "pyfunc_autoencoder.py"
_PYFUNC_CLIP = Path(__file__).resolve().parents[1] / "pyfunc_clip.py"
_PYFUNC_PRIOR = Path(__file__).resolve().parents[1] / "pyfunc_prior.py"


def _log_pyfunc(name: str, python_model: Path, artifact: str, folder: str | Path, *, run_id: str,
                tracking_uri: str, requirements: tuple[str, ...], **extra) -> str:
    """Log ``folder`` into run ``run_id`` as the pyfunc model ``name``: a model from code (MLflow copies the
    ``python_model`` file, nothing is pickled) whose artifact ``artifact`` is the folder, the ``ddpm`` core beside it;
    ``extra``: log_model's signature and input example. Returns its ``models:/`` URI."""
    import mlflow
    import torch

    import ddpm

    cache.quiet_progress()
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(python_model),
            artifacts={artifact: str(folder)},
            code_paths=[str(Path(ddpm.__file__).parent)],  # the core travels with the model
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "safetensors", *requirements,
                              f"mlflow=={mlflow.__version__}"],
            **extra,
        )
    return info.model_uri


def log_model(checkpoint_dir: str | Path, *, run_id: str, tracking_uri: str) -> str:
    """Log ``checkpoint_dir`` into run ``run_id`` as a pyfunc model named "model"; returns its ``models:/`` URI."""
    return _log_pyfunc("model", _PYFUNC_MODEL, CHECKPOINT_ARTIFACT, checkpoint_dir, run_id=run_id,
                       tracking_uri=tracking_uri, requirements=("pydantic",))


def log_autoencoder(folder: str | Path, *, run_id: str, tracking_uri: str) -> str:
    """Log the autoencoder folder (``ddpm.autoencoder.save``'s format) into run ``run_id`` as a pyfunc model named
    "autoencoder" (:mod:`pipelines.pyfunc_autoencoder`: images -> latents); returns its ``models:/`` URI, which
    :func:`register` makes a version of. :func:`resolve_autoencoder` finds the folder again."""
    # An ndarray type hint says nothing of dtype or shape, so MLflow warned "Failed to infer model signature": it is
    # given, any batch and side (inferred from an example it would fix the side), and an example, without which
    # MLflow warns again.
    return _log_pyfunc("autoencoder", _PYFUNC_AUTOENCODER, AUTOENCODER_ARTIFACT, folder, run_id=run_id,
                       tracking_uri=tracking_uri, requirements=(), signature=_autoencoder_signature(),
                       input_example=_autoencoder_example(folder))


def log_clip(folder: str | Path, *, run_id: str, tracking_uri: str) -> str:
    """Log the CLIP folder (``ddpm.clip.save``'s: clip/, text_encoder/, tokenizer/) into run ``run_id`` as a pyfunc
    model named "clip" (:mod:`pipelines.pyfunc_clip`: texts or images -> embeddings); returns its ``models:/`` URI.
    :func:`resolve_clip` finds the folder again; ``ddpm.text.load`` on it reads the text tower."""
    return _log_pyfunc("clip", _PYFUNC_CLIP, CLIP_ARTIFACT, folder, run_id=run_id, tracking_uri=tracking_uri,
                       requirements=("tokenizers",))


def log_prior(folder: str | Path, *, run_id: str, tracking_uri: str) -> str:
    """Log the prior folder (``ddpm.prior.save``'s, with the CLIP it was trained on in ``clip/``) into run ``run_id``
    as a pyfunc model named "prior" (:mod:`pipelines.pyfunc_prior`: captions -> image embeddings); returns its
    ``models:/`` URI. Its signature declares the params (steps, guidance_scale) predict takes."""
    return _log_pyfunc("prior", _PYFUNC_PRIOR, PRIOR_ARTIFACT, folder, run_id=run_id, tracking_uri=tracking_uri,
                       requirements=("tokenizers",), signature=_prior_signature(folder))


def _prior_signature(folder: str | Path):
    """captions (a "text" column, an optional "seed") -> (N, E) float32 embeddings, and the sampler's params."""
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from ddpm import prior

    embed_dim = prior.load(folder).model.config.embed_dim
    return ModelSignature(inputs=Schema([ColSpec("string", "text"), ColSpec("long", "seed", required=False)]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim))]),
                          params=ParamSchema([ParamSpec("steps", "long", 50),
                                              ParamSpec("guidance_scale", "double", 1.0)]))


def register(model_uri: str, name: str, *, tags: dict[str, str], tracking_uri: str) -> str:
    """Register ``model_uri`` as a new version of ``name`` (created if needed) with ``tags``; returns the version."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    return str(version.version)


def find_version(name: str, tags: dict[str, str], tracking_uri: str) -> str | None:
    """The version of ``name`` carrying all of ``tags``, if one exists (makes registration idempotent)."""
    versions = tracking.client(tracking_uri).search_model_versions(f"name = '{_quote(name)}'")
    for v in versions:
        if all(v.tags.get(k) == str(val) for k, val in tags.items()):
            return str(v.version)
    return None


def promote(name: str, version: str, alias: str, tracking_uri: str | None = None, *, evaluated=None) -> None:
    """Point ``models:/NAME@ALIAS`` at ``version``.

    A DDPM version first gets its canary reference (if it has none yet): the images its weights make from the
    canary seeds, which every Serve replica checks before it switches to this version (:mod:`.canary`). An
    autoencoder version has no canary: Serve never serves one; a latent DDPM carries (and canaries) its own copy.

    ``evaluated``: the ``ddpm.checkpoint.LoadedModel`` the caller evaluated, when it has it; else the version's
    weights are loaded from the registry (from the local cache, which is where the gate loaded them from).
    """
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or tracking.tracking_uri()
    client = tracking.client(uri)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as exc:
        raise UserError(f"cannot promote {name} version {version}: {first_line(exc)}") from None
    if CANARY_TAG not in mv.tags and (evaluated is not None or version_kind(name, version, uri) == "ddpm"):
        record_canary(name, version, evaluated, tracking_uri=uri)
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as exc:
        raise UserError(f"cannot promote {name} version {version}: {first_line(exc)}") from None


def version_kind(name: str, version: str, tracking_uri: str) -> str:
    """"ddpm" or "autoencoder": what ``name`` version ``version`` holds (downloaded into the cache to look)."""
    ddpm, autoencoder = checkpoint_kind(), autoencoder_kind()

    def holds_either(folder: Path) -> None:
        try:
            find_folder(folder, ddpm)
        except UserError:
            find_folder(folder, autoencoder)

    folder = cache.fetch(name, version, tracking_uri, check=holds_either)
    try:
        find_folder(folder, ddpm)
        return "ddpm"
    except UserError:
        return "autoencoder"


def list_models(name: str | None = None, tracking_uri: str | None = None) -> list[dict]:
    """Registered models (no ``name``) or the versions of ``name``, as plain dicts, newest first."""
    from mlflow.exceptions import MlflowException

    client = tracking.client(tracking_uri)
    try:
        if name is None:
            return [{"name": m.name, "latest": max((int(v.version) for v in m.latest_versions), default=None),
                     "aliases": dict(m.aliases)} for m in client.search_registered_models()]
        aliases = client.get_registered_model(name).aliases  # alias -> version
        versions = client.search_model_versions(f"name = '{_quote(name)}'")
    except MlflowException as exc:
        raise UserError(f"cannot list {name or 'models'}: {first_line(exc)}") from None
    rows = [{"version": v.version, "aliases": sorted(a for a, ver in aliases.items() if str(ver) == str(v.version)),
             "run_id": v.run_id, "created": v.creation_timestamp, "tags": dict(v.tags)} for v in versions]
    return sorted(rows, key=lambda r: -int(r["version"]))


def gate_summary(name: str, version: str, tracking_uri: str | None = None) -> dict:
    """The gate's record on a version (``gate.*`` tags): decision, metric, value, reason and whether it cleared the
    absolute bar (``bar``: passed, failed, unchecked; None for a record older than the bar); {} without one."""
    tags = tracking.client(tracking_uri or tracking.tracking_uri()).get_model_version(name, version).tags
    if "gate.metric" not in tags:
        return {}
    value = tags.get("gate.candidate_value")
    return {"decision": tags.get("gate.decision"), "metric": tags["gate.metric"],
            "value": None if value in (None, "none") else float(value), "reason": tags.get("gate.reason"),
            "bar": tags.get("gate.bar")}


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def _autoencoder_example(folder: str | Path):
    """One black image of the smallest side the autoencoder takes, (1, f, f, C) uint8, f = 2^(levels - 1)."""
    import json

    import numpy as np

    config = json.loads((Path(folder) / "config.json").read_text())
    if "autoencoder" in config:  # ours
        levels, channels = len(config["autoencoder"]["block_out_channels"]), config["autoencoder"]["in_channels"]
    else:  # a diffusers AutoencoderKL folder
        levels, channels = len(config["block_out_channels"]), config.get("in_channels", 3)
    side = 2 ** (levels - 1)
    return np.zeros((1, side, side, channels), np.uint8)


def _autoencoder_signature():
    """images (B, H, W, C) uint8 -> latents (B, c, h, w) float32, any B, H, W."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1))]))
