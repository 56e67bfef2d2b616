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
_PYFUNC_MODEL = Path(__file__).with_name("pyfunc_model.py")


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
    from ddpm.checkpoint import CONFIG_FILE, FORMAT

    candidates = sorted(root.rglob(CONFIG_FILE), key=lambda p: (len(p.parts), str(p)))
    unreadable = []  # (path, why): said when no candidate is a checkpoint, since one of them may be a broken one
    for config in candidates:
        try:
            found = json.loads(config.read_text())
        except (OSError, ValueError) as exc:
            unreadable.append((config, f"invalid JSON ({exc})" if isinstance(exc, ValueError) else str(exc)))
            continue
        if isinstance(found, dict) and found.get("format") == FORMAT:
            return config.parent
    if unreadable:
        path, why = unreadable[0]
        raise UserError(f"{path}: {why}; is this a damaged ddpm checkpoint?")
    raise UserError(f"{root}: no ddpm checkpoint (config.json with format {FORMAT!r}) in this folder")


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


def promote(name: str, version: str, alias: str, tracking_uri: str | None = None) -> None:
    """Point ``models:/NAME@ALIAS`` at ``version``."""
    from mlflow.exceptions import MlflowException

    client = tracking.client(tracking_uri)
    try:
        client.get_model_version(name, version)
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


def _download(name: str, version: str, tracking_uri: str, cache: Path) -> None:
    """Download the version's artifacts into ``cache``, atomically: a temporary folder renamed into place."""
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
        find_checkpoint(staging)  # fail here, not in the caller, if the version holds no checkpoint
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
        tags = r["tags"]
        lineage = "  ".join(f"{k}={tags[k][:12] if k.endswith(('fingerprint', 'hash')) else tags[k]}"
                            for k in sorted(tags))
        print(f"{r['version']:>7}  {','.join(r['aliases']) or '-':<20} {r['run_id'] or '-':<32}  {lineage}")
    return 0
