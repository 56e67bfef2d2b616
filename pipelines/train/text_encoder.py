"""A text model's frozen text encoder in ``ddpm train``: resolved once on the driver, handed to every worker through
Ray's object store, and pinned by the run's checkpoints.

::

    driver   train.text_encoder (models:/NAME/VERSION or models:/NAME@ALIAS of a CLIP from ddpm train-clip, or a
             folder ddpm.text.load reads, e.g. a Stable Diffusion folder's text_encoder/ + tokenizer/) -> the local
             folder -> loaded (an unusable one is a UserError) -> written again in ddpm.text's layout (a downloaded
             folder's fp16 or "text_model."-prefixed weights normalised) -> those files, and their source
             {uri, name, version, sha256 of the weights as written}
    resume   every checkpoint carries its text encoder (model/text/, its source in model/config.json): a resume whose
             train.text_encoder now resolves to other weights (an alias that moved) is refused
    worker   the files from Ray's object store, the weights' sha256 checked against the source, loaded on the
             worker's device (every rank encodes its own captions)
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipelines import storage as store
from pipelines.errors import UserError

WEIGHTS = "text_encoder/model.safetensors"  # ddpm.text.save's layout: the file whose sha256 names the encoder


@dataclass(frozen=True)
class ResolvedTextEncoder:
    """The text encoder as the workers will load it: its files (``ddpm.text.save``'s layout, name -> bytes), where
    it came from (``source``: uri, name, version, sha256), and the width of its token states (the U-Net's
    ``text_dim``)."""

    files: dict[str, bytes]
    source: dict
    width: int
    context_length: int


def resolve_text_encoder(uri: str, tracking_uri: str | None = None) -> ResolvedTextEncoder:
    """``train.text_encoder`` -> its files and source (a registered CLIP is downloaded into the registry cache)."""
    from ddpm import text

    from pipelines.registry import resolve_clip
    from pipelines.tracking import redact_uri

    if uri.startswith("models:/"):
        found = resolve_clip(uri, tracking_uri)
        folder, name, version = found.path, found.name, found.version
    else:
        folder, name, version = Path(uri).expanduser(), None, None
        if not folder.exists():
            raise UserError(f"train.text_encoder {uri}: no such folder (or use models:/NAME/VERSION of a CLIP "
                            f"registered by ddpm train-clip)")
    try:
        encoder = text.load(folder)
    except text.TextEncoderError as exc:
        raise UserError(f"train.text_encoder {uri}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="ddpm-text-") as tmp:
        text.save(tmp, encoder.tokenizer, encoder.model)
        files = {p.relative_to(tmp).as_posix(): p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
    source = {"uri": redact_uri(uri), "name": name, "version": version,
              "sha256": hashlib.sha256(files[WEIGHTS]).hexdigest()}
    return ResolvedTextEncoder(files, source, encoder.width, encoder.context_length)


def tag(source: dict) -> str:
    """The text encoder as a lineage tag: its pinned ``models:/NAME/VERSION``, else its (redacted) URI."""
    if source.get("name") and source.get("version"):
        return f"models:/{source['name']}/{source['version']}"
    return str(source.get("uri"))


def check_pinned(resolved: ResolvedTextEncoder, storage: str, name: str) -> None:
    """A run resumes with the text encoder its checkpoints carry, never another (an alias that moved since)."""
    from ddpm.checkpoint import CONFIG_FILE

    from pipelines.train.checkpoints import MODEL_DIR, latest_checkpoint

    saved = latest_checkpoint(storage, name)
    if saved is None:
        return
    config = store.read_json(store.join(saved.uri, MODEL_DIR, CONFIG_FILE))
    pinned = (config.get("text_encoder") or {}).get("source") or {}
    if pinned and pinned.get("sha256") != resolved.source["sha256"]:
        raise UserError(f"run {name} was trained with text encoder {tag(pinned)} (weights sha256 "
                        f"{str(pinned.get('sha256'))[:12]}), but train.text_encoder={resolved.source['uri']} is now "
                        f"{resolved.source['sha256'][:12]}; pin the version (models:/NAME/VERSION) or use another "
                        f"--name for a new run")


def for_workers(resolved: ResolvedTextEncoder) -> dict:
    """What the workers' job carries: the files in Ray's object store (once for every worker) and the source."""
    from pipelines.actors import put_payload

    return {"payload": put_payload(resolved.files), "source": resolved.source}


def load_on_worker(job: dict, device):
    """The frozen ``ddpm.text.TextEncoder`` on ``device``, from :func:`for_workers`'s job, its weights checked."""
    from ddpm import text

    from pipelines.actors import get_payload, unpacked

    files = get_payload(job["payload"])
    found = hashlib.sha256(files[WEIGHTS]).hexdigest()
    if found != job["source"]["sha256"]:
        raise RuntimeError(f"the text encoder's weights arrived with sha256 {found}, not "
                           f"{job['source']['sha256']} (the driver's)")
    with unpacked(files, prefix="ddpm-text-") as folder:
        return text.load(folder, device=device)
