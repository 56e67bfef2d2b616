"""The autoencoder of latent diffusion: a KL-regularised convolutional VAE with diffusers' ``AutoencoderKL`` blocks.

Rombach et al. 2022 (LDM, section 3 and appendix G) and Stable Diffusion's VAE, rebuilt in plain PyTorch::

    encoder   conv_in -> per level: layers_per_block ResNet blocks (+ a stride-2 conv, but not on the last level)
              -> mid block (ResNet, self-attention, ResNet) -> GroupNorm, SiLU, conv_out -> 2 * latent channels
    quant_conv 1x1 -> (mean, logvar) of a diagonal Gaussian q(z | x), logvar clamped to [-30, 20]
    decoder   post_quant_conv 1x1 -> conv_in -> mid block -> per level, widest first: layers_per_block + 1 ResNet
              blocks (+ nearest x2 and a conv, but not on the last level) -> GroupNorm, SiLU, conv_out

The downsampling factor is f = 2^(levels - 1): ``block_out_channels`` of length 3 gives f = 4, of length 4 f = 8.
The modules carry diffusers' names (``encoder.down_blocks.0.resnets.1.norm2``, ``decoder.mid_block.attentions.0
.to_q``, ...), so the weights of a diffusers ``AutoencoderKL`` folder (Stable Diffusion's VAE, say) load into the same
module, and ``encode``/``decode`` then match diffusers' own to float rounding (tests/ddpm/test_autoencoder.py).

The latents a diffusion model sees are scaled: ``encode(x) = (mean - shift_factor) * scaling_factor``, and
``decode(z)`` undoes that before the decoder. ``scaling_factor`` is 1 / std of the latent means measured on the
training data (:func:`measure_scaling_factor`; Stable Diffusion's 0.18215), stored in the config with the weights.

The folder format (``ddpm.folder_format``, like ``ddpm.checkpoint``'s; no pickle)::

    autoencoder/
      config.json         {"format": "ddpm-autoencoder", "version": 1, "autoencoder": {...}, "metadata": {...}}
      model.safetensors   "<param>" float32

``load(path)`` also reads a folder in diffusers' format (``config.json`` with ``"_class_name": "AutoencoderKL"`` and
``diffusion_pytorch_model.safetensors``); a folder whose only weights are a pickle (``.bin``/``.ckpt``) is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .folder_format import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, check_weights, read_weights, write_folder
from .folder_format import read_config as read_config_file

FORMAT, VERSION = "ddpm-autoencoder", 1
# diffusers' weight files, in the order they are tried (the fp16 variant is read and cast to float32)
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers' and LDM's clamp of the posterior's log-variance
_EPS = 1e-6  # every GroupNorm of AutoencoderKL


class AutoencoderError(CheckpointError):
    """An autoencoder folder that is missing, truncated, foreign, or does not match its own config."""


@dataclass(frozen=True)
class AutoencoderConfig:
    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one entry per level; f = 2^(levels - 1)
    layers_per_block: int = 2  # ResNet blocks per encoder level (the decoder has one more)
    norm_num_groups: int = 32
    scaling_factor: float = 1.0  # 1 / std of the latent means on the training data; 1.0 until measured
    shift_factor: float = 0.0  # subtracted before scaling (0 for SD 1.x/2.x/XL; SD3 and FLUX set one)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if not self.block_out_channels or min(self.block_out_channels) < 1:
            raise ValueError(f"block_out_channels must be a non-empty list of positive ints, "
                             f"got {list(self.block_out_channels)}")
        if self.in_channels < 1 or self.latent_channels < 1 or self.layers_per_block < 1 or self.norm_num_groups < 1:
            raise ValueError("in_channels, latent_channels, layers_per_block and norm_num_groups must be at least 1")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups {self.norm_num_groups}")
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            raise ValueError(f"scaling_factor must be a positive finite number, got {self.scaling_factor}")
        if not math.isfinite(self.shift_factor):
            raise ValueError(f"shift_factor must be finite, got {self.shift_factor}")

    @property
    def downsample_factor(self) -> int:
        """f: an (H, W) image becomes an (H / f, W / f) latent."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def preset(cls, name: str, **overrides) -> "AutoencoderConfig":
        """``tiny`` (tests: f = 4, 0.24M parameters), ``small-f4`` / ``small-f8`` (CPU-sized: 2.7M / 3.9M),
        ``f4`` (LDM's KL-f4 layout, 55.3M) and ``f8`` (Stable Diffusion's VAE layout, 83,653,863 parameters, the
        same names and shapes); 4 latent channels, scaling_factor 1.0 until measured."""
        presets = {
            "tiny": dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8),
            "small-f4": dict(block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=32),
            "small-f8": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=32),
            "f4": dict(block_out_channels=(128, 256, 512), layers_per_block=2, norm_num_groups=32),
            "f8": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        }
        if name not in presets:
            raise ValueError(f"unknown autoencoder preset {name!r}; choose from {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown autoencoder config keys: {sorted(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------------------------
# Blocks (diffusers' names, so that its state dicts load as they are)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=_EPS)


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D without a time embedding: skip(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """One-head self-attention over the H*W positions, with diffusers' ``Attention`` names (group_norm, to_q, to_k,
    to_v, to_out.0): x + to_out(softmax(q k^T / sqrt(C)) v)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hs = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(hs)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # each (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        return x + self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Pad one row and column at the bottom and right, then a stride-2 3x3 conv (diffusers' Downsample2D, padding 0)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups)
                                      for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups)
                                      for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class MidBlock(nn.Module):
    """ResNet, self-attention (optional), ResNet, all at the narrowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """x (B, C, H, W) -> (B, 2 * latent_channels, H / f, W / f): the mean and log-variance before quant_conv."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block, groups, downsample=i < len(chans) - 1)
            for i, c in enumerate(chans)
        ])
        self.mid_block = MidBlock(chans[-1], groups, cfg.mid_block_attention)
        self.conv_norm_out = _norm(chans[-1], groups)
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """z (B, latent_channels, h, w) -> (B, C, h f, w f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        chans, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        self.mid_block = MidBlock(chans[0], groups, cfg.mid_block_attention)
        self.up_blocks = nn.ModuleList([
            UpBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block + 1, groups, upsample=i < len(chans) - 1)
            for i, c in enumerate(chans)
        ])
        self.conv_norm_out = _norm(chans[-1], groups)
        self.conv_out = nn.Conv2d(chans[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# ---------------------------------------------------------------------------------------------------------------
# The autoencoder


class Autoencoder(nn.Module):
    """``encode``: images in [-1, 1] (B, C, H, W) -> scaled latent means (B, latent_channels, H / f, W / f);
    ``decode``: scaled latents -> images (about [-1, 1]); ``forward``: the training pass (reconstruction of a
    posterior sample, mean, logvar), with :func:`kl_divergence` for the KL term."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = cfg = config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        n = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * n, 2 * n, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(n, n, 1) if cfg.use_post_quant_conv else None

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, H, W) of an image -> (latent_channels, H / f, W / f) of its latent."""
        c, h, w = image_shape
        f = self.downsample_factor
        if c != self.config.in_channels or h % f or w % f:
            raise ValueError(f"images of shape {tuple(image_shape)} do not fit this autoencoder: it takes "
                             f"{self.config.in_channels} channels and sides divisible by f = {f}")
        return (self.config.latent_channels, h // f, w // f)

    def set_scaling_factor(self, scaling_factor: float, shift_factor: float | None = None) -> None:
        """Store a measured scaling (and shift) with the model: ``save`` writes it into config.json."""
        shift = self.config.shift_factor if shift_factor is None else float(shift_factor)
        self.config = replace(self.config, scaling_factor=float(scaling_factor), shift_factor=shift)

    def encode_dist(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> (mean, logvar) of q(z | x), each (B, latent_channels, H / f, W / f),
        unscaled."""
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        self.latent_shape(tuple(x.shape[1:]))
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> the diffusion model's latents: (mean - shift) * scale."""
        mean, _ = self.encode_dist(x)
        return (mean - self.config.shift_factor) * self.config.scaling_factor

    def decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        """Latents as the encoder produces them (mean or a posterior sample) -> images (B, C, H, W)."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"expected latents of shape (B, {self.config.latent_channels}, h, w), "
                             f"got {tuple(z.shape)}")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latents (B, latent_channels, h, w) -> images (B, C, h f, w f), about [-1, 1]."""
        return self.decode_unscaled(z / self.config.scaling_factor + self.config.shift_factor)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                sample_posterior: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: x -> (reconstruction from z ~ q(z | x) (or its mean), mean, logvar)."""
        mean, logvar = self.encode_dist(x)
        z = sample_latent(mean, logvar, generator) if sample_posterior else mean
        return self.decode_unscaled(z), mean, logvar


def sample_latent(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I) drawn from ``generator`` (the reparameterisation trick)."""
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                      device=generator.device if generator is not None else mean.device).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * eps


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z | x) || N(0, I)) per image, summed over the latent's elements: (B, ...) -> (B,).

    0.5 * sum(mean^2 + var - 1 - logvar), as LDM's and diffusers' ``DiagonalGaussianDistribution.kl()``.
    """
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


@torch.no_grad()
def measure_scaling_factor(ae: Autoencoder, batches: Iterable[torch.Tensor]) -> float:
    """1 / std of the (unscaled, unshifted) latent means over every element of ``batches`` (images in [-1, 1]),
    the statistic LDM's ``scale_by_std`` computes; accumulated in float64."""
    n, total, total_sq = 0, 0.0, 0.0
    device = next(ae.parameters()).device
    for x in batches:
        mean, _ = ae.encode_dist(x.to(device))
        m = mean.double()
        n, total, total_sq = n + m.numel(), total + float(m.sum()), total_sq + float(m.pow(2).sum())
    if n < 2:
        raise ValueError("measure_scaling_factor needs at least one batch of images")
    var = (total_sq - total * total / n) / (n - 1)
    if not var > 0:
        raise ValueError("the latents have zero variance; cannot measure a scaling factor")
    return 1.0 / math.sqrt(var)


# ---------------------------------------------------------------------------------------------------------------
# Our folder format, and diffusers'


def save(path: str | Path, ae: Autoencoder, *, metadata: dict | None = None) -> Path:
    """Write ``ae`` (float32 weights, its config with the scaling factor) to the folder ``path``."""
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in ae.state_dict().items()}
    config = {"format": FORMAT, "version": VERSION, "autoencoder": ae.config.to_dict(), "metadata": metadata or {}}
    return write_folder(path, tensors, config)


def read_config(path: str | Path) -> dict:
    """The folder's config.json, as written (ours or diffusers'), read by ``ddpm.folder_format.read_config``."""
    return read_config_file(path, what="an autoencoder folder", error=AutoencoderError)


def from_diffusers_config(d: dict) -> AutoencoderConfig:
    """A diffusers ``AutoencoderKL`` config.json -> AutoencoderConfig (diffusers' defaults where a key is absent);
    what this module cannot reproduce is refused, naming the key."""
    if d.get("_class_name") != "AutoencoderKL":
        raise ValueError(f"_class_name is {d.get('_class_name')!r}, not 'AutoencoderKL'")
    chans = tuple(d.get("block_out_channels", (64,)))
    down = tuple(d.get("down_block_types", ("DownEncoderBlock2D",)))
    up = tuple(d.get("up_block_types", ("UpDecoderBlock2D",)))
    if down != ("DownEncoderBlock2D",) * len(chans) or up != ("UpDecoderBlock2D",) * len(chans):
        raise ValueError(f"unsupported block types {list(down)} / {list(up)} for {len(chans)} levels; "
                         "only DownEncoderBlock2D / UpDecoderBlock2D")
    if d.get("act_fn", "silu") not in ("silu", "swish"):
        raise ValueError(f"unsupported act_fn {d['act_fn']!r}; only silu")
    in_channels = int(d.get("in_channels", 3))
    if int(d.get("out_channels", 3)) != in_channels:
        raise ValueError(f"in_channels {in_channels} != out_channels {d.get('out_channels')}")
    for key in ("latents_mean", "latents_std"):
        if d.get(key) is not None:
            raise ValueError(f"per-channel {key} is not supported")
    return AutoencoderConfig(
        in_channels=in_channels,
        latent_channels=int(d.get("latent_channels", 4)),
        block_out_channels=chans,
        layers_per_block=int(d.get("layers_per_block", 1)),
        norm_num_groups=int(d.get("norm_num_groups", 32)),
        scaling_factor=float(d.get("scaling_factor", 0.18215)),
        shift_factor=float(d.get("shift_factor") or 0.0),
        use_quant_conv=bool(d.get("use_quant_conv", True)),
        use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
        mid_block_attention=bool(d.get("mid_block_add_attention", True)),
    )


# Older diffusers checkpoints (and the SD VAE files of 2022) name the attention projections query/key/value/proj_attn.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def from_diffusers_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict -> this module's (same names; old attention names renamed)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")  # e.g. encoder.mid_block.attentions.0.query.weight
        if len(parts) >= 4 and parts[-4] == "attentions" and parts[-2] in _OLD_ATTENTION_NAMES:
            key = ".".join(parts[:-2] + [_OLD_ATTENTION_NAMES[parts[-2]], parts[-1]])
            if value.ndim == 4 and value.shape[2:] == (1, 1):  # a 1x1 conv's weight is the same linear map
                value = value[:, :, 0, 0]
        out[key] = value
    return out


def _diffusers_weights(path: Path) -> Path:
    for name in DIFFUSERS_WEIGHTS:
        if (path / name).exists():
            return path / name
    pickles = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth", ".pkl"))
    hint = (f"; {', '.join(pickles)} is a pickle and is never loaded (convert it to safetensors first)"
            if pickles else "")
    raise AutoencoderError(f"{path}: no {DIFFUSERS_WEIGHTS[0]}{hint}")


def load(path: str | Path, device: str | torch.device = "cpu") -> Autoencoder:
    """Read an autoencoder folder, ours or diffusers' AutoencoderKL, into an ``Autoencoder`` in eval mode (float32).

    Only config.json and safetensors files are read; nothing is unpickled.
    """
    path = Path(path)
    config = read_config(path)
    if config.get("format") == FORMAT:
        if config.get("version") != VERSION:
            raise AutoencoderError(f"{path}: unsupported {FORMAT} version {config.get('version')!r}; "
                                   f"expected {VERSION}")
        try:
            cfg = AutoencoderConfig.from_dict(config["autoencoder"])
        except (KeyError, TypeError, ValueError) as exc:
            raise AutoencoderError(f"{path / CONFIG_FILE}: invalid autoencoder config ({exc})") from None
        state = read_weights(path / WEIGHTS_FILE, AutoencoderError)
    elif "_class_name" in config:
        try:
            cfg = from_diffusers_config(config)
        except (TypeError, ValueError) as exc:
            raise AutoencoderError(f"{path / CONFIG_FILE}: not a diffusers AutoencoderKL this module can load "
                                   f"({exc})") from None
        state = from_diffusers_state(read_weights(_diffusers_weights(path), AutoencoderError))
    else:
        raise AutoencoderError(f"{path / CONFIG_FILE}: neither a {FORMAT!r} folder nor a diffusers AutoencoderKL "
                               f"(format {config.get('format')!r})")
    ae = Autoencoder(cfg)
    check_weights(state, ae.state_dict(), path, AutoencoderError)
    ae.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return ae.to(device).eval()
