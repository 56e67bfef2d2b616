"""From a model URI to a local folder: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a local path.

Nothing is unpickled: a registered version's artifacts are downloaded into the cache (:mod:`.cache`), the wanted
folder is found among them by its ``config.json``, and the caller loads it with ``ddpm.checkpoint.load`` or
``ddpm.autoencoder.load`` (safetensors + JSON).

A local path may be a model folder, a training checkpoint (``model/`` inside) or a training run's folder
(``checkpoint_<images seen, 12 digits>/`` inside): a run resolves to its latest checkpoint, and a folder that holds
several runs is refused rather than guessed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from pipelines import tracking
from pipelines.errors import UserError
from pipelines.registry import cache

CHECKPOINT_PREFIX = "checkpoint_"  # pipelines.train.checkpoints.folder_name: checkpoint_<images seen, 12 digits>


@dataclass(frozen=True)
class ResolvedModel:
    """A local folder, and which registered version it is (all None for a plain local path)."""

    path: Path
    name: str | None = None
    version: str | None = None
    alias: str | None = None


@dataclass(frozen=True)
class Wanted:
    """What a resolution looks for: a ``config.json`` that ``matches``; ``what`` and ``short`` name it in messages."""

    what: str
    matches: object  # (parsed config.json: dict) -> bool
    short: str

    @property
    def noun(self) -> str:
        return self.what.split(" (")[0]


def checkpoint_kind() -> Wanted:
    from ddpm.checkpoint import FORMAT

    return Wanted(f"ddpm checkpoint (config.json with format {FORMAT!r})", lambda c: c.get("format") == FORMAT,
                  "checkpoint")


def autoencoder_kind() -> Wanted:
    from ddpm.autoencoder import FORMAT

    return Wanted(f"autoencoder (config.json with format {FORMAT!r}, or a diffusers AutoencoderKL)",
                  lambda c: c.get("format") == FORMAT or c.get("_class_name") == "AutoencoderKL", "autoencoder")


def clip_kind() -> Wanted:
    from ddpm.clip import FORMAT

    return Wanted(f"CLIP (clip/config.json with format {FORMAT!r})", lambda c: c.get("format") == FORMAT, "CLIP")


def prior_kind() -> Wanted:
    from ddpm.prior import FORMAT

    return Wanted(f"unCLIP prior (config.json with format {FORMAT!r})", lambda c: c.get("format") == FORMAT, "prior")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, None, ALIAS); ``models:/NAME/VERSION`` -> (NAME, VERSION, None)."""
    body = uri[len("models:/"):].strip("/")
    if "@" in body:
        name, _, alias = body.partition("@")
        if name and alias and "/" not in alias:
            return cache.check_name(name, uri), None, alias
    else:
        name, _, version = body.rpartition("/")
        if name and version.isdigit():
            return cache.check_name(name, uri), version, None
    raise UserError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def resolve(uri: str, wanted: Wanted, tracking_uri: str | None = None, *, say=None) -> ResolvedModel:
    """A registry URI or a local path -> the local folder holding ``wanted``.

    Registered versions are downloaded once into the cache; an alias is looked up on every call (it moves), the
    download only when that version is not cached yet. ``say``: where to print which checkpoint of a local run was
    used (stderr by default; a registered version is named by its URI already).
    """
    if not uri.startswith("models:/"):
        path = Path(uri).expanduser()
        if not path.exists():
            raise UserError(f"{uri}: no such {wanted.short} folder (or use models:/NAME@ALIAS, models:/NAME/VERSION)")
        found = find_folder(path, wanted)
        if found != path:
            _say(say, f"using {found} (weights sha256 {weights_hash(found)})")
        return ResolvedModel(found)
    name, version, alias = parse_model_uri(uri)
    server = tracking_uri or tracking.tracking_uri()
    version = version or version_for_alias(name, alias, server)
    folder = cache.fetch(name, version, server, check=lambda staging: find_folder(staging, wanted))
    return ResolvedModel(find_folder(folder, wanted), name, version, alias)


def resolve_model(uri: str, tracking_uri: str | None = None, *, say=None) -> ResolvedModel:
    """A DDPM checkpoint folder to pass to ``ddpm.checkpoint.load``."""
    return resolve(uri, checkpoint_kind(), tracking_uri, say=say)


def resolve_autoencoder(uri: str, tracking_uri: str | None = None, *, say=None) -> ResolvedModel:
    """An autoencoder folder (ours, or a downloaded diffusers AutoencoderKL) to pass to ``ddpm.autoencoder.load``."""
    return resolve(uri, autoencoder_kind(), tracking_uri, say=say)


