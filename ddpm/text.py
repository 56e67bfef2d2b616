"""The text encoder of text-conditioned diffusion: CLIP's tokenizer and text Transformer, in plain PyTorch.

Radford et al. 2021 (CLIP, section 2.4) and Stable Diffusion's conditioning, rebuilt so that a prompt becomes::

    tokens   normalise (NFC, runs of whitespace -> " ", lowercase) -> split into words, numbers and punctuation
             -> byte-level BPE with "</w>" closing each word -> [BOS] tokens [EOS], truncated to keep BOS ... EOS,
             padded with the pad token to the context length (77 for CLIP)                     (N, L) int64
    states   token + position embeddings -> layers of pre-norm causal self-attention and MLP (quick_gelu or gelu)
             -> final LayerNorm                                                                (N, L, width)
    pooled   the final state at the EOS token (transformers' rule, see ``TextTransformer.pool``)  (N, width)

The U-Net attends to ``states`` (cross-attention) and adds ``pooled`` to its time embedding.

The tokenizer is a ``tokenizers`` pipeline built from ``vocab.json`` + ``merges.txt`` exactly as transformers 5.x
builds ``CLIPTokenizer`` (``models/clip/tokenization_clip.py``), so its ids are transformers' ids: the core uses the
``tokenizers`` library (Rust, Hugging Face's, the one transformers itself runs) rather than a re-implementation of
BPE whose every corner (Unicode classes, byte-level mapping, added-token matching) would have to be kept equal by
hand. The Transformer's parameters carry transformers' ``CLIPTextModel`` names (``encoder.layers.0.self_attn.q_proj``
...), so a pretrained ``model.safetensors`` loads as it is (tests/ddpm/test_text.py checks both against transformers).

The folder format is Hugging Face's, as inside a Stable Diffusion folder (no pickle anywhere)::

    ROOT/
      text_encoder/  config.json (CLIPTextModel's)  model.safetensors
      tokenizer/     vocab.json  merges.txt  tokenizer_config.json  [special_tokens_map.json]

``load`` reads it from ROOT, from one folder holding all of those files, or from the two folders given apart.
``train_tokenizer`` learns a tokenizer from captions and ``save`` writes the same layout, so the platform's own CLIP
text tower loads through the same ``load``. A learned tokenizer is marked ``"ddpm_learned_from_captions": true`` in
tokenizer_config.json: its vocabulary is closed over the training captions, so a word that is not one token of it
was never seen and is reported (``TokenReport.unknown_words``). A pretrained BPE tokenizer spells any word from its
bytes, so it reports none.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .folder_format import CheckpointError, check_weights, read_config, read_weights, write_folder

ENCODER_DIR, TOKENIZER_DIR = "text_encoder", "tokenizer"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
# transformers' weight files, in the order they are tried (the fp16 variant is read and cast to float32)
WEIGHTS_FILES = (WEIGHTS_FILE, "model.fp16.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"
TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE = "tokenizer_config.json", "special_tokens_map.json"
LEARNED_FIELD = "ddpm_learned_from_captions"  # tokenizer_config.json: true for a tokenizer learned by train_tokenizer
BOS, EOS = "<|startoftext|>", "<|endoftext|>"  # CLIP's; the pad and unknown token default to EOS
CLIP_CONTEXT = 77
# transformers' CLIPTokenizer pre-tokenizer: special tokens, English contractions, letter runs, single digits,
# runs of other non-space characters (tokenization_clip.py)
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_ACTIVATIONS = ("quick_gelu", "gelu")
_ADDED_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


class TextEncoderError(CheckpointError):
    """A text encoder or tokenizer folder that is missing, pickled, foreign, or does not match its own config."""


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


@dataclass(frozen=True)
class TokenReport:
    """What tokenizing one prompt lost: ``dropped_tokens`` cut by truncation (past the context), and, for a learned
    tokenizer, ``unknown_words``: the words (as written in the prompt, in order, once each) that are not one token
    of its vocabulary, i.e. were never seen in the training captions."""

    dropped_tokens: int = 0
    unknown_words: tuple[str, ...] = field(default_factory=tuple)


class ClipTokenizer:
    """CLIP's byte-level BPE tokenizer; ``tokenize`` gives transformers' ``CLIPTokenizer`` ids with
    ``padding="max_length", max_length=context_length, truncation=True`` (what Stable Diffusion's pipelines call).

    vocab: token -> id; merges: BPE merges in rank order; context_length: L, the padded length (77 for CLIP);
    added_tokens: added-token definitions ({"content", "normalized", "lstrip", "rstrip", "single_word",
    "special"}: how such a token typed in a prompt is matched), applied after the four special tokens, a later
    definition of the same content replacing an earlier one (``load_tokenizer`` lists them as transformers does).
    """

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *, context_length: int = CLIP_CONTEXT,
                 bos_token: str = BOS, eos_token: str = EOS, pad_token: str = EOS, unk_token: str = EOS,
                 added_tokens: Sequence[dict] = (), learned: bool = False):
        from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE

        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (BOS and EOS), got {context_length}")
        missing = [t for t in dict.fromkeys((bos_token, eos_token, pad_token)) if t not in vocab]
        if missing:
            raise ValueError(f"special token {missing[0]!r} is not in the vocabulary")
        self.vocab, self.merges = dict(vocab), [tuple(m) for m in merges]
        self.context_length, self.learned = int(context_length), bool(learned)
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.added_tokens = [dict(t) for t in added_tokens]

        # The pipeline of transformers 5.x CLIPTokenizer.__init__, step for step.
        backend = Tokenizer(BPE(vocab=self.vocab, merges=self.merges, dropout=None, continuing_subword_prefix="",
                                end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk_token))
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        # transformers registers its special tokens, then the folder's added tokens, as added tokens: matched in
        # the raw text (in the normalised text where "normalized" is set) before BPE
        definitions = {t: {"content": t, "special": True} for t in (bos_token, eos_token, unk_token, pad_token)}
        definitions.update({t["content"]: t for t in self.added_tokens})
        for t in definitions.values():
            token = AddedToken(t["content"], **{k: bool(t[k]) for k in _ADDED_FLAGS if k in t})
            (backend.add_special_tokens if t.get("special") else backend.add_tokens)([token])
        self.bos_id, self.eos_id = backend.token_to_id(bos_token), backend.token_to_id(eos_token)
        self.pad_id = backend.token_to_id(pad_token)
        backend.post_processor = processors.RobertaProcessing((eos_token, self.eos_id), (bos_token, self.bos_id),
                                                              trim_offsets=False, add_prefix_space=False)
        self._backend = backend

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def _encode(self, prompts: Sequence[str]):
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings (one prompt is [prompt])")
        return self._backend.encode_batch(list(prompts), add_special_tokens=True)  # each: [BOS] ... [EOS]

    def _fit(self, ids: list[int]) -> list[int]:
        """[BOS] t_1 ... t_n [EOS] -> exactly L ids: keep BOS, the first L - 2 tokens and EOS (CLIP's truncation),
        then pad on the right."""
        L = self.context_length
        if len(ids) > L:
            ids = ids[:L - 1] + ids[-1:]
        return ids + [self.pad_id] * (L - len(ids))

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts (N strings) -> ids (N, L) int64; "" is [BOS, EOS, pad, ...]."""
        encodings = self._encode(prompts)
        return torch.tensor([self._fit(e.ids) for e in encodings], dtype=torch.long).reshape(len(encodings),
                                                                                          self.context_length)

    def report(self, prompts: Sequence[str]) -> list[TokenReport]:
        """One ``TokenReport`` per prompt: tokens truncation drops, and unknown words for a learned tokenizer."""
        reports = []
        for prompt, e in zip(prompts, self._encode(prompts)):
            dropped = max(len(e.ids) - self.context_length, 0)
            unknown: tuple[str, ...] = ()
            if self.learned:
                words: dict[int, list[tuple[int, int]]] = {}  # word index -> offsets of its tokens
                for w, span in zip(e.word_ids, e.offsets):
                    if w is not None:
                        words.setdefault(w, []).append(span)
                spelled = [prompt[spans[0][0]:spans[-1][1]] for spans in words.values() if len(spans) > 1]
                unknown = tuple(dict.fromkeys(spelled))
            reports.append(TokenReport(dropped, unknown))
        return reports

    def save(self, path: str | Path) -> Path:
        """Write vocab.json, merges.txt and tokenizer_config.json (transformers reads them as a CLIPTokenizer)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        vocab = dict(sorted(self.vocab.items(), key=lambda item: item[1]))  # by id: the same tokenizer, the same bytes
        (path / VOCAB_FILE).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (path / MERGES_FILE).write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges),
                                        encoding="utf-8")
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.context_length,
                  "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                  "unk_token": self.unk_token, LEARNED_FIELD: self.learned}
        if self.added_tokens:
            config["added_tokens_decoder"] = {str(self.vocab.get(t["content"], i)): t
                                              for i, t in enumerate(self.added_tokens, start=len(self.vocab))}
        (path / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        return path


def train_tokenizer(captions: Iterable[str], *, vocab_size: int = 4096, min_frequency: int = 1,
                    context_length: int = CLIP_CONTEXT) -> ClipTokenizer:
    """Learn a CLIP-style BPE tokenizer from training captions (``tokenizers``' BpeTrainer on CLIP's normaliser and
    pre-tokenizer).

    The vocabulary is laid out as CLIP's: the 256 byte symbols, the same with "</w>", one token per learned merge
    (in merge order), then BOS and EOS last, so that EOS has the highest id (transformers' legacy pooling rule
    picks the argmax id and then agrees). At most ``vocab_size`` tokens (at least 514: bytes, bytes + "</w>", BOS,
    EOS); a pair seen fewer than ``min_frequency`` times is not merged. With room enough, every caption word
    becomes one token, and a prompt word that is not one is reported as unknown.
    """
    from tokenizers import pre_tokenizers, trainers

    base = 2 * 256 + 2
    if vocab_size < base:
        raise ValueError(f"vocab_size must be at least {base} (bytes, bytes + '</w>', BOS, EOS), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # CLIP's byte order: bytes_to_unicode sorts this way
    empty = ClipTokenizer({BOS: 0, EOS: 1}, [], context_length=context_length)  # the pipeline, nothing learned
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[], initial_alphabet=alphabet, end_of_word_suffix="</w>")
    backend = empty._backend
    backend.train_from_iterator((c for c in captions if isinstance(c, str)), trainer)
    learned = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
               for m in json.loads(backend.to_str())["model"]["merges"]]

    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab[token] = len(vocab)
    merges = []
    for a, b in learned:
        if len(vocab) >= vocab_size - 2:
            break
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    return ClipTokenizer(vocab, merges, context_length=context_length, learned=True)


def _token(value) -> dict | None:
    """A special token as tokenizer_config.json or special_tokens_map.json writes it, "..." or {"content": "...",
    flags}, as an added-token definition."""
    if isinstance(value, str):
        return {"content": value, "special": True}
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return {"special": True, **{k: value[k] for k in ("content", *_ADDED_FLAGS) if k in value}}
    return None


def load_tokenizer(path: str | Path, *, context_length: int | None = None) -> ClipTokenizer:
    """Read a tokenizer folder: vocab.json + merges.txt, with tokenizer_config.json / special_tokens_map.json when
    present (special tokens, ``model_max_length``, ``ddpm_learned_from_captions``). ``context_length`` is used when
    the folder does not give ``model_max_length``."""
    from tokenizers.models import BPE

    path = Path(path)
    for name in (VOCAB_FILE, MERGES_FILE):
        if not (path / name).is_file():
            if (path / "tokenizer.json").is_file():
                raise TextEncoderError(f"{path}: no {name} (a tokenizer.json alone is not read; a CLIP tokenizer "
                                       f"folder has {VOCAB_FILE} and {MERGES_FILE})")
            raise TextEncoderError(f"{path}: no {name}; not a CLIP tokenizer folder")
    settings: dict = {}
    for name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE):  # the second overrides, as transformers 4.x did
        if (path / name).is_file():
            settings.update({k: v for k, v in _read_json(path / name).items() if v is not None})
    try:
        vocab, merges = BPE.read_file(str(path / VOCAB_FILE), str(path / MERGES_FILE))
    except Exception as exc:  # tokenizers raises a plain Exception for a malformed file
        raise TextEncoderError(f"{path}: unreadable {VOCAB_FILE} or {MERGES_FILE} ({exc})") from None
    max_length = settings.get("model_max_length")
    if isinstance(max_length, (int, float)) and not isinstance(max_length, bool) and 2 <= max_length < 1e6:
        context_length = int(max_length)  # transformers writes 1e30 for "no limit"
    tokens = {k: _token(settings.get(f"{k}_token")) for k in ("bos", "eos", "unk", "pad")}  # transformers' order
    decoder = settings.get("added_tokens_decoder") or {}
    if not (isinstance(decoder, dict) and all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                              for t in decoder.values())):
        raise TextEncoderError(f"{path / TOKENIZER_CONFIG_FILE}: added_tokens_decoder must map ids to "
                               '{"content": ...} objects')
    # the special tokens with their flags (a plain string has none: a later one replaces an earlier one's), then
    # added_tokens_decoder's, which transformers lets win
    added = [t for t in tokens.values() if t is not None]
    added += [{k: t[k] for k in ("content", *_ADDED_FLAGS) if k in t}
              for _, t in sorted(decoder.items(), key=lambda item: int(item[0]) if item[0].isdigit() else 0)]
    bos, eos = (tokens["bos"] or {}).get("content", BOS), (tokens["eos"] or {}).get("content", EOS)
    pad, unk = (tokens["pad"] or {}).get("content", eos), (tokens["unk"] or {}).get("content", eos)
    try:
        return ClipTokenizer(vocab, merges, context_length=context_length or CLIP_CONTEXT, bos_token=bos,
                             eos_token=eos, pad_token=pad, unk_token=unk,
                             added_tokens=added, learned=settings.get(LEARNED_FIELD) is True)
    except ValueError as exc:
        raise TextEncoderError(f"{path}: {exc}") from None


def _read_json(file: Path) -> dict:
    try:
        d = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TextEncoderError(f"{file}: invalid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise TextEncoderError(f"{file}: expected a JSON object")
    return d


# ---------------------------------------------------------------------------------------------------------------
# Transformer (transformers' CLIPTextModel names)


@dataclass(frozen=True)
class TextConfig:
    """CLIPTextConfig's fields and defaults (OpenAI's ViT-B text tower), under transformers' names so that
    config.json reads and writes as it is."""

    vocab_size: int = 49408
    hidden_size: int = 512  # the width of the token states
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = CLIP_CONTEXT
    hidden_act: str = "quick_gelu"  # x * sigmoid(1.702 x) (OpenAI's CLIP); "gelu" (OpenCLIP, SD 2)
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407  # 2 in configs older than transformers PR #24773: pooling then takes the argmax id
    pad_token_id: int = 1

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; choose from {list(_ACTIVATIONS)}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and math.isfinite(self.layer_norm_eps)
                and self.layer_norm_eps > 0):
            raise ValueError(f"layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")

    def to_hf_dict(self) -> dict:
        """config.json as transformers writes it for a CLIPTextModel."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **asdict(self)}

    @classmethod
    def from_hf_dict(cls, d: dict) -> "TextConfig":
        """A CLIPTextModel config.json -> TextConfig (CLIPTextConfig's defaults where a key is absent); keys that
        do not change the forward pass (dropout, init ranges, projection_dim, ...) are ignored."""
        architectures = d.get("architectures") or ["CLIPTextModel"]
        if d.get("model_type", "clip_text_model") != "clip_text_model" or architectures != ["CLIPTextModel"]:
            raise ValueError(f"model_type {d.get('model_type')!r} / architectures {architectures} is not a "
                             "CLIPTextModel (clip_text_model)")
        return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})


