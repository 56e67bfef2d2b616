"""``ddpm models``: the MLflow model registry, and the one way every consumer turns a model URI into a checkpoint.

A registered version is an MLflow ``python_function`` model (see :mod:`pipelines.pyfunc_model`) whose artifact
``checkpoint`` is the model folder in the core's format (``config.json`` + ``model.safetensors``), tagged with its
lineage: the training run, the dataset fingerprint, the config hash and the final metrics. Aliases (``staging``,
``production``) point at versions; Serve follows an alias.

:func:`resolve_model` accepts ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a local folder and returns a local
checkpoint folder. It never unpickles anything: it downloads the version's artifacts into a cache, finds the
checkpoint folder among them, and the caller loads it with ``ddpm.checkpoint.load`` (safetensors + JSON).

Serve imports this module (and only this one from ``pipelines``), so it stays light: the standard library at module
level, MLflow inside the functions that need it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipelines import tracking
from pipelines.errors import UserError

HELP = "list registered models and their versions, or point an alias (staging, production) at a version"
EXAMPLE = """example:
  ddpm models list                         # every registered model, its latest version and aliases
  ddpm models list digits                  # the versions of one model, with lineage tags and metrics
  ddpm models promote digits 3 --alias production
  ddpm generate --model models:/digits@production --num-images 16 --out grid.png

The registry is the tracking server's: $MLFLOW_TRACKING_URI, or the embedded store in .ddpm/ when unset.
"""

ALIASES = ("production", "staging")
CHECKPOINT_ARTIFACT = "checkpoint"  # the pyfunc model's artifact key, and its folder name inside the model
AUTOENCODER_ARTIFACT = "autoencoder"  # the same for a registered autoencoder
_PYFUNC_MODEL = Path(__file__).with_name("pyfunc_model.py")
_PYFUNC_AUTOENCODER = Path(__file__).with_name("pyfunc_autoencoder.py")


@dataclass(frozen=True)
class ResolvedModel:
    """A local checkpoint folder, and which registered version it is (all None for a plain local path)."""

    path: Path
    name: str | None = None
    version: str | None = None
    alias: str | None = None


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, None, ALIAS); ``models:/NAME/VERSION`` -> (NAME, VERSION, None)."""
    body = uri[len("models:/"):].strip("/")
    if "@" in body:
        name, _, alias = body.partition("@")
        if name and alias and "/" not in alias:
            return name, None, alias
    else:
        name, _, version = body.rpartition("/")
        if name and version.isdigit():
            return name, version, None
    raise UserError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def resolve_model(uri: str, tracking_uri: str | None = None) -> ResolvedModel:
    """A registry URI or a local path -> the local checkpoint folder to pass to ``ddpm.checkpoint.load``.

    Registered versions are downloaded once into ``<DDPM_HOME>/models/<server>/<name>/<version>/``; an alias is
    looked up on every call (it moves), the download only when that version is not cached yet.
    """
    if not uri.startswith("models:/"):
        path = Path(uri).expanduser()
        if not path.exists():
            raise UserError(f"{uri}: no such checkpoint folder (or use models:/NAME@ALIAS, models:/NAME/VERSION)")
        return ResolvedModel(find_checkpoint(path))
    name, version, alias = parse_model_uri(uri)
    server = tracking_uri or tracking.tracking_uri()
    version = version or _version_for_alias(name, alias, server)
    cache = _cache_dir(server, name, version)
    if not cache.is_dir():
        _download(name, version, server, cache)
    return ResolvedModel(find_checkpoint(cache), name, version, alias)


def current_version(name: str, alias: str, tracking_uri: str | None = None) -> str:
    """The version ``models:/NAME@ALIAS`` points at now (Serve polls this to hot-reload)."""
    return _version_for_alias(name, alias, tracking_uri or tracking.tracking_uri())


def find_checkpoint(root: Path) -> Path:
    """The shallowest folder under ``root`` (``root`` included) holding a ``ddpm-checkpoint`` config.json.

    Covers a checkpoint folder itself, a training checkpoint (``model/`` inside) and a downloaded pyfunc model
    (``artifacts/<the logged folder's name>/`` inside). Only JSON is read.
    """
    from ddpm.checkpoint import FORMAT

    return _find_folder(root, lambda found: found.get("format") == FORMAT, f"ddpm checkpoint (config.json with "
                                                                            f"format {FORMAT!r})")


