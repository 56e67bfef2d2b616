"""The model a batch job samples from: resolved once on the driver, its files sent to the actors.

:class:`ModelSource` resolves a registry URI or a checkpoint folder, reads the checkpoint once (so a bad one fails
before any actor starts) and records what the images depend on: the version and the sha256 of the folder's files.
Actors load it with :func:`load_model` from the files :meth:`ModelSource.payload` put in the object store
(``pipelines.actors``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.actors import folder_payload, unpacked
from pipelines.errors import UserError


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: where its checkpoint folder is on the driver, which version it is, what it can make."""

    uri: str
    path: Path
    name: str | None
    version: str | None
    alias: str | None
    sha256: str              # of the checkpoint folder's files: the weights actually used, even for a plain folder
    image_shape: tuple       # (H, W, C), as the images come out
    num_classes: int
    num_timesteps: int
    class_names: tuple
    autoencoder: Any = None  # a latent model's autoencoder source (uri, name, version, sha256); None for pixels
    takes_text: bool = False  # a text model: it takes prompts, not class labels
    tokenizer: Any = field(default=None, compare=False, repr=False)  # a text model's, for the prompt warnings
    takes_image: bool = False  # unCLIP's decoder: it is conditioned on a CLIP image embedding
    prior_timesteps: int | None = None  # a whole unCLIP model's prior's T; None: no prior

    @classmethod
    def resolve(cls, uri: str, tracking_uri: str | None = None) -> "ModelSource":
        """Resolve ``uri`` (registry or folder) and read the checkpoint once here, so that a bad one fails now."""
        from ddpm import checkpoint
        from pipelines.registry import resolve_model

        resolved = resolve_model(uri, tracking_uri)
        try:
            loaded = checkpoint.load(resolved.path, device="cpu")
        except checkpoint.CheckpointError as exc:
            raise UserError(f"{uri}: {exc}") from None
        channels, height, width = loaded.image_shape  # a latent model's decoded images
        decoder = checkpoint.read_config(resolved.path).get("autoencoder")  # where a latent model's came from
        return cls(uri, Path(resolved.path), resolved.name, resolved.version, resolved.alias,
                   _folder_sha256(Path(resolved.path)), (height, width, channels), loaded.config.num_classes,
                   loaded.schedule.num_timesteps, tuple(loaded.class_names),
                   decoder.get("source") if decoder else None, loaded.prompt_encoder is not None,
                   None if loaded.prompt_encoder is None else loaded.prompt_encoder.tokenizer,
                   loaded.image_encoder is not None,
                   None if loaded.prior is None else loaded.prior.schedule.num_timesteps)

    def identity(self) -> dict:
        """What a job's images depend on about the model (the alias is not: it may move to the same version)."""
        return {"uri": self.uri, "name": self.name, "version": self.version, "sha256": self.sha256,
                "autoencoder": self.autoencoder}

    def payload(self) -> dict[str, bytes]:
        """The checkpoint folder's files by relative name: what actors load the model from."""
        return folder_payload(self.path)


def _folder_sha256(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
            with p.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def load_model(payload: dict[str, bytes], device, weights: str = "ema") -> Any:
    """A ``ddpm.checkpoint.LoadedModel`` (EMA weights unless ``weights`` = "model") from :meth:`ModelSource.payload`,
    written to a scratch folder."""
    from ddpm import checkpoint

    with unpacked(payload) as folder:
        return checkpoint.load(folder, device=device, weights=weights)
