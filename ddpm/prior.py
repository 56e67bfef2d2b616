"""unCLIP's prior (Ramesh et al. 2022, section 2.1): a DDPM over CLIP image embeddings, conditioned on a caption.

The sample is a vector, not an image: an image embedding z_i (E,), unit-norm in CLIP's joint space. The prior
diffuses ``sqrt(E) z_i`` (:func:`embedding_scale`: coordinates of about unit variance, the scale the schedule
assumes; DALLE2-pytorch does the same) with the usual schedule, losses and samplers: x_t has shape (B, E), and
``ddpm.diffusion_loss``, ``ddpm.sample`` and guidance take it as they take (B, C, H, W).

The denoiser is unCLIP's decoder-only Transformer, which predicts the clean embedding (``prediction_type
"sample"``): a sequence of the caption's L token states, its pooled state, the timestep's embedding, the noised
embedding x_t and a learned query, each projected to ``width``; the query's output is the prediction. The caption
arrives as the text ``ddpm.conditioning.Condition`` a text U-Net takes (token states and pooled output of a frozen
text encoder), and its null form (the empty prompt's encoding, which caption dropout trains) is what classifier-free
guidance drops to. Attention is bidirectional: with one output token, a causal mask (unCLIP's) only hides the
query's inputs from each other, which the prediction does not need.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .conditioning import Condition, as_condition
from .folder_format import WEIGHTS_FILE, CheckpointError, check_weights, read_config, read_weights, write_folder
from .schedule import NoiseSchedule
from .unet import timestep_embedding

FORMAT, VERSION = "ddpm-prior", 1


@dataclass(frozen=True)
class PriorConfig:
    embed_dim: int  # E: CLIP's joint embedding, the vector the prior samples
    text_dim: int  # D: the width of the text encoder's token states and pooled output
    width: int = 256
    depth: int = 4
    heads: int = 4
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("embed_dim", "text_dim", "width", "depth", "heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PriorConfig":
        return cls(**d)


def embedding_scale(embed_dim: int) -> float:
    """The factor between a unit-norm embedding and what the prior diffuses: sqrt(E), so that each of the E
    coordinates has about unit variance, as pixels in [-1, 1] roughly do."""
    return math.sqrt(embed_dim)


class DiffusionPrior(nn.Module):
    """x_t (B, E), t (B,), a text Condition (token states (B, L, D), pooled (B, D)) -> predicted x_0 (B, E)."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.text_in = nn.Linear(config.text_dim, w)  # each token state -> one token
        self.pooled_in = nn.Linear(config.text_dim, w)
        self.time_in = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.x_in = nn.Linear(config.embed_dim, w)
        self.query = nn.Parameter(torch.zeros(w))
        self.kinds = nn.Parameter(torch.zeros(5, w))  # which input a token is: text, pooled, time, x_t, query
        layer = nn.TransformerEncoderLayer(w, config.heads, 4 * w, config.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(w)
        self.out = nn.Linear(w, config.embed_dim)
        nn.init.normal_(self.kinds, std=0.02)
        nn.init.normal_(self.query, std=0.02)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        c = as_condition(condition)
        if c is None or c.text is None:
            raise ValueError("the prior is conditioned on a caption: pass a text Condition (ddpm.encode_prompts)")
        b, w = x_t.shape[0], self.config.width
        dtype = self.x_in.weight.dtype
        kinds = self.kinds.to(dtype)
        tokens = torch.cat([
            self.text_in(c.text.to(dtype)) + kinds[0],  # (B, L, w)
            (self.pooled_in(c.pooled.to(dtype)) + kinds[1])[:, None],  # (B, 1, w)
            (self.time_in(timestep_embedding(t, w).to(dtype)) + kinds[2])[:, None],
            (self.x_in(x_t.to(dtype)) + kinds[3])[:, None],
            (self.query.to(dtype) + kinds[4]).expand(b, 1, w),
        ], dim=1)  # (B, L + 4, w)
        h = self.blocks(tokens)
        return self.out(self.norm(h[:, -1]))  # (B, E): the query's output, the predicted x_0


def normalize(x: torch.Tensor) -> torch.Tensor:
    """A sampled x_0 (B, E) as unit-norm embeddings: CLIP's image embeddings lie on the unit sphere."""
    return F.normalize(x.float(), dim=-1)


# -- the folder: config.json (format, prior config, schedule, metadata) beside model.safetensors -------------------
class PriorError(CheckpointError):
    """A prior folder that is missing, pickled, foreign, or does not match its own config."""


class LoadedPrior(NamedTuple):
    model: DiffusionPrior
    schedule: NoiseSchedule
    metadata: dict


def save(path: str | Path, prior: DiffusionPrior, schedule: NoiseSchedule, *, metadata: dict | None = None) -> Path:
    """Write the prior's weights (float32) and config.json: its config and schedule, and ``metadata`` (e.g. the
    CLIP it was trained on: the embedding space its samples live in)."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in prior.state_dict().items()}
    config = {"format": FORMAT, "version": VERSION, "prior": prior.config.to_dict(),
              "schedule": schedule.to_config(), "metadata": metadata or {}}
    return write_folder(path, tensors, config)


def load(path: str | Path, device: str | torch.device = "cpu") -> LoadedPrior:
    """Read :func:`save`'s folder: the prior in eval mode on ``device``, its schedule, its metadata. Only JSON and
    safetensors are read."""
    path = Path(path)
    config = read_config(path, what="a ddpm prior folder", error=PriorError)
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise PriorError(f"{path}: format {config.get('format')!r} version {config.get('version')!r}, expected "
                         f"{FORMAT!r} version {VERSION}")
    try:
        model = DiffusionPrior(PriorConfig.from_dict(config["prior"]))
        schedule = NoiseSchedule.from_config(config["schedule"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PriorError(f"{path}: not a prior this module can build ({exc})") from None
    state = read_weights(path / WEIGHTS_FILE, PriorError)
    check_weights(state, model.state_dict(), path, PriorError)
    model.load_state_dict(state, strict=True)
    return LoadedPrior(model.to(device).eval(), schedule, dict(config.get("metadata") or {}))
