"""The frozen encoders a model is conditioned on in ``ddpm train``: a text model's text encoder (``train.text_encoder``)
and unCLIP's decoder's CLIP (``train.image_encoder``, whose image tower embeds each training image). Each is resolved
once on the driver, handed to every worker through Ray's object store, and pinned by the run's checkpoints.

::

    driver   train.text_encoder: models:/NAME/VERSION or models:/NAME@ALIAS of a CLIP from ddpm train-clip, or a
             folder ddpm.text.load reads (e.g. a Stable Diffusion folder's text_encoder/ + tokenizer/);
             train.image_encoder: a CLIP from ddpm train-clip (models:/ or a folder ddpm.clip.load reads)
             -> the local folder -> loaded (an unusable one is a UserError) -> written again in its module's layout
             (a downloaded folder's fp16 or "text_model."-prefixed weights normalised) -> those files, and their
             source {uri, name, version, sha256 of the weights as written}
    resume   every checkpoint carries its encoders (model/text/, model/image_encoder/; their sources in
             model/config.json): a resume whose train.text_encoder or train.image_encoder now resolves to other
             weights (an alias that moved) is refused
    worker   the files from Ray's object store, the weights' sha256 checked against the source, loaded on the
             worker's device (every rank encodes its own rows)
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipelines import storage as store
from pipelines.errors import UserError

TEXT, IMAGE = "text_encoder", "image_encoder"  # the kinds: train.<kind>, and the checkpoint's config.json entry
# each kind's files in its module's layout (ddpm.text.save, ddpm.clip.save) and the file whose sha256 names it
WEIGHTS = {TEXT: "text_encoder/model.safetensors", IMAGE: "clip/model.safetensors"}


@dataclass(frozen=True)
class ResolvedEncoder:
    """An encoder as the workers will load it: its ``kind`` (TEXT or IMAGE), its files (name -> bytes), where it
    came from (``source``: uri, name, version, sha256), its ``width`` (the U-Net's ``text_dim``: the token states';
    or ``image_dim``: the CLIP embedding's), a text encoder's ``context_length`` and a CLIP's ``image_shape``
    (H, W, C) it embeds."""

    kind: str
    files: dict[str, bytes]
    source: dict
    width: int
    context_length: int | None = None
    image_shape: tuple[int, int, int] | None = None


def resolve_text_encoder(uri: str, tracking_uri: str | None = None) -> ResolvedEncoder:
    """``train.text_encoder`` -> its files and source (a registered CLIP is downloaded into the registry cache)."""
    from ddpm import text

    folder, name, version = _folder(uri, tracking_uri, "train.text_encoder")
    try:
        encoder = text.load(folder)
    except text.TextEncoderError as exc:
        raise UserError(f"train.text_encoder {uri}: {exc}") from None
    files = _files(lambda tmp: text.save(tmp, encoder.tokenizer, encoder.model))
    return ResolvedEncoder(TEXT, files, _source(uri, name, version, files[WEIGHTS[TEXT]]), encoder.width,
                           context_length=encoder.context_length)


def resolve_clip(uri: str, tracking_uri: str | None = None, *, what: str = "train.image_encoder"):
    """A CLIP (``models:/`` or a folder) -> (the loaded CLIP, ``ddpm.clip.LoadedClip``; its files in ddpm.clip's
    layout; its source {uri, name, version, sha256}). ``what`` names the setting in errors."""
    from ddpm import clip

    from pipelines.registry import resolve_clip as resolve_registered

    found = resolve_registered(uri, tracking_uri)  # models:/ downloaded, a folder searched for its clip/
    name, version = found.name, found.version
    try:
        loaded = clip.load(found.path)
    except clip.ClipError as exc:
        raise UserError(f"{what} {uri}: {exc}") from None
    files = _files(lambda tmp: clip.save(tmp, loaded.model, loaded.tokenizer))  # whatever the folder held besides
    return loaded, files, _source(uri, name, version, files[WEIGHTS[IMAGE]])


def resolve_image_encoder(uri: str, tracking_uri: str | None = None) -> ResolvedEncoder:
    """``train.image_encoder`` -> the CLIP's files and source; its width is the embedding's (``model.image_dim``)."""
    loaded, files, source = resolve_clip(uri, tracking_uri)
    cfg = loaded.model.config
    return ResolvedEncoder(IMAGE, files, source, cfg.embed_dim,
                           image_shape=(cfg.image_size, cfg.image_size, cfg.in_channels))


def _folder(uri: str, tracking_uri: str | None, what: str) -> tuple[Path, str | None, str | None]:
    """(the local folder, registered name, version) of a text encoder's ``uri``: a registered CLIP is downloaded, a
    folder is taken as it is (a downloaded text encoder need not be a CLIP)."""
    from pipelines.registry import resolve_clip as resolve_registered

    if uri.startswith("models:/"):
        found = resolve_registered(uri, tracking_uri)
        return Path(found.path), found.name, found.version
    folder = Path(uri).expanduser()
    if not folder.exists():
        raise UserError(f"{what} {uri}: no such folder (or use models:/NAME/VERSION of a CLIP registered by ddpm "
                        f"train-clip)")
    return folder, None, None


def _files(write) -> dict[str, bytes]:
    """The files ``write(folder)`` writes, name -> bytes."""
    with tempfile.TemporaryDirectory(prefix="ddpm-encoder-") as tmp:
        write(tmp)
        return {p.relative_to(tmp).as_posix(): p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}


def _source(uri: str, name: str | None, version: str | None, weights: bytes) -> dict:
    from pipelines.tracking import redact_uri

    return {"uri": redact_uri(uri), "name": name, "version": version, "sha256": hashlib.sha256(weights).hexdigest()}


def tag(source: dict) -> str:
    """An encoder as a lineage tag: its pinned ``models:/NAME/VERSION``, else its (redacted) URI."""
    if source.get("name") and source.get("version"):
        return f"models:/{source['name']}/{source['version']}"
    return str(source.get("uri"))


def check_pinned(resolved: ResolvedEncoder, storage: str, name: str) -> None:
    """A run resumes with the encoder its checkpoints carry, never another (an alias that moved since)."""
    from ddpm.checkpoint import CONFIG_FILE

    from pipelines.train.checkpoints import MODEL_DIR, latest_checkpoint

    saved = latest_checkpoint(storage, name)
    if saved is None:
        return
    config = store.read_json(store.join(saved.uri, MODEL_DIR, CONFIG_FILE))
    pinned = (config.get(resolved.kind) or {}).get("source") or {}
    if pinned and pinned.get("sha256") != resolved.source["sha256"]:
        what = "text encoder" if resolved.kind == TEXT else "CLIP"
        raise UserError(f"run {name} was trained with {what} {tag(pinned)} (weights sha256 "
                        f"{str(pinned.get('sha256'))[:12]}), but train.{resolved.kind}={resolved.source['uri']} is "
                        f"now {resolved.source['sha256'][:12]}; pin the version (models:/NAME/VERSION) or use "
                        f"another --name for a new run")


def for_workers(resolved: ResolvedEncoder) -> dict:
    """What the workers' job carries: the kind, the files in Ray's object store (once for every worker) and the
    source."""
    from pipelines.actors import put_payload

    return {"kind": resolved.kind, "payload": put_payload(resolved.files), "source": resolved.source}


def load_on_worker(job: dict, device):
    """From :func:`for_workers`'s job, its weights checked, on ``device``: the frozen ``ddpm.text.TextEncoder``, or
    the frozen CLIP (``ddpm.clip.LoadedClip``)."""
    from ddpm import clip, text

    from pipelines.actors import get_payload, unpacked

    kind = job["kind"]
    files = get_payload(job["payload"])
    found = hashlib.sha256(files[WEIGHTS[kind]]).hexdigest()
    if found != job["source"]["sha256"]:
        raise RuntimeError(f"the {kind}'s weights arrived with sha256 {found}, not {job['source']['sha256']} "
                           f"(the driver's)")
    with unpacked(files, prefix="ddpm-encoder-") as folder:
        return text.load(folder, device=device) if kind == TEXT else clip.load(folder, device=device)
