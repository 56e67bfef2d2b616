"""The tiny text model the deploy tests serve: ``tests.support.save_text_checkpoint``'s random U-Net and text
encoder, saved again predicting x_0. With random weights an epsilon model drives nearly every pixel to 0 or 255,
where "the same bytes" would hold almost trivially; an x_0 model gives images with many grey levels."""

from __future__ import annotations

from pathlib import Path

from ddpm import checkpoint
from tests.support import save_text_checkpoint


CONTEXT = 8  # tokens, BOS and EOS included: a 7-word prompt already runs past it


def save_text_model(path: Path, seed: int = 0) -> Path:
    """An 8x8x1 text model (``CONTEXT`` tokens, tokenizer learned from ``tests.support.TEXT_CAPTIONS``) at ``path``."""
    raw = checkpoint.load(save_text_checkpoint(path.with_name(path.name + "-raw"), seed=seed, context=CONTEXT))
    return checkpoint.save(path, raw.model, raw.schedule, prediction_type="sample", text_encoder=raw.text_encoder)
