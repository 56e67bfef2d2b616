"""``ddpm train-clip``'s part of the worker loop (:mod:`pipelines.train.loop`, which takes the rows, runs the DDP
steps, logs and checkpoints): the CLIP (``ddpm.clip.Clip``), its contrastive loss over the global batch, and on
rank 0 the held-out retrieval. The driver (:mod:`pipelines.train.clip`) hands the loop a :class:`ClipTask`.

A training row's ``label`` is the index of its caption among the dataset's distinct captions, whose token ids
(U, L) the driver tokenized once with the learned tokenizer. The loss of a step with n images over W workers::

    S_r  = sum over rank r's rows of CLIP's symmetric cross-entropy, columns the step's n pairs (ddpm.clip
           gathers every rank's embeddings, and their gradients back)
    loss_r = S_r / n,  gradient all-reduce weight 1:  sum_r d loss_r = d (sum_r S_r / n), the global mean's

exact for unequal shares (a rank's rows are also the other ranks' negatives, so weighting each rank's mean by its
share, as the other loops do, would not be).
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch

from ddpm import clip, from_uint8
from ddpm.clip import Clip, ClipConfig
from ddpm.text import ClipTokenizer, load_tokenizer
from pipelines.train.checkpoints import MODEL_DIR, TrainingState, read_training_state, write_training_state
from pipelines.train.loop import LoopTask

EVAL_BATCH = 256  # held-out images or captions per forward pass


def tokenizer_files(tokenizer: ClipTokenizer) -> dict[str, str]:
    """The tokenizer's files (vocab.json, merges.txt, tokenizer_config.json: JSON and text) as name -> text."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save(folder)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(folder).iterdir()}


def tokenizer_from_files(files: dict[str, str]) -> ClipTokenizer:
    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            (Path(folder) / name).write_text(text, encoding="utf-8")
        return load_tokenizer(folder)


@torch.no_grad()
def retrieval(net: Clip, tokenizer: ClipTokenizer, images: np.ndarray, captions: list[str], one_object: np.ndarray,
              device) -> dict[str, float]:
    """Text -> image top-1 and top-5 (:func:`ddpm.clip.retrieval_topk`) among the held-out images (E, H, W, C)
    uint8 with their captions; the same among the held-out one-object scenes (``one_object`` (E,) bool) when there
    are any."""
    image_emb = torch.cat([net.encode_image(from_uint8(images[i:i + EVAL_BATCH]).to(device)).float().cpu()
                           for i in range(0, len(images), EVAL_BATCH)])  # (E, embed_dim)
    ids = tokenizer.tokenize(captions)  # (E, L)
    text_emb = torch.cat([net.encode_text(ids[i:i + EVAL_BATCH].to(device)).float().cpu()
                          for i in range(0, len(ids), EVAL_BATCH)])  # (E, embed_dim)
    scores = {f"retrieval_{k}": v for k, v in clip.retrieval_topk(image_emb, text_emb, captions).items()}
    mask = torch.as_tensor(np.asarray(one_object, dtype=bool))
    if mask.any():
        chosen = [c for c, keep in zip(captions, mask.tolist()) if keep]
        scores.update({f"retrieval_{k}_one_object": v for k, v in
                       clip.retrieval_topk(image_emb[mask], text_emb[mask], chosen).items()})
    return scores


@dataclass
class ClipTask(LoopTask):
    """CLIP's part of :func:`pipelines.train.loop.train_loop_worker`."""

    clip_config: dict  # ddpm.clip.ClipConfig.to_dict(), with the tokenizer's vocabulary and ids
    tokenizer: dict[str, str]  # tokenizer_files(the learned tokenizer)
    caption_ids: object  # ObjectRef of (U, L) int64: the token ids of the dataset's distinct captions
    held_out: object  # ObjectRef of {"images": (E, H, W, C) uint8, "captions": [str], "one_object": (E,) bool}
    ids: torch.Tensor | None = field(default=None, repr=False)  # after start
    held: dict | None = field(default=None, repr=False)  # rank 0, after start

    def _tokenizer(self) -> ClipTokenizer:
        return tokenizer_from_files(self.tokenizer)

    def build(self, config) -> Clip:
        return Clip(ClipConfig.from_dict(self.clip_config))

    def restore(self, net: Clip, folder: Path):
        state, optimizer, rng = read_training_state(folder)
        net.load_state_dict(clip.load(folder / MODEL_DIR).model.state_dict())
        return state, optimizer, rng

    def probe(self, net: Clip, device, dtype) -> None:
        cfg = net.config
        x = torch.zeros(2, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)  # (B, C, H, W)
        ids = torch.full((2, cfg.context_length), cfg.pad_token_id, device=device)  # (B, L): BOS EOS pad ...
        ids[:, 0], ids[:, 1] = cfg.bos_token_id, cfg.eos_token_id
        with (torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()):
            image_emb, text_emb, scale = net(x, ids)
        (image_emb.float().sum() + text_emb.float().sum() + scale.float()).backward()

    def start(self, *, rank: int, rows, device) -> None:
        self.ids = torch.as_tensor(ray.get(self.caption_ids))
        if rank == 0:
            self.held = ray.get(self.held_out)

    def loss(self, model, images, labels, *, rows, n, world, device, autocast):
        """The module docstring's loss_r; logs this rank's mean per pair and the logit scale exp(t)."""
        x = from_uint8(images).to(device)  # (used, C, H, W) in [-1, 1]
        ids = self.ids[torch.as_tensor(labels)].to(device)  # (used, L)
        with autocast():
            image_emb, text_emb, scale = model(x, ids)  # (used, E) x 2, ()
        pair_sum = clip.contrastive_loss(image_emb[:rows].float(), text_emb[:rows].float(), scale.float(),
                                         reduction="sum")
        return pair_sum / n, {"loss": pair_sum.item() / max(rows, 1), "logit_scale": scale.item()}

    def gradient_weight(self, rows: int, n: int, world: int) -> float:
        return 1.0  # loss_r is already this rank's part of the global mean

    def evaluate(self, net: Clip, device, logger, *, seen: int, step: int) -> dict[str, float]:
        held = self.held
        return retrieval(net, self._tokenizer(), held["images"], held["captions"], held["one_object"], device)

    def write(self, folder: Path, *, state: TrainingState, net: Clip, optimizer, rng_states: dict) -> None:
        """model/ (``ddpm.clip.save``: clip/, text_encoder/, tokenizer/), then the training state."""
        clip.save(folder / MODEL_DIR, net, self._tokenizer(),
                  metadata={"images_seen": state.images_seen, "step": state.step,
                            "mlflow_run_id": state.mlflow_run_id})
        write_training_state(folder, state=state, optimizer=optimizer, rng_states=rng_states)