def find_autoencoder(root: Path) -> Path:
    """The shallowest folder under ``root`` (``root`` included) holding an autoencoder: our ``ddpm-autoencoder``
    folder, or a diffusers ``AutoencoderKL`` one (``config.json`` with ``"_class_name": "AutoencoderKL"``).

    Covers the folder itself, a training checkpoint of ``ddpm train-autoencoder`` (``model/`` inside), a downloaded
    registered autoencoder, a latent dataset (its ``autoencoder/`` copy) and a latent DDPM model (which carries
    the autoencoder it decodes with). Only JSON is read.
    """
    from ddpm.autoencoder import FORMAT

    return _find_folder(root, lambda found: found.get("format") == FORMAT or found.get("_class_name") == "AutoencoderKL",
                        f"autoencoder (config.json with format {FORMAT!r}, or a diffusers AutoencoderKL)")


def _find_folder(root: Path, wanted, what: str) -> Path:
    """The shallowest folder under ``root`` whose config.json, parsed, satisfies ``wanted``."""
    from ddpm.checkpoint import CONFIG_FILE

    candidates = sorted(root.rglob(CONFIG_FILE), key=lambda p: (len(p.parts), str(p)))
    unreadable = []  # (path, why): said when no candidate is wanted, since one of them may be a broken one
    for config in candidates:
        try:
            found = json.loads(config.read_text())
        except (OSError, ValueError) as exc:
            unreadable.append((config, f"invalid JSON ({exc})" if isinstance(exc, ValueError) else str(exc)))
            continue
        if isinstance(found, dict) and wanted(found):
            return config.parent
    if unreadable:
        path, why = unreadable[0]
        raise UserError(f"{path}: {why}; is this a damaged {what.split(' (')[0]}?")
    raise UserError(f"{root}: no {what} in this folder")


def resolve_autoencoder(uri: str, tracking_uri: str | None = None) -> ResolvedModel:
    """A registry URI (a version of ``ddpm train-autoencoder --register-as``) or a local path (ours or a downloaded
    diffusers AutoencoderKL folder) -> the local autoencoder folder to pass to ``ddpm.autoencoder.load``.

    Downloads are cached like :func:`resolve_model`'s; nothing is unpickled.
    """
    if not uri.startswith("models:/"):
        path = Path(uri).expanduser()
        if not path.exists():
            raise UserError(f"{uri}: no such autoencoder folder (or use models:/NAME@ALIAS, models:/NAME/VERSION)")
        return ResolvedModel(find_autoencoder(path))
    name, version, alias = parse_model_uri(uri)
    server = tracking_uri or tracking.tracking_uri()
    version = version or _version_for_alias(name, alias, server)
    cache = _cache_dir(server, name, version)
    if not cache.is_dir():
        _download(name, version, server, cache, find=find_autoencoder)
    return ResolvedModel(find_autoencoder(cache), name, version, alias)


def log_model(checkpoint_dir: str | Path, *, run_id: str, tracking_uri: str) -> str:
    """Log ``checkpoint_dir`` into run ``run_id`` as a pyfunc model named "model"; returns its ``models:/`` URI."""
    import mlflow
    import torch

    import ddpm

    _quiet()
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(_PYFUNC_MODEL),  # a model from code: MLflow copies the file, nothing is pickled
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_dir)},
            code_paths=[str(Path(ddpm.__file__).parent)],  # the core travels with the model
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "safetensors", "pydantic",
                              f"mlflow=={mlflow.__version__}"],
        )
    return info.model_uri


