"""What a batch is conditioned on: one object for class labels, text and a CLIP image embedding.

A :class:`Condition` travels row-aligned with x_t through the U-Net, the losses, the samplers, RePaint and the one
generation function; a model reads the fields it takes. Its *null* form is what classifier-free guidance (Ho &
Salimans 2022) drops to, and what caption dropout trains: the null class (label -1) for a class model, the empty
prompt's encoding (or a negative prompt's) for a text model, carried as ``negative``::

    out = out(x_t, t, negative) + w (out(x_t, t, cond) - out(x_t, t, negative))

Text conditions come from :func:`encode_prompts` (a frozen ``ddpm.text.TextEncoder``, Stable Diffusion's
conditioning): token states for cross-attention and the pooled output for the time embedding. Image conditions come
from :func:`embed_images` (a frozen CLIP's image tower, DALL-E 2's decoder): the unit-norm image embedding, whose
null form is zeros (unCLIP trains the unconditional branch by zeroing the embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from .clip import Clip
    from .text import TextEncoder, TokenReport

FIELDS = ("labels", "text", "pooled", "image")  # a Condition's row-aligned tensors, in fields() order

# Prompts encoded per text-encoder call, the last call padded: at a fixed shape a prompt's states do not depend on
# the other prompts of the batch (the rule of ddpm.generation.fixed_size_forward, for the text encoder).
ENCODE_ROWS = 8


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class Condition:
    """What each row of a batch is conditioned on; a model reads the fields it takes (B rows each)."""

    labels: torch.Tensor | None = None  # (B,) int64; -1 = the learned null class
    text: torch.Tensor | None = None  # (B, L, D) token states of a frozen text encoder (cross-attention's keys/values)
    pooled: torch.Tensor | None = None  # (B, D) the text encoder's pooled output (added to the time embedding)
    negative: "Condition | None" = None  # row-aligned: what classifier-free guidance pushes away from
    image: torch.Tensor | None = None  # (B, E) unit-norm CLIP image embeddings; zero rows = no image (the null form)

    def __post_init__(self):
        if self.labels is None and self.text is None and self.image is None:
            raise ValueError("a Condition needs class labels, text or an image embedding")
        if (self.text is None) != (self.pooled is None):
            raise ValueError("a Condition's text and pooled embedding come together (both or neither)")
        if self.labels is not None and self.labels.dim() != 1:
            raise ValueError(f"labels must have shape (B,), got {tuple(self.labels.shape)}")
        if self.text is not None and (self.text.dim() != 3 or self.pooled.dim() != 2
                                      or self.pooled.shape[1] != self.text.shape[2]):
            raise ValueError(f"text must be (B, L, D) and pooled (B, D), got {tuple(self.text.shape)} and "
                             f"{tuple(self.pooled.shape)}")
        if self.image is not None and self.image.dim() != 2:
            raise ValueError(f"image must be (B, E) embeddings, got {tuple(self.image.shape)}")
        rows = {t.shape[0] for t in (self.labels, self.text, self.pooled, self.image) if t is not None}
        if len(rows) != 1:
            raise ValueError(f"a Condition's fields have different row counts: {sorted(rows)}")
        if self.negative is not None:
            n = self.negative
            if len(n) != len(self) or n.fields() != self.fields() or n.negative is not None:
                raise ValueError(f"the negative condition must have the same rows ({len(self)}) and fields "
                                 f"({', '.join(self.fields())}) and no negative of its own; got {len(n)} rows of "
                                 f"{', '.join(n.fields())}")

    def fields(self) -> tuple[str, ...]:
        """The names of the fields that are set (``negative`` aside), e.g. ("labels",) or ("text", "pooled")."""
        return tuple(name for name in FIELDS if getattr(self, name) is not None)

    def __len__(self) -> int:
        return next(getattr(self, name) for name in FIELDS if getattr(self, name) is not None).shape[0]

    def null(self) -> "Condition":
        """What guidance drops to, row for row: the negative if set, else the null class (labels -> -1) and zero
        image embeddings."""
        if self.negative is not None:
            return self.negative
        if self.text is not None:
            raise ValueError("a text condition has no null form of its own: build it with "
                             "ddpm.conditioning.encode_prompts, which adds the empty (or negative) prompt's encoding")
        return Condition(labels=None if self.labels is None else torch.full_like(self.labels, -1),
                         image=None if self.image is None else torch.zeros_like(self.image))

    def select(self, index: slice | torch.Tensor) -> "Condition":
        """The rows ``index`` (a slice or an index tensor) of every field, the negative's too."""
        pick = (lambda t: None if t is None else t[index]) if isinstance(index, slice) else (
            lambda t: None if t is None else t[index.to(t.device)])
        return Condition(pick(self.labels), pick(self.text), pick(self.pooled),
                         None if self.negative is None else self.negative.select(index), pick(self.image))

    def pad_to(self, rows: int) -> "Condition":
        """``rows`` rows in fresh buffers: these rows, then padding rows of the null class (label -1) and zeros
        (text, pooled, image). Same shape and strides for every chunk, as ``ddpm.fixed_size_forward`` needs."""
        n = len(self)
        if rows < n:
            raise ValueError(f"cannot pad {n} rows to {rows}")

        def pad(t: torch.Tensor | None, fill) -> torch.Tensor | None:
            if t is None:
                return None
            out = t.new_full((rows, *t.shape[1:]), fill)
            out[:n] = t
            return out

        return Condition(pad(self.labels, -1), pad(self.text, 0), pad(self.pooled, 0),
                         None if self.negative is None else self.negative.pad_to(rows), pad(self.image, 0))

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "Condition":
        """On ``device``; ``dtype`` applies to the float fields (text, pooled, image) only."""
        move = lambda t: None if t is None else t.to(device, dtype) if t.is_floating_point() else t.to(device)  # noqa
        return Condition(move(self.labels), move(self.text), move(self.pooled),
                         None if self.negative is None else self.negative.to(device, dtype), move(self.image))

    @staticmethod
    def cat(conditions: Sequence["Condition"]) -> "Condition":
        """The rows of ``conditions`` one after the other (same fields each); negatives concatenated when every
        condition has one, else None."""
        if not conditions:
            raise ValueError("Condition.cat needs at least one condition")
        fields = conditions[0].fields()
        if any(c.fields() != fields for c in conditions):
            raise ValueError(f"cannot concatenate conditions with different fields: "
                             f"{sorted({c.fields() for c in conditions})}")
        join = lambda name: torch.cat([getattr(c, name) for c in conditions]) if name in fields else None  # noqa
        negatives = [c.negative for c in conditions]
        negative = Condition.cat(negatives) if all(n is not None for n in negatives) else None
        return Condition(join("labels"), join("text"), join("pooled"), negative, join("image"))