def resolve_clip(uri: str, tracking_uri: str | None = None, *, say=None) -> ResolvedModel:
    """A CLIP folder (``ddpm.clip.save``'s) to pass to ``ddpm.clip.load``, or ``ddpm.text.load`` for its text tower."""
    found = resolve(uri, clip_kind(), tracking_uri, say=say)
    return ResolvedModel(found.path.parent, found.name, found.version, found.alias)  # ROOT/clip/ -> ROOT


def resolve_prior(uri: str, tracking_uri: str | None = None, *, say=None) -> ResolvedModel:
    """A prior folder (``ddpm.prior.save``'s, its CLIP in ``clip/``) to pass to ``ddpm.prior.load``."""
    return resolve(uri, prior_kind(), tracking_uri, say=say)


def find_checkpoint(root: Path) -> Path:
    """The DDPM checkpoint folder under ``root`` (see :func:`find_folder`)."""
    return find_folder(root, checkpoint_kind())


def find_autoencoder(root: Path) -> Path:
    """The autoencoder folder under ``root``: ours, a diffusers ``AutoencoderKL``, a training checkpoint's, a
    registered version's, a latent dataset's ``autoencoder/`` copy or the one a latent DDPM carries."""
    return find_folder(root, autoencoder_kind())


def find_folder(root: Path, wanted: Wanted) -> Path:
    """The folder under ``root`` (``root`` included) whose config.json satisfies ``wanted``.

    Several matches: if they lie in the ``checkpoint_*`` folders of one run, the latest checkpoint's (the largest
    images-seen number); in several runs, refused. Otherwise the shallowest match, and a tie is refused.
    Only JSON is read.
    """
    from ddpm.checkpoint import CONFIG_FILE

    root = Path(root)
    matches, unreadable = [], []  # unreadable: (path, why), said when nothing matches: one may be a broken one
    for config in sorted(root.rglob(CONFIG_FILE), key=lambda p: (len(p.parts), str(p))):
        try:
            found = json.loads(config.read_text())
        except (OSError, ValueError) as exc:
            unreadable.append((config, f"invalid JSON ({exc})" if isinstance(exc, ValueError) else str(exc)))
            continue
        if isinstance(found, dict) and wanted.matches(found):
            matches.append(config.parent)
    if not matches:
        if unreadable:
            path, why = unreadable[0]
            raise UserError(f"{path}: {why}; is this a damaged {wanted.noun}?")
        raise UserError(f"{root}: no {wanted.what} in this folder")

    runs: dict[Path, list[Path]] = {}  # run folder -> its matching folders inside checkpoint_* folders
    for folder in matches:
        parts = folder.relative_to(root).parts
        at = next((i for i, part in enumerate(parts) if part.startswith(CHECKPOINT_PREFIX)), None)
        if at is not None:
            runs.setdefault(root.joinpath(*parts[:at]), []).append(folder)
    if len(runs) > 1:
        names = ", ".join(str(run) for run in sorted(runs))
        raise UserError(f"{root}: holds several training runs ({names}); name one of them")
    if runs:
        [(run, folders)] = runs.items()
        # checkpoint_<images seen, zero-padded>: the largest name is the latest; the shallowest folder within it
        return max(folders, key=lambda f: (f.relative_to(run).parts[0], -len(f.parts)))
    shallowest = [f for f in matches if len(f.parts) == len(matches[0].parts)]
    if len(shallowest) > 1:
        raise UserError(f"{root}: holds several {wanted.noun}s ({', '.join(map(str, shallowest))}); name one")
    return shallowest[0]


def weights_hash(folder: Path) -> str:
    """The first 12 hex digits of the sha256 of ``folder``'s weights file(s) (``*.safetensors``, sorted)."""
    digest = hashlib.sha256()
    for weights in sorted(Path(folder).glob("*.safetensors")):
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def version_for_alias(name: str, alias: str, tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return str(tracking.client(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        raise UserError(f"models:/{name}@{alias}: {first_line(exc)}") from None


def current_version(name: str, alias: str, tracking_uri: str | None = None) -> str:
    """The version ``models:/NAME@ALIAS`` points at now (Serve polls this to hot-reload)."""
    return version_for_alias(name, alias, tracking_uri or tracking.tracking_uri())


def first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _say(say, message: str) -> None:
    if say is None:
        print(message, file=sys.stderr)
    else:
        say(message)