def log_autoencoder(folder: str | Path, *, run_id: str, tracking_uri: str) -> str:
    """Log the autoencoder folder (``ddpm.autoencoder.save``'s format) into run ``run_id`` as a pyfunc model named
    "autoencoder" (:mod:`pipelines.pyfunc_autoencoder`: images -> latents); returns its ``models:/`` URI, which
    :func:`register` makes a version of. :func:`resolve_autoencoder` finds the folder again."""
    import mlflow
    import torch

    import ddpm

    _quiet()
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="autoencoder",
            python_model=str(_PYFUNC_AUTOENCODER),  # a model from code, as log_model's
            artifacts={AUTOENCODER_ARTIFACT: str(folder)},
            code_paths=[str(Path(ddpm.__file__).parent)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "safetensors",
                              f"mlflow=={mlflow.__version__}"],
        )
    return info.model_uri


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
    """Point ``models:/NAME@ALIAS`` at ``version``, after recording the version's canary reference (if it has none
    yet): the images its weights make from the canary seeds, which every Serve replica checks before it switches to
    this version (:func:`check_canary`).

    ``evaluated``: the ``ddpm.checkpoint.LoadedModel`` the caller evaluated, when it has it; else the version's
    weights are loaded from the registry (from the local cache, which is where the gate loaded them from).
    """
    from mlflow.exceptions import MlflowException

    client = tracking.client(tracking_uri)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as exc:
        raise UserError(f"cannot promote {name} version {version}: {_first_line(exc)}") from None
    if CANARY_TAG not in mv.tags:
        record_canary(name, version, evaluated, tracking_uri=tracking_uri)
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as exc:
        raise UserError(f"cannot promote {name} version {version}: {_first_line(exc)}") from None


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
        raise UserError(f"cannot list {name or 'models'}: {_first_line(exc)}") from None
    rows = [{"version": v.version, "aliases": sorted(a for a, ver in aliases.items() if str(ver) == str(v.version)),
             "run_id": v.run_id, "created": v.creation_timestamp, "tags": dict(v.tags)} for v in versions]
    return sorted(rows, key=lambda r: -int(r["version"]))


# -- the canary: what a replica checks before it serves a version ---------------------------------------------------
# At promotion the version's weights sample CANARY_SEEDS through the gate's sampler settings, and a small summary of
# those images is stored as model-version tags. A replica that is about to switch to the version samples the same
# seeds with the weights it loaded, on its own device and forward, and compares. Why not FD-cls: its classifier lives
# in pipelines.evaluate, which deploy/ may not import, and on 16 images a Frechet distance is mostly noise; the same
# seeds through the same weights give the same images (ddpm.generate_images: an image depends only on its seed and
# settings), so a paired comparison is exact where FD-cls would be a rough test. See docs/serving.md, "The canary".
CANARY_TAG = "canary.reference"  # base64 of the uint8 summary images
CANARY_SETTINGS_TAG = "canary.settings"  # JSON: seeds, sampler, steps, eta, guidance, labels, summary shape
CANARY_TOLERANCE_TAG = "canary.tolerance"
CANARY_NUM_SEEDS = 16
CANARY_MAX_SIDE = 16  # images are block-averaged down to at most 16x16 for the reference (16x16 digits: as they are)
# Mean absolute difference, in 0-255 pixel levels, that still counts as "the same model": 0 on the device and forward
# the reference was made with (bit-identical images); a few levels across devices and precisions (measured in
# docs/serving.md); tens of levels for other weights. 4 levels = 1.6% of the range.
CANARY_TOLERANCE = 4.0


@dataclass(frozen=True)
class CanaryVerdict:
    """A replica's canary on one version: ``status`` "passed", "refused" or "unchecked" (no reference recorded)."""

    status: str
    score: float | None = None  # mean absolute difference from the reference, 0-255 levels
    tolerance: float | None = None
    detail: str = ""

    @property
    def refused(self) -> bool:
        return self.status == "refused"

    def to_dict(self) -> dict:
        return {"status": self.status, "score": None if self.score is None else round(self.score, 4),
                "tolerance": self.tolerance, "detail": self.detail}


def canary_settings(gate_settings: dict | None, num_classes: int) -> dict:
    """The canary's sampling settings: the gate's sampler, steps and guidance (from the version's ``gate.settings``
    tag; DDIM-50 without it), eta 0, seeds 0..15, and for a conditional model labels cycling through the classes."""
    gate = (gate_settings or {}).get("settings", {})
    labels = [i % num_classes for i in range(CANARY_NUM_SEEDS)] if num_classes else None
    return {"seeds": list(range(CANARY_NUM_SEEDS)), "sampler": gate.get("sampler", "ddim"),
            "steps": int(gate.get("steps", 50)), "eta": 0.0,
            "guidance_scale": float(gate.get("guidance_scale", 1.0)) if num_classes else 1.0, "class_labels": labels}