def as_condition(condition: Condition | torch.Tensor | None) -> Condition | None:
    """A Condition as it is; a (B,) int64 label tensor as ``Condition(labels=...)`` (the shorthand of class models);
    None as None."""
    if condition is None or isinstance(condition, Condition):
        return condition
    if isinstance(condition, torch.Tensor):
        return Condition(labels=condition)
    raise TypeError(f"expected a Condition, a (B,) label tensor or None, got {type(condition).__name__}")


def from_labels(class_labels: int | Sequence[int] | np.ndarray | torch.Tensor | None,
                count: int) -> Condition | None:
    """None (unconditional), one class for every image, or one per image -> a Condition of (count,) int64 labels
    on the CPU."""
    if class_labels is None:
        return None
    if isinstance(class_labels, Integral):
        return Condition(labels=torch.full((count,), int(class_labels), dtype=torch.long))
    if isinstance(class_labels, torch.Tensor):
        labels = class_labels.detach().to("cpu", torch.long).reshape(-1)
    else:
        labels = torch.as_tensor(np.asarray(class_labels), dtype=torch.long).reshape(-1)
    if labels.shape[0] != count:
        raise ValueError(f"got {labels.shape[0]} class labels for {count} seeds")
    return Condition(labels=labels)


def _per_row(values: str | Sequence[str], count: int, what: str) -> list[str]:
    rows = [values] * count if isinstance(values, str) else list(values)
    if len(rows) != count:
        raise ValueError(f"got {len(rows)} {what} for {count} rows")
    bad = next((v for v in rows if not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(f"{what} must be strings, got {type(bad).__name__}")
    return rows


def encode_prompts(encoder: "TextEncoder", prompts: Sequence[str],
                   negative_prompts: str | Sequence[str] | None = None, *, rows: int = ENCODE_ROWS) -> Condition:
    """prompts (B strings) -> a text Condition: token states (B, L, D), pooled (B, D), and as its negative the
    encoding of ``negative_prompts`` (one for all or one per row; default "", the empty prompt, which caption
    dropout trains as the unconditional model).

    Each distinct string (prompts and negatives together) is encoded once, ``rows`` strings per encoder call with
    the last call padded, so a row's states never depend on the other prompts in the batch.
    """
    prompts = _per_row(prompts, 1 if isinstance(prompts, str) else len(prompts), "prompts")
    negatives = _per_row("" if negative_prompts is None else negative_prompts, len(prompts), "negative prompts")
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    distinct = list(dict.fromkeys(prompts + negatives))  # string -> its row, in first-seen order
    row = {s: i for i, s in enumerate(distinct)}
    ids = encoder.tokenize(distinct)  # (U, L) int64
    states, pooled = [], []
    for start in range(0, len(distinct), rows):
        n = min(rows, len(distinct) - start)
        chunk = ids.new_zeros((rows, ids.shape[1]))  # (rows, L), padding rows of id 0
        chunk[:n] = ids[start:start + n]
        s, p = encoder.encode_ids(chunk)  # (rows, L, D), (rows, D)
        states.append(s[:n])
        pooled.append(p[:n])
    states, pooled = torch.cat(states), torch.cat(pooled)  # (U, L, D), (U, D)
    take = lambda strings: torch.tensor([row[s] for s in strings], device=states.device)  # noqa
    p, n = take(prompts), take(negatives)
    return Condition(text=states[p], pooled=pooled[p], negative=Condition(text=states[n], pooled=pooled[n]))


@torch.no_grad()
def embed_images(clip: "Clip", images: torch.Tensor, *, rows: int = ENCODE_ROWS) -> torch.Tensor:
    """images (N, C, H, W) in [-1, 1] -> unit-norm CLIP image embeddings (N, E), float32, on the CLIP's device.

    ``rows`` images per image-tower call with the last call zero-padded, so an image's embedding never depends on
    the other images of the batch (as :func:`encode_prompts` does for prompts)."""
    device = next(clip.parameters()).device
    out = []
    for start in range(0, images.shape[0], rows):
        n = min(rows, images.shape[0] - start)
        chunk = images.new_zeros((rows, *images.shape[1:]), dtype=torch.float32, device=device)
        chunk[:n] = images[start:start + n]
        out.append(clip.encode_image(chunk)[:n].float())
    return torch.cat(out)


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between unit vectors (..., E): sin((1 - t) theta) / sin(theta) z0 + sin(t theta) /
    sin(theta) z1, theta = arccos(z0 . z1), which stays on the unit sphere where CLIP's embeddings lie (unCLIP's
    interpolations, Ramesh et al. 2022 section 3.2). t = 0 gives z0 and t = 1 gives z1, exactly; nearly parallel
    vectors (theta < 1e-4) fall back to the normalized straight line."""
    t = torch.as_tensor(t, dtype=z0.dtype, device=z0.device)
    if t.dim() == 1:
        t = t[:, None]  # one t per row
    cos = (z0 * z1).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    small = theta < 1e-4
    safe = torch.where(small, torch.ones_like(sin), sin)
    arc = torch.sin((1 - t) * theta) / safe * z0 + torch.sin(t * theta) / safe * z1
    line = torch.nn.functional.normalize((1 - t) * z0 + t * z1, dim=-1)
    out = torch.where(small, line, arc)
    return torch.where(t == 0, z0, torch.where(t == 1, z1, out))


def with_image(embeddings: torch.Tensor, text: Condition | None = None) -> Condition:
    """unCLIP's decoder condition: image embeddings (B, E) (unit norm: from :func:`embed_images` or the prior),
    with a text condition's rows when the decoder also reads the caption. Its negative is zero embeddings (and the
    text's negative): the unconditional model that embedding dropout trains."""
    zeros = torch.zeros_like(embeddings)
    if text is None:
        return Condition(image=embeddings, negative=Condition(image=zeros))
    if text.text is None or text.labels is not None or len(text) != embeddings.shape[0]:
        raise ValueError(f"with_image takes a text condition of {embeddings.shape[0]} rows, got {text.fields()} of "
                         f"{len(text)}")
    negative = text.null()
    return Condition(text=text.text, pooled=text.pooled, image=embeddings,
                     negative=Condition(text=negative.text, pooled=negative.pooled, image=zeros))


def guided(condition, guidance_scale: float) -> bool:
    """Whether a request or batch runs classifier-free guidance (two network rows per image): it has a condition
    (a class label, a non-empty prompt, a Condition or label tensor) and w != 1."""
    if condition is None or (isinstance(condition, str) and condition == ""):
        return False
    return guidance_scale != 1.0


def describe(report: "TokenReport", context_length: int | None = None) -> str:
    """What tokenizing a prompt lost, as the warning every door prints or returns ("" when nothing was lost), e.g.
    "12 tokens past the 77-token context were dropped; unknown words: 'purple', 'hexagon'"."""
    parts = []
    if report.dropped_tokens:
        context = "the context" if context_length is None else f"the {context_length}-token context"
        n = report.dropped_tokens
        parts.append(f"{n} token{'s' if n != 1 else ''} past {context} {'were' if n != 1 else 'was'} dropped")
    if report.unknown_words:
        parts.append(f"unknown word{'s' if len(report.unknown_words) != 1 else ''}: "
                     + ", ".join(repr(w) for w in report.unknown_words))
    return "; ".join(parts)
