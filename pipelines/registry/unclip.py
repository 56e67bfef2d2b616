"""One registered unCLIP model (DALL-E 2): a decoder checkpoint (``ddpm train`` with ``train.image_encoder``) and a
prior (``ddpm train-prior``) on the same CLIP, written as one ddpm checkpoint that carries the prior
(``ddpm.checkpoint.attach_prior``) and registered as one version whose tags pin both parts.

Every door that loads a model then takes a prompt for it (prompt -> the CLIP's text tower -> the prior -> the
decoder, inside ``ddpm.generate_images``), and an image for variations.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import UserError


@dataclass(frozen=True)
class UnclipVersion:
    name: str
    version: str
    created: bool  # False: a version of these two parts was registered before, and is reused


def _tag(resolved, uri: str) -> str:
    return f"models:/{resolved.name}/{resolved.version}" if resolved.name and resolved.version else uri


def register_unclip(prior_uri: str, decoder_uri: str, name: str, *, tracking_uri: str, experiment: str = "ddpm",
                    alias: str | None = None, say=print) -> UnclipVersion:
    """Check that the prior and the decoder share their CLIP, write the whole model, log it into a new MLflow run of
    ``experiment`` and register it as a version of ``name`` (tags: kind=unclip, prior, decoder, clip), or reuse the
    version already registered from the same two parts; ``alias`` then points at it (with its canary recorded)."""
    import torch

    from ddpm import checkpoint, clip, prior
    from ddpm.folder_format import CheckpointError

    from pipelines import tracking
    from pipelines.registry.resolve import resolve_model, resolve_prior
    from pipelines.registry.versions import find_version, log_model, promote, register

    found_prior = resolve_prior(prior_uri, tracking_uri)
    found_decoder = resolve_model(decoder_uri, tracking_uri)
    try:
        loaded_prior = prior.load(found_prior.path)
        prior_clip = clip.load(found_prior.path / "clip")
        decoder = checkpoint.load(found_decoder.path)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    if decoder.image_encoder is None:
        raise UserError(f"--decoder {decoder_uri}: not unCLIP's decoder (it takes no CLIP image embedding); train one "
                        f"with ddpm train --set train.image_encoder=models:/CLIP/VERSION")
    if decoder.prior is not None:
        raise UserError(f"--decoder {decoder_uri}: already a whole unCLIP model (it carries a prior)")
    ours, theirs = decoder.image_encoder.model.state_dict(), prior_clip.model.state_dict()
    if ours.keys() != theirs.keys() or any(not torch.equal(v, theirs[k]) for k, v in ours.items()):
        raise UserError(f"--prior {prior_uri} was trained on another CLIP than --decoder {decoder_uri}: the prior's "
                        f"embeddings would not be the decoder's; train both on the same models:/CLIP/VERSION")
    tags = {"kind": "unclip", "prior": _tag(found_prior, prior_uri), "decoder": _tag(found_decoder, decoder_uri),
            "clip": str((checkpoint.read_config(found_decoder.path).get("image_encoder") or {}).get("source", {})
                        .get("uri"))}
    existing = find_version(name, {k: tags[k] for k in ("kind", "prior", "decoder")}, tracking_uri)
    if existing is not None:
        say(f"{name} version {existing} already holds prior {tags['prior']} + decoder {tags['decoder']}")
        version, created = existing, False
    else:
        with tempfile.TemporaryDirectory(prefix="ddpm-unclip-") as tmp:
            folder = Path(tmp) / "model"
            shutil.copytree(found_decoder.path, folder)
            try:
                checkpoint.attach_prior(folder, loaded_prior, {"uri": tags["prior"], "name": found_prior.name,
                                                               "version": found_prior.version})
                checkpoint.load(folder)  # the whole model loads as every door will load it
            except CheckpointError as exc:
                raise UserError(str(exc)) from None
            client = tracking.client(tracking_uri)
            run = client.create_run(tracking.ensure_experiment(experiment, tracking_uri),
                                    run_name=f"{name}-unclip", tags={"kind": "unclip"})
            for key in ("prior", "decoder", "clip"):
                client.log_param(run.info.run_id, key, tags[key])
            uri = log_model(folder, run_id=run.info.run_id, tracking_uri=tracking_uri)
            client.set_terminated(run.info.run_id)
            version, created = register(uri, name, tags=tags, tracking_uri=tracking_uri), True
        say(f"registered {name} version {version}: prior {tags['prior']} + decoder {tags['decoder']} "
            f"(CLIP {tags['clip']})")
    if alias:
        promote(name, version, alias, tracking_uri)
        say(f"models:/{name}@{alias} -> version {version}")
    return UnclipVersion(name, version, created)