def canary_images(loaded, settings: dict, forward=None):
    """(N, H, W, C) uint8: the canary seeds through ``loaded`` with ``settings``, by the core's one generation path;
    ``forward``: the network call a Serve replica uses (its fixed-shape forward), else the core's default."""
    from ddpm import generate_images

    return generate_images(loaded, settings["seeds"], class_labels=settings["class_labels"],
                           sampler=settings["sampler"], steps=settings["steps"], eta=settings["eta"],
                           guidance_scale=settings["guidance_scale"], forward=forward)


def canary_summary(images):
    """(N, H, W, C) uint8 -> (N, h, w, C) float32 block means, h = w <= CANARY_MAX_SIDE (the side divided by the
    smallest factor that brings it there; 16x16 and smaller stay as they are)."""
    import numpy as np

    n, height, width, channels = images.shape
    factor = 1
    while height // factor > CANARY_MAX_SIDE or height % factor or width % factor:
        factor += 1
    x = images.astype(np.float32).reshape(n, height // factor, factor, width // factor, factor, channels)
    return x.mean(axis=(2, 4))


def canary_score(summary, reference) -> float:
    """Mean absolute difference of two canary summaries, in 0-255 pixel levels; inf when their shapes differ."""
    import numpy as np

    if summary.shape != reference.shape:
        return float("inf")
    return float(np.abs(summary.astype(np.float64) - reference.astype(np.float64)).mean())


def record_canary(name: str, version: str, loaded=None, *, tracking_uri: str | None = None,
                  tolerance: float = CANARY_TOLERANCE) -> None:
    """Store ``name`` version ``version``'s canary reference as tags: from ``loaded`` (the weights that were
    evaluated) or, without it, from the version's own weights."""
    import base64

    import numpy as np

    from ddpm import checkpoint

    uri = tracking_uri or tracking.tracking_uri()
    client = tracking.client(uri)
    if loaded is None:
        loaded = checkpoint.load(resolve_model(f"models:/{name}/{version}", uri).path, device="cpu", weights="ema")
    gate = client.get_model_version(name, version).tags.get("gate.settings")
    settings = canary_settings(json.loads(gate) if gate else None, loaded.config.num_classes)
    summary = np.clip(np.rint(canary_summary(canary_images(loaded, settings))), 0, 255).astype(np.uint8)
    settings["summary_shape"] = list(summary.shape)
    client.set_model_version_tag(name, version, CANARY_SETTINGS_TAG, json.dumps(settings, sort_keys=True))
    client.set_model_version_tag(name, version, CANARY_TOLERANCE_TAG, f"{tolerance:g}")
    client.set_model_version_tag(name, version, CANARY_TAG, base64.b64encode(summary.tobytes()).decode("ascii"))


def canary_reference(name: str, version: str, tracking_uri: str | None = None) -> tuple[dict, object, float] | None:
    """``(settings, reference summary, tolerance)`` recorded for the version, or None when it has none."""
    import base64

    import numpy as np

    tags = tracking.client(tracking_uri or tracking.tracking_uri()).get_model_version(name, version).tags
    if CANARY_TAG not in tags:
        return None
    settings = json.loads(tags[CANARY_SETTINGS_TAG])
    reference = np.frombuffer(base64.b64decode(tags[CANARY_TAG]), np.uint8).reshape(settings["summary_shape"])
    return settings, reference, float(tags.get(CANARY_TOLERANCE_TAG, CANARY_TOLERANCE))


def check_canary(loaded, name: str | None, version: str | None, tracking_uri: str | None = None,
                 forward=None) -> CanaryVerdict:
    """Run the canary of ``name`` version ``version`` on ``loaded`` (the weights a replica is about to serve)."""
    if name is None or version is None:
        return CanaryVerdict("unchecked", detail="a checkpoint folder, not a registered version")
    recorded = canary_reference(name, version, tracking_uri)
    if recorded is None:
        return CanaryVerdict("unchecked", detail=f"{name} version {version} has no canary reference (it was never "
                                                 f"promoted with ddpm models promote / ddpm pipeline)")
    settings, reference, tolerance = recorded
    score = canary_score(canary_summary(canary_images(loaded, settings, forward)), reference)
    if score <= tolerance:
        return CanaryVerdict("passed", score, tolerance)
    return CanaryVerdict("refused", score, tolerance,
                         f"{name} version {version} makes images {score:.3g} levels away from those recorded at its "
                         f"promotion (tolerance {tolerance:g}): not the weights that were evaluated, or a broken "
                         f"device")


def gate_summary(name: str, version: str, tracking_uri: str | None = None) -> dict:
    """The gate's record on a version (``gate.*`` tags): decision, metric and value; {} without one."""
    tags = tracking.client(tracking_uri or tracking.tracking_uri()).get_model_version(name, version).tags
    if "gate.metric" not in tags:
        return {}
    value = tags.get("gate.candidate_value")
    return {"decision": tags.get("gate.decision"), "metric": tags["gate.metric"],
            "value": None if value in (None, "none") else float(value), "reason": tags.get("gate.reason")}


# -- helpers --------------------------------------------------------------------------------------------------------
def _version_for_alias(name: str, alias: str, tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return str(tracking.client(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        raise UserError(f"models:/{name}@{alias}: {_first_line(exc)}") from None


def _cache_dir(tracking_uri: str, name: str, version: str) -> Path:
    """``<home>/models/<hash of the server>/<name>/<version>``: the same name on two servers is two models."""
    server = hashlib.sha256(tracking.redact_uri(tracking_uri).encode()).hexdigest()[:12]
    return tracking.home() / "models" / server / name / version


def _download(name: str, version: str, tracking_uri: str, cache: Path, find=find_checkpoint) -> None:
    """Download the version's artifacts into ``cache``, atomically: a temporary folder renamed into place.
    ``find`` (:func:`find_checkpoint` or :func:`find_autoencoder`) checks that the version holds what is wanted."""
    import mlflow
    from mlflow.exceptions import MlflowException

    _quiet()
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=cache.parent))
    try:
        # The version's storage location, asked of this server: a models:/ URI would be resolved against
        # MLflow's process-wide registry URI instead of ``tracking_uri``.
        location = tracking.client(tracking_uri).get_model_version_download_uri(name, version)
        mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(staging), tracking_uri=tracking_uri)
        find(staging)  # fail here, not in the caller, if the version holds no checkpoint (or autoencoder)
        staging.rename(cache)
    except MlflowException as exc:
        raise UserError(f"models:/{name}/{version}: {_first_line(exc)}") from None
    except OSError:
        if not cache.is_dir():  # losing a race to a concurrent download of the same version is fine
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _quiet() -> None:
    """No artifact progress bars: they fill CLI output, training logs and Serve logs with carriage returns."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# -- command line ---------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    listing = actions.add_parser("list", help="registered models, or the versions of MODEL")
    listing.add_argument("model", nargs="?", help="a registered model's name")
    promoting = actions.add_parser("promote", help="point an alias at a version")
    promoting.add_argument("model", help="a registered model's name")
    promoting.add_argument("version", help="the version number to promote")
    promoting.add_argument("--alias", required=True, choices=ALIASES, help="the alias to set")
    for action in (listing, promoting):
        action.add_argument("--tracking-uri", default=None, metavar="URI",
                            help="MLflow server (default: $MLFLOW_TRACKING_URI, else the embedded store in .ddpm/)")


def main(args: argparse.Namespace) -> int:
    if args.action == "promote":
        promote(args.model, args.version, args.alias, args.tracking_uri)
        print(f"models:/{args.model}@{args.alias} -> version {args.version}")
        return 0
    rows = list_models(args.model, args.tracking_uri)
    if args.model is None:
        print(f"{'model':<30} {'latest':>6}  aliases")
        for r in rows:
            aliases = ", ".join(f"{a}={v}" for a, v in sorted(r["aliases"].items()))
            print(f"{r['name']:<30} {r['latest'] or '-':>6}  {aliases}")
        return 0
    print(f"{'version':>7}  {'aliases':<20} {'run id':<32}  lineage")
    for r in rows:
        tags = {k: v for k, v in r["tags"].items() if not k.startswith("canary.")}  # the canary's data is long
        if CANARY_TAG in r["tags"]:
            tags["canary"] = "recorded"
        lineage = "  ".join(f"{k}={tags[k][:12] if k.endswith(('fingerprint', 'hash')) else tags[k]}"
                            for k in sorted(tags))
        print(f"{r['version']:>7}  {','.join(r['aliases']) or '-':<20} {r['run_id'] or '-':<32}  {lineage}")
    return 0