class Attention(nn.Module):
    """Multi-head causal self-attention: out_proj(softmax(q k^T / sqrt(d_head) + causal mask) v), per head."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        width = cfg.hidden_size
        self.k_proj, self.v_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.q_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, L, width = x.shape
        q, k, v = (proj(x).reshape(n, L, self.heads, -1).transpose(1, 2)  # each (N, heads, L, d_head)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # token i sees tokens 0..i
        return self.out_proj(out.transpose(1, 2).reshape(n, L, width))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = cfg.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)  # gelu: the exact (erf) form
        return self.fc2(h)


class EncoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[:ids.shape[1]]  # (N, L, width)


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TextTransformer(nn.Module):
    """CLIP's text tower: ids (N, L) -> (states (N, L, width), pooled (N, width)). Trainable as any module; the
    weights are initialised as transformers initialises CLIPTextModel (normal, std 0.02)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def pool(self, states: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The state at each sequence's EOS token, chosen as transformers 5.x does: with ``eos_token_id == 2`` (a
        config written before PR #24773) the position of the largest id, which is EOS in OpenAI's vocabulary; else
        the first position whose id is ``eos_token_id`` (the pad token may equal EOS, hence the first)."""
        if self.config.eos_token_id == 2:
            position = ids.argmax(dim=-1)
        else:
            position = (ids == self.config.eos_token_id).int().argmax(dim=-1)
        return states[torch.arange(states.shape[0], device=states.device), position]

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.ndim != 2 or ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"expected ids of shape (N, L <= {self.config.max_position_embeddings}), "
                             f"got {tuple(ids.shape)}")
        states = self.final_layer_norm(self.encoder(self.embeddings(ids)))  # (N, L, width)
        return states, self.pool(states, ids)


# ---------------------------------------------------------------------------------------------------------------
# The encoder: tokenizer + Transformer, and its folders


class TextEncoder:
    """A tokenizer and its Transformer, frozen: prompts -> (token states, pooled), deterministic, without grad.

    ``context_length`` (L) is the tokenizer's padded length, ``width`` the size of each token state.
    """

    def __init__(self, tokenizer: ClipTokenizer, model: TextTransformer, device: str | torch.device = "cpu"):
        if tokenizer.context_length > model.config.max_position_embeddings:
            raise ValueError(f"the tokenizer pads to {tokenizer.context_length} tokens but the text encoder has "
                             f"{model.config.max_position_embeddings} positions")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the text encoder embeds "
                             f"{model.config.vocab_size}")
        self.tokenizer = tokenizer
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts (N strings) -> ids (N, L) int64 on this encoder's device."""
        return self.tokenizer.tokenize(prompts).to(self.device)

    def report(self, prompts: Sequence[str]) -> list[TokenReport]:
        return self.tokenizer.report(prompts)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (N strings) -> (token states (N, L, width), pooled (N, width)) float32. Every prompt is padded
        to L and attends causally (no padding mask), as Stable Diffusion encodes, so a prompt's states do not
        depend on the rest of the batch."""
        return self.encode_ids(self.tokenize(prompts))

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (N, L) from ``tokenize`` -> (states (N, L, width), pooled (N, width)), without grad."""
        return self.model(ids.to(self.device))

    def to(self, device: str | torch.device) -> "TextEncoder":
        self.model.to(device)
        self.device = torch.device(device)
        return self


def save(path: str | Path, tokenizer: ClipTokenizer, model: TextTransformer | None = None) -> Path:
    """Write ``path/tokenizer/`` and, given a Transformer, ``path/text_encoder/`` (float32 safetensors and a
    CLIPTextModel config.json): a Stable Diffusion folder's text half, which ``load`` (and transformers) read."""
    path = Path(path)
    tokenizer.save(path / TOKENIZER_DIR)
    if model is not None:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
        write_folder(path / ENCODER_DIR, tensors, model.config.to_hf_dict())
    return path


def _folders(path: Path, tokenizer: str | Path | None) -> tuple[Path, Path]:
    """(text encoder folder, tokenizer folder) for the layouts ``load`` accepts."""
    if tokenizer is not None:
        return path, Path(tokenizer)
    if (path / ENCODER_DIR).is_dir() or (path / TOKENIZER_DIR).is_dir():  # a Stable Diffusion root, or save's
        for sub in (ENCODER_DIR, TOKENIZER_DIR):
            if not (path / sub).is_dir():
                raise TextEncoderError(f"{path}: no {sub}/ folder beside "
                                       f"{TOKENIZER_DIR if sub == ENCODER_DIR else ENCODER_DIR}/")
        return path / ENCODER_DIR, path / TOKENIZER_DIR
    if not path.is_dir():
        raise TextEncoderError(f"{path}: no such folder")
    if (path / VOCAB_FILE).is_file():  # one folder with everything (a Hugging Face CLIP repository)
        return path, path
    if (path.parent / TOKENIZER_DIR).is_dir():  # ROOT/text_encoder given: its tokenizer is the sibling
        return path, path.parent / TOKENIZER_DIR
    raise TextEncoderError(f"{path}: no {ENCODER_DIR}/ and {TOKENIZER_DIR}/ folders and no {VOCAB_FILE}; "
                           "not a CLIP text encoder folder")


def _weights_file(path: Path) -> Path:
    for name in WEIGHTS_FILES:
        if (path / name).is_file():
            return path / name
    pickles = sorted(p.name for p in path.glob("*") if p.suffix in PICKLE_SUFFIXES)
    hint = (f"; {', '.join(pickles)} is a pickle and is never loaded (convert it to safetensors first)"
            if pickles else "")
    raise TextEncoderError(f"{path}: no {WEIGHTS_FILE}{hint}")


def from_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel state dict -> this module's: 4.x saved under ``text_model.`` (Stable Diffusion's
    folders), 5.x without; the position_ids buffer some older files carry is dropped."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        if key != "embeddings.position_ids":
            out[key] = value
    return out


