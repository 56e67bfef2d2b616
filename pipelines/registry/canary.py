"""The canary: what a Serve replica checks before it serves a registered DDPM version.

At promotion the version's weights sample CANARY_SEEDS through the gate's sampler settings, and a small summary of
those images is stored as model-version tags. A replica that is about to switch to the version samples the same
seeds with the weights it loaded, on its own device and forward, and compares. Why not FD-cls: its classifier lives
in pipelines.evaluate, which deploy/ may not import, and on 16 images a Frechet distance is mostly noise; the same
seeds through the same weights give the same images (ddpm.generate_images: an image depends only on its seed and
settings), so a paired comparison is exact where FD-cls would be a rough test. See docs/serving.md, "The canary".
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipelines import tracking

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

    # A class model's labels; a text model's empty prompt (its unconditional rows: the text tower and the
    # cross-attention run, so other text weights show), unguided as canary_settings makes it.
    condition = loaded.condition(len(settings["seeds"]), class_labels=settings["class_labels"])
    return generate_images(loaded, settings["seeds"], condition=condition,
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
    from pipelines.registry.resolve import resolve_model

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
