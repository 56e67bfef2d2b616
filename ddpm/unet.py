"""The noise-prediction network eps_theta(x_t, t[, y]): the DDPM paper's U-Net (Ho et al. 2020, appendix B).

A PixelCNN++-style U-Net: at each resolution ``num_res_blocks`` residual blocks (GroupNorm, SiLU, 3x3 convs, the
time embedding added in between), self-attention at the resolutions listed in ``attention_resolutions``, strided
3x3 convolutions to go down and nearest-neighbour upsampling + 3x3 convolution to go up, skip connections from every
down block to its mirror up block. The timestep enters through a sinusoidal embedding (Transformer-style) and a
two-layer MLP. With ``num_classes > 0`` a learned class embedding is added to the time embedding; index
``num_classes`` is the learned *null* class used for classifier-free guidance, and a label of -1 selects it.

With ``text_dim`` D > 0 the network is text-conditioned as Stable Diffusion's (Rombach et al. 2022) and Imagen's
U-Nets are: after each self-attention block, a cross-attention block attends from the image features to the L token
states of a frozen text encoder, and the encoder's pooled output, projected, is added to the time embedding. The
conditioning arrives as one ``ddpm.conditioning.Condition``.

With ``image_dim`` E > 0 the network is unCLIP's decoder (Ramesh et al. 2022, section 2.1): a CLIP image embedding
z (unit norm, scaled by sqrt(E) to entries of about unit variance) is projected into the time embedding and into
``image_tokens`` extra context tokens that the cross-attention blocks attend to, after the text's L tokens when the
decoder reads the caption too. A zero embedding is the null form that embedding dropout trains for guidance.

With ``patch_size`` p > 1 the image is folded into p x p patches first (``pixel_unshuffle``: (C, H, W) ->
(C p^2, H/p, W/p)) and unfolded at the end, so the U-Net works on an (H/p)-sized grid at about 1/p^2 of the cost;
"simple diffusion" (Hoogeboom et al. 2023) does the same for high-resolution images.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .conditioning import Condition, as_condition


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_classes: int = 0  # 0: unconditional
    num_groups: int = 32
    num_heads: int = 1
    patch_size: int = 1  # p: the U-Net runs on the (image_size / p)-sized grid; attention_resolutions refer to it
    zero_init: bool = False  # start every residual branch and the output at 0, as DDPM's own code does
    text_dim: int = 0  # D, the width of the text encoder's token states; 0: no text (no cross-attention)
    image_dim: int = 0  # E, the width of a CLIP image embedding (unCLIP's decoder); 0: no image embedding
    image_tokens: int = 4  # the context tokens an image embedding is projected into (unCLIP: 4)

    def __post_init__(self):
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        levels = len(self.channel_mults)
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide image_size {self.image_size}")
        if self.grid_size % 2 ** (levels - 1):
            raise ValueError(f"the U-Net's grid ({self.grid_size} = image_size / patch_size) is not divisible by "
                             f"2^{levels - 1} for {levels} levels")
        if isinstance(self.text_dim, bool) or not isinstance(self.text_dim, int) or self.text_dim < 0:
            raise ValueError(f"text_dim must be a whole number >= 0, got {self.text_dim!r}")
        for name in ("image_dim", "image_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        if self.image_dim and not self.image_tokens:
            raise ValueError("an image-conditioned U-Net (image_dim > 0) needs image_tokens >= 1")
        for c in {self.base_channels * m for m in self.channel_mults}:
            if c % min(self.num_groups, c) or c % self.num_heads:
                raise ValueError(f"{c} channels are not divisible by num_groups/num_heads")

    @property
    def context_dim(self) -> int:
        """The width of the tokens cross-attention reads: the text's, else the image embedding's; 0: none."""
        return self.text_dim or self.image_dim

    @property
    def grid_size(self) -> int:
        """The side of the grid the U-Net's first level works on."""
        return self.image_size // self.patch_size

    @classmethod
    def preset(cls, name: str, **overrides) -> "UNetConfig":
        """``tiny`` (tests, 8x8x1), ``digits`` (16x16x1, 1.6M parameters), ``cifar10`` (the paper's 35.7M),
        ``rgb64`` (64x64x3: the CIFAR-10 network one level higher, 35.7M) and ``lsun256`` (the paper's 256x256
        LSUN/CelebA-HQ model, 113.7M: six levels down to 8x8, attention at 16x16 only, no dropout)."""
        presets = {
            "tiny": dict(image_size=8, in_channels=1, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                         attention_resolutions=(4,), dropout=0.0, num_groups=8),
            "digits": dict(image_size=16, in_channels=1, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=2,
                           attention_resolutions=(8,), dropout=0.0, num_groups=8),
            "cifar10": dict(image_size=32, in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2),
                            num_res_blocks=2, attention_resolutions=(16,), dropout=0.1),
            "rgb64": dict(image_size=64, in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2),
                          num_res_blocks=2, attention_resolutions=(16,), dropout=0.1),
            "lsun256": dict(image_size=256, in_channels=3, base_channels=128, channel_mults=(1, 1, 2, 2, 4, 4),
                            num_res_blocks=2, attention_resolutions=(16,), dropout=0.0),
        }
        if name not in presets:
            raise ValueError(f"unknown UNet preset {name!r}; choose from {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown UNet config keys: {sorted(unknown)}")
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017): [sin(t w_i), cos(t w_i)], w_i = max_period^(-i/(dim/2)).

    t: (B,) integer or float timesteps -> (B, dim) float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """h = conv(silu(norm(x))) + W temb; h = conv(dropout(silu(norm(h)))); return skip(x) + h."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions: x + proj(softmax(q k^T / sqrt(d)) v)."""

    def __init__(self, channels: int, groups: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # each (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class CrossAttnBlock(nn.Module):
    """Cross-attention from the H*W positions to the L text tokens: x + proj(softmax(q k^T / sqrt(d)) v),
    q = W_q norm(x), k = W_k text, v = W_v text. No padding mask: every one of the L positions is attended, as in
    Stable Diffusion (the padded tokens' states carry the prompt too, through causal attention)."""

    def __init__(self, channels: int, text_dim: int, groups: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1, bias=False)
        self.k = nn.Linear(text_dim, channels, bias=False)
        self.v = nn.Linear(text_dim, channels, bias=False)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads, d = self.num_heads, c // self.num_heads
        q = self.q(self.norm(x)).reshape(b, heads, d, h * w).transpose(-1, -2)  # (B, heads, HW, d)
        k = self.k(text).reshape(b, -1, heads, d).transpose(1, 2)  # (B, heads, L, d)
        v = self.v(text).reshape(b, -1, heads, d).transpose(1, 2)  # (B, heads, L, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta: (x_t (B, C, H, W), t (B,) int64[, cond]) -> (B, C, H, W); cond a ``Condition`` or (B,) labels."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch, groups = cfg.base_channels, cfg.num_groups
        temb_dim = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        # num_classes + 1 rows: the last one is the learned null class for classifier-free guidance.
        self.class_emb = nn.Embedding(cfg.num_classes + 1, temb_dim) if cfg.num_classes > 0 else None
        # the text encoder's pooled output (B, D) -> (B, 4ch), added to the time embedding
        self.pooled_proj = nn.Linear(cfg.text_dim, temb_dim) if cfg.text_dim > 0 else None
        # unCLIP's decoder: sqrt(E) z (B, E) -> (B, 4ch) into the time embedding, and -> image_tokens context tokens
        self.image_proj = nn.Linear(cfg.image_dim, temb_dim) if cfg.image_dim > 0 else None
        self.image_tokens = (nn.Linear(cfg.image_dim, cfg.image_tokens * cfg.context_dim) if cfg.image_dim > 0
                             else None)
        patch_channels = cfg.in_channels * cfg.patch_size ** 2
        self.conv_in = nn.Conv2d(patch_channels, ch, 3, padding=1)

        # Down path: remember every output's channel count for the skip connections.
        self.down = nn.ModuleList()
        skip_channels = [ch]
        in_ch, res = ch, cfg.grid_size
        for level, mult in enumerate(cfg.channel_mults):
            out_ch = ch * mult
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(in_ch, out_ch, temb_dim, cfg.dropout, groups)]
                if res in cfg.attention_resolutions:
                    layers += self._attention(out_ch)
                self.down.append(nn.ModuleList(layers))
                skip_channels.append(out_ch)
                in_ch = out_ch
            if level != len(cfg.channel_mults) - 1:
                self.down.append(nn.ModuleList([Downsample(in_ch)]))
                skip_channels.append(in_ch)
                res //= 2

        self.mid = nn.ModuleList([
            ResBlock(in_ch, in_ch, temb_dim, cfg.dropout, groups),
            *self._attention(in_ch),
            ResBlock(in_ch, in_ch, temb_dim, cfg.dropout, groups),
        ])

        # Up path: num_res_blocks + 1 blocks per level, each consuming one skip connection.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            out_ch = ch * mult
            for _ in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(in_ch + skip_channels.pop(), out_ch, temb_dim, cfg.dropout, groups)]
                if res in cfg.attention_resolutions:
                    layers += self._attention(out_ch)
                self.up.append(nn.ModuleList(layers))
                in_ch = out_ch
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(in_ch)]))
                res *= 2

        self.norm_out = _norm(in_ch, groups)
        self.conv_out = nn.Conv2d(in_ch, patch_channels, 3, padding=1)
        if cfg.zero_init:
            # Ho et al.'s diffusion_tf (init_scale=0.) and ADM (zero_module): each residual block and attention block
            # starts as the identity and the network's output as 0, so early training shapes a shallow network.
            last_layers = [m.conv2 for m in self.modules() if isinstance(m, ResBlock)]
            last_layers += [m.proj for m in self.modules() if isinstance(m, (AttnBlock, CrossAttnBlock))]
            for layer in last_layers + [self.conv_out]:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def _attention(self, channels: int) -> list[nn.Module]:
        """The attention blocks at an attention resolution: self-attention, then cross-attention to the context
        (the text's tokens and the image embedding's)."""
        cfg = self.config
        blocks = [AttnBlock(channels, cfg.num_groups, cfg.num_heads)]
        if cfg.context_dim > 0:
            blocks.append(CrossAttnBlock(channels, cfg.context_dim, cfg.num_groups, cfg.num_heads))
        return blocks

    @staticmethod
    def _run(layers: nn.ModuleList, h: torch.Tensor, temb: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(h, temb)
            elif isinstance(layer, CrossAttnBlock):
                h = layer(h, text)
            else:
                h = layer(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                cond: Condition | torch.Tensor | None = None) -> torch.Tensor:
        cond = as_condition(cond)
        y = None if cond is None else cond.labels  # (B,) int64 or None
        temb = self.temb(timestep_embedding(t, self.config.base_channels).to(x.dtype))  # (B, 4ch)
        if self.class_emb is not None:
            null = self.config.num_classes
            y = torch.full_like(t, null) if y is None else torch.where(y < 0, torch.full_like(y, null), y)
            temb = temb + self.class_emb(y)
        elif y is not None and bool((y >= 0).any()):
            raise ValueError("this model is unconditional: class labels must be None or -1")
        text = None
        if self.pooled_proj is not None:
            if cond is None or cond.text is None:
                raise ValueError("this model is text-conditioned: pass a Condition with text "
                                 "(ddpm.conditioning.encode_prompts; the empty prompt for unconditional rows)")
            text = cond.text.to(x.dtype)  # (B, L, D)
            temb = temb + self.pooled_proj(cond.pooled.to(x.dtype))  # (B, 4ch)
        elif cond is not None and cond.text is not None:
            raise ValueError("this model takes no text (it has no cross-attention): leave the prompt out")
        if self.image_proj is not None:
            if cond is None or cond.image is None:
                raise ValueError("this model is conditioned on a CLIP image embedding: pass a Condition with image "
                                 "(ddpm.conditioning.with_image; zeros for unconditional rows)")
            e = self.config.image_dim
            z = cond.image.to(x.dtype) * math.sqrt(e)  # (B, E), entries of about unit variance
            temb = temb + self.image_proj(z)
            tokens = self.image_tokens(z).reshape(z.shape[0], self.config.image_tokens, -1)  # (B, k, context_dim)
            text = tokens if text is None else torch.cat([text, tokens], dim=1)  # (B, L + k, D)
        elif cond is not None and cond.image is not None:
            raise ValueError("this model takes no image embedding: leave the image out")

        p = self.config.patch_size
        h = self.conv_in(F.pixel_unshuffle(x, p) if p > 1 else x)  # (B, C p^2, H/p, W/p) -> (B, ch, H/p, W/p)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, temb, text)
            skips.append(h)
        h = self._run(self.mid, h, temb, text)
        for layers in self.up:
            if isinstance(layers[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(layers, h, temb, text)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, p) if p > 1 else out  # (B, C, H, W)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