def load(path: str | Path, *, tokenizer: str | Path | None = None,
         device: str | torch.device = "cpu") -> TextEncoder:
    """Read a CLIP text encoder and its tokenizer into a ``TextEncoder`` in eval mode (float32).

    ``path``: a Stable Diffusion root (or ``save``'s folder) with ``text_encoder/`` and ``tokenizer/``; one folder
    holding config.json, model.safetensors, vocab.json and merges.txt; or the ``text_encoder/`` folder, with its
    tokenizer as the sibling ``tokenizer/`` or given as ``tokenizer=``. Only JSON, text and safetensors files are
    read; nothing is unpickled.
    """
    encoder_dir, tokenizer_dir = _folders(Path(path), tokenizer)
    config = read_config(encoder_dir, what="a CLIP text encoder folder", error=TextEncoderError)
    try:
        cfg = TextConfig.from_hf_dict(config)
    except (TypeError, ValueError) as exc:
        raise TextEncoderError(f"{encoder_dir / CONFIG_FILE}: not a CLIP text encoder this module can load "
                               f"({exc})") from None
    state = from_hf_state(read_weights(_weights_file(encoder_dir), error=TextEncoderError))
    model = TextTransformer(cfg)
    check_weights(state, model.state_dict(), encoder_dir, TextEncoderError)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    tok = load_tokenizer(tokenizer_dir, context_length=cfg.max_position_embeddings)
    try:
        return TextEncoder(tok, model, device)
    except ValueError as exc:
        raise TextEncoderError(f"{tokenizer_dir}: does not fit {encoder_dir} ({exc})") from None
