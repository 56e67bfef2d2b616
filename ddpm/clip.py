"""A small CLIP (Radford et al. 2021) the platform trains on its own captions: two towers into one embedding space.

    image tower   images (B, C, H, W) in [-1, 1] -> conv stages (residual blocks, stride-2 downsampling)
                  -> attention pooling with positional embeddings (CLIP's ResNet head, so where things are survives
                  the pooling: captions say "left of") -> visual_projection -> L2 normalise        (B, E)
    text tower    token ids (B, L) -> ddpm.text.TextTransformer (token states (B, L, D), pooled at EOS (B, D))
                  -> text_projection -> L2 normalise                                              (B, E)
    loss          symmetric cross-entropy over the cosine similarities times a learned scale exp(t),
                  t = log(1/0.07) at init, exp(t) clipped at 100 (CLIP, section 2.5)

The text tower is ddpm.text's Transformer under transformers' CLIPTextModel names, so a trained CLIP's text half is
also a text encoder folder that ``ddpm.text.load`` reads (the U-Net's cross-attention attends to its token states).

The folder (safetensors + JSON, nothing pickled)::

    ROOT/
      clip/          config.json ({"format": "ddpm-clip", "version": 1, "clip": ClipConfig}), model.safetensors
                     (both towers, both projections, logit_scale)
      text_encoder/  config.json (CLIPTextModel's), model.safetensors  - ddpm.text.save: the text tower again
      tokenizer/     vocab.json, merges.txt, tokenizer_config.json      - ddpm.text.save

``load`` checks that the two copies of the text tower are equal, so the encoder a U-Net pins and the CLIP that
scores its images are one model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import text
from .folder_format import WEIGHTS_FILE, CheckpointError, check_weights, read_weights, write_folder
from .folder_format import read_config as read_json

FORMAT, VERSION = "ddpm-clip", 1
CLIP_DIR = "clip"
INIT_TEMPERATURE = 0.07  # logit_scale = log(1 / 0.07) at init (CLIP)
MAX_LOGIT_SCALE = 100.0  # exp(logit_scale) is clipped here "to prevent scaling the logits by more than 100"


class ClipError(CheckpointError):
    """A CLIP folder that is missing, pickled, foreign, or does not match its own config."""


@dataclass(frozen=True)
class ClipConfig:
    """Both towers' sizes. ``image_channels``: the conv stages' widths, each stage but the last ending in a 2x
    downsampling, so the pooled grid is image_size / 2^(len - 1). The text fields become ddpm.text.TextConfig
    (``text_config``); the token ids must be the tokenizer's (``for_tokenizer`` fills them in)."""

    image_size: int = 32
    in_channels: int = 3
    image_channels: tuple[int, ...] = (32, 64, 128)
    image_blocks: int = 1  # residual blocks per stage
    image_heads: int = 4  # heads of the attention pooling
    embed_dim: int = 128  # E, the shared embedding
    vocab_size: int = 49408
    context_length: int = 77  # L
    text_width: int = 128  # D
    text_layers: int = 4
    text_heads: int = 4
    text_mlp_ratio: int = 4
    hidden_act: str = "quick_gelu"
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407

    def __post_init__(self):
        object.__setattr__(self, "image_channels", tuple(self.image_channels))
        for name in ("image_size", "in_channels", "image_blocks", "image_heads", "embed_dim", "text_mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.image_channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                                          for c in self.image_channels):
            raise ValueError(f"image_channels must be positive integers, got {list(self.image_channels)}")
        if self.image_size % 2 ** (len(self.image_channels) - 1):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{len(self.image_channels) - 1} "
                             f"for {len(self.image_channels)} stages")
        for c in self.image_channels:
            if c % _groups(c):
                raise ValueError(f"{c} channels are not divisible into {_groups(c)} GroupNorm groups")
        if self.image_channels[-1] % self.image_heads:
            raise ValueError(f"the last stage's {self.image_channels[-1]} channels are not divisible by "
                             f"image_heads {self.image_heads}")
        self.text_config()  # its own checks: widths, heads, activation, ids

    def text_config(self) -> text.TextConfig:
        return text.TextConfig(vocab_size=self.vocab_size, hidden_size=self.text_width,
                               intermediate_size=self.text_mlp_ratio * self.text_width,
                               num_hidden_layers=self.text_layers, num_attention_heads=self.text_heads,
                               max_position_embeddings=self.context_length, hidden_act=self.hidden_act,
                               bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
                               pad_token_id=self.pad_token_id)

    @classmethod
    def for_tokenizer(cls, tokenizer: text.ClipTokenizer, **sizes) -> "ClipConfig":
        """A config whose vocabulary, context and special token ids are ``tokenizer``'s."""
        return cls(**{**sizes, "vocab_size": tokenizer.vocab_size, "context_length": tokenizer.context_length,
                      "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                      "pad_token_id": tokenizer.pad_id})

    @property
    def grid_size(self) -> int:
        """The side of the grid the attention pooling sees."""
        return self.image_size // 2 ** (len(self.image_channels) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_channels"] = list(self.image_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ClipConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown CLIP config keys: {sorted(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------------------------
# Image tower


def _groups(channels: int) -> int:
    """32 groups (Wu and He 2018) where there are 128 channels or more, else groups of 4 channels: a group of one
    channel is instance norm, which erases the level of a flat colour, the first thing a caption names."""
    return max(1, min(32, channels // 4))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels)


class ResBlock(nn.Module):
    """x -> skip(x) + conv(SiLU(GN(conv(SiLU(GN(x)))))), 3x3 convolutions; skip is 1x1 when the width changes."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class AttentionPool(nn.Module):
    """CLIP's AttentionPool2d: the mean feature queries all positions (plus itself), with learned positional
    embeddings, in one multi-head attention: (B, C, h, w) -> (B, C)."""

    def __init__(self, channels: int, grid: int, heads: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, channels) / channels**0.5)
        self.q_proj, self.k_proj = nn.Linear(channels, channels), nn.Linear(channels, channels)
        self.v_proj, self.out_proj = nn.Linear(channels, channels), nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        tokens = x.flatten(2).transpose(1, 2)  # (B, hw, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.positional_embedding
        q = self.q_proj(tokens[:, :1]).reshape(b, 1, self.heads, -1).transpose(1, 2)  # (B, heads, 1, C/heads)
        k, v = (proj(tokens).reshape(b, tokens.shape[1], self.heads, -1).transpose(1, 2)
                for proj in (self.k_proj, self.v_proj))  # each (B, heads, hw + 1, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, 1, C/heads)
        return self.out_proj(out.transpose(1, 2).reshape(b, c))


class ImageTower(nn.Module):
    """images (B, C, H, W) -> pooled features (B, image_channels[-1])."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        widths = cfg.image_channels
        self.stem = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        stages, c = [], widths[0]
        for i, width in enumerate(widths):
            for _ in range(cfg.image_blocks):
                stages.append(ResBlock(c, width))
                c = width
            if i < len(widths) - 1:
                stages.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # H -> H / 2
        self.stages = nn.Sequential(*stages)
        self.norm = _norm(c)
        self.pool = AttentionPool(c, cfg.grid_size, cfg.image_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.silu(self.norm(self.stages(self.stem(x)))))


# ---------------------------------------------------------------------------------------------------------------
# The model


class Clip(nn.Module):
    """Both towers, their projections into E dimensions and the learned log-scale t (CLIPModel's names:
    vision_model, visual_projection, text_model, text_projection, logit_scale).

    ``forward(images, ids)`` returns (image_emb (B, E), text_emb (B, E), exp(t) clipped at 100), the arguments of
    ``contrastive_loss``: everything that gets a gradient passes through forward, as DDP wants.
    """

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = ImageTower(cfg)
        self.text_model = text.TextTransformer(cfg.text_config())
        c, d = cfg.image_channels[-1], cfg.text_width
        self.visual_projection = nn.Linear(c, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(d, cfg.embed_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=c**-0.5)  # CLIP: std = width^-1/2
        nn.init.normal_(self.text_projection.weight, std=d**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / INIT_TEMPERATURE)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1] -> unit-norm embeddings (B, E)."""
        size = self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (self.config.in_channels, size, size):
            raise ValueError(f"expected images of shape (B, {self.config.in_channels}, {size}, {size}), "
                             f"got {tuple(images.shape)}")
        return F.normalize(self.visual_projection(self.vision_model(images)), dim=-1)

    def text_states(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) -> (token states (B, L, D), pooled (B, D)): what a text-conditioned U-Net attends to."""
        return self.text_model(ids)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> unit-norm embeddings (B, E) of the pooled (EOS) state."""
        return F.normalize(self.text_projection(self.text_states(ids)[1]), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(t), clipped at 100; a clipped t gets no gradient, as if clamped after the step (OpenCLIP)."""
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(ids), self.scale()


# ---------------------------------------------------------------------------------------------------------------
# The loss over the global batch, and retrieval


def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


class _AllGather(torch.autograd.Function):
    """Every worker's rows, concatenated in rank order: (b_r, E) -> (sum_r b_r, E), batches of any sizes.

    Backward sums the gradient with respect to the gathered rows over the workers (all_reduce) and keeps this
    worker's rows: d(sum_r L_r) / d(x_local), since every worker's loss L_r sees x_local among its columns. The
    common shortcut (gather without gradient, then put the local rows back) keeps only d L_local / d x_local and,
    with each worker's loss over its own rows, misses the other workers' terms: its gradient is not the global one.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        padded = x.new_zeros((max(sizes), *x.shape[1:]))  # all_gather wants one shape on every worker
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(parts, padded)
        ctx.start, ctx.size = sum(sizes[:rank]), x.shape[0]
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)  # sum over workers r of d L_r / d gathered
        return grad[ctx.start:ctx.start + ctx.size], None, None


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x (b, ...) -> (the global batch's rows (N, ...) in rank order, where this worker's rows start among them),
    differentiable (``_AllGather``); (x, 0) without a process group of two or more workers."""
    if not _distributed():
        return x, 0
    dist = torch.distributed
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes, rank = [int(s) for s in sizes], dist.get_rank()
    return _AllGather.apply(x, sizes, rank), sum(sizes[:rank])


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, *,
                     reduction: str = "mean") -> torch.Tensor:
    """CLIP's symmetric cross-entropy (Radford et al. 2021, figure 3), a scalar.

    image_emb, text_emb: (b, E) unit-norm, row i of each a pair; logit_scale: the multiplier exp(t) (``Clip.scale``).
    With columns the N rows of the global batch (every worker's, gathered; just these without a process group)::

        logits_img = s * I_local T_global^T   (b, N)    logits_txt = s * T_local I_global^T   (b, N)
        loss = (CE(logits_img, labels) + CE(logits_txt, labels)) / 2,   labels = offset + arange(b)

    Each worker's loss is the mean over its own rows, so with equal local batches the workers' mean (what DDP's
    averaged gradients follow) is the loss of the whole global batch, and its gradient is that loss's gradient.
    ``reduction="sum"`` gives the sum over this worker's rows instead: 0 for a worker with no rows, which still
    joins the gathers (forward and backward), so that workers with unequal shares can weight their sums exactly.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"expected two (B, E) embeddings of one shape, got {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    all_images, offset = gather_rows(image_emb)  # (N, E)
    all_texts, _ = gather_rows(text_emb)  # (N, E)
    labels = offset + torch.arange(image_emb.shape[0], device=image_emb.device)
    logits_img = logit_scale * image_emb @ all_texts.T  # (b, N): image i against every text
    logits_txt = logit_scale * text_emb @ all_images.T  # (b, N): text i against every image
    total = (F.cross_entropy(logits_img, labels, reduction="sum")
             + F.cross_entropy(logits_txt, labels, reduction="sum")) / 2
    return total if reduction == "sum" else total / image_emb.shape[0]


@torch.no_grad()
def retrieval_topk(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: Sequence[str] | None = None,
                   k: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Text-to-image top-k accuracy among a held-out set: {"top1": ..., "top5": ...}.

    image_emb, text_emb: (N, E), row i of each from pair i. Text i ranks the N images by cosine similarity; it
    counts as correct at k when one of its k nearest images carries the same caption as text i (``captions[i]``),
    since many images share a caption in synthetic data and none of them is a wrong answer. Without captions,
    only image i is correct. k larger than N is cut to N.
    """
    n = image_emb.shape[0]
    if text_emb.shape[0] != n or (captions is not None and len(captions) != n):
        raise ValueError(f"expected as many texts and captions as images ({n}), got {text_emb.shape[0]} and "
                         f"{'none' if captions is None else len(captions)}")
    if captions is None:
        same = torch.eye(n, dtype=torch.bool, device=image_emb.device)
    else:
        ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        caption_ids = torch.tensor([ids[c] for c in captions], device=image_emb.device)
        same = caption_ids[:, None] == caption_ids[None, :]  # (N texts, N images): image j is right for text i
    ranked = (F.normalize(text_emb, dim=-1) @ F.normalize(image_emb, dim=-1).T).argsort(dim=1, descending=True)
    hits = same.gather(1, ranked)  # (N, N): whether the r-th nearest image is right
    return {f"top{j}": hits[:, :min(j, n)].any(dim=1).float().mean().item() for j in k}


# ---------------------------------------------------------------------------------------------------------------
# The folder


class LoadedClip(NamedTuple):
    model: Clip
    tokenizer: text.ClipTokenizer


def save(path: str | Path, model: Clip, tokenizer: text.ClipTokenizer, *, metadata: dict | None = None) -> Path:
    """Write ``clip/`` (both towers, float32) and, through ``ddpm.text.save``, ``text_encoder/`` + ``tokenizer/``."""
    if tokenizer.vocab_size > model.config.vocab_size or tokenizer.context_length > model.config.context_length:
        raise ValueError(f"the tokenizer ({tokenizer.vocab_size} tokens, context {tokenizer.context_length}) does not "
                         f"fit the model ({model.config.vocab_size} tokens, context {model.config.context_length})")
    path = Path(path)
    text.save(path, tokenizer, model.text_model)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    config = {"format": FORMAT, "version": VERSION, "clip": model.config.to_dict(), "metadata": metadata or {}}
    write_folder(path / CLIP_DIR, tensors, config)  # config.json last: the folder is complete once it is there
    return path


def read_config(path: str | Path) -> dict:
    """``ROOT/clip/config.json``, checked to be this format and version."""
    folder = Path(path) / CLIP_DIR
    config = read_json(folder, what="a ddpm CLIP folder (ROOT/clip/)", error=ClipError)
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ClipError(f"{folder / 'config.json'}: format {config.get('format')!r} version "
                        f"{config.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    return config


def load(path: str | Path, device: str | torch.device = "cpu") -> LoadedClip:
    """Read ``save``'s folder: (the Clip in eval mode, float32, on ``device``; its tokenizer). Only JSON, text and
    safetensors files are read; a ``text_encoder/`` that differs from the CLIP's text tower is refused."""
    path = Path(path)
    config = read_config(path)
    try:
        cfg = ClipConfig.from_dict(config.get("clip") or {})
    except (TypeError, ValueError) as exc:
        raise ClipError(f"{path / CLIP_DIR / 'config.json'}: not a CLIP this module can build ({exc})") from None
    model = Clip(cfg)
    state = read_weights(path / CLIP_DIR / WEIGHTS_FILE, ClipError)
    check_weights(state, model.state_dict(), path / CLIP_DIR, ClipError)
    model.load_state_dict(state, strict=True)

    encoder = text.load(path)  # text_encoder/ + tokenizer/, and their own checks
    own = model.text_model.state_dict()
    if encoder.model.config != cfg.text_config() or any(
            not torch.equal(v, own[k]) for k, v in encoder.model.state_dict().items()):
        raise ClipError(f"{path}: {text.ENCODER_DIR}/ is not the text tower in {CLIP_DIR}/ (different config or "
                        "weights); write the folder again with ddpm.clip.save")
    if encoder.tokenizer.vocab_size > cfg.vocab_size or encoder.tokenizer.context_length > cfg.context_length:
        raise ClipError(f"{path / text.TOKENIZER_DIR}: does not fit the CLIP ({encoder.tokenizer.vocab_size} tokens, "
                        f"context {encoder.tokenizer.context_length})")
    return LoadedClip(model.to(device).eval(), encoder.tokenizer)
