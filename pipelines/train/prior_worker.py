"""``ddpm train-prior``'s part of the worker loop (:mod:`pipelines.train.loop`, which takes the rows, runs the DDP
steps, logs and checkpoints): unCLIP's prior (``ddpm.prior.DiffusionPrior``) on a frozen CLIP's embeddings, and on
rank 0 the held-out evaluation. The driver (:mod:`pipelines.train.prior`) hands the loop a :class:`PriorTask`.

A training row is an image and the index of its caption among the dataset's distinct captions (as for CLIP). Each
worker loads the frozen CLIP once and encodes the distinct captions once (token states and pooled state, what the
prior reads, and the empty caption's, which caption dropout trains); a step encodes its images with the CLIP's
image tower, z = unit-norm (B, E), and takes the loss of ``ddpm.diffusion_loss`` on ``sqrt(E) z``, predicting x_0.

The held-out evaluation (rank 0) samples one embedding per held-out caption (DDIM ``train.eval_steps``, fixed seeds)
and reports its cosine similarity to the true image embedding, against unCLIP's baseline, the caption's own CLIP
text embedding used as the image embedding; and how often each finds its own image among the held-out ones (top-1).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch
import torch.nn.functional as F

from ddpm import clip, diffusion_loss, from_uint8
from ddpm import prior as prior_format
from ddpm.conditioning import Condition
from ddpm.generation import sample_embeddings
from ddpm.prior import DiffusionPrior, PriorConfig, embedding_scale
from ddpm.schedule import NoiseSchedule
from ddpm.training import drop_condition
from pipelines.train.checkpoints import MODEL_DIR, TrainingState, read_training_state, write_training_state
from pipelines.train.loop import LoopTask

EVAL_BATCH = 256  # held-out images or captions per forward pass
CLIP_DIR = "clip"  # the CLIP the prior was trained on, pinned inside the model folder (ddpm.clip.save's layout)


@torch.no_grad()
def caption_states(net: clip.Clip, ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states (U, L, D) and pooled states (U, D), float32 on ``device``, of the captions' ids (U, L)."""
    states, pooled = zip(*(net.text_states(ids[i:i + EVAL_BATCH].to(device)) for i in range(0, len(ids), EVAL_BATCH)))
    return torch.cat(states).float(), torch.cat(pooled).float()


def caption_conditions(net: clip.Clip, ids: torch.Tensor, device) -> tuple:
    """(token states (U, L, D), pooled (U, D), the empty caption's (states (1, L, D), pooled (1, D))) for the
    captions' ids (U + 1, L) whose last row is the empty caption: what :func:`conditions` picks rows from."""
    states, pooled = caption_states(net, ids, device)
    return states[:-1], pooled[:-1], (states[-1:], pooled[-1:])


@torch.no_grad()
def image_embeddings(net: clip.Clip, images: np.ndarray, device) -> torch.Tensor:
    """Unit-norm CLIP image embeddings (N, E), float32, of (N, H, W, C) uint8 images."""
    return torch.cat([net.encode_image(from_uint8(images[i:i + EVAL_BATCH]).to(device)).float()
                      for i in range(0, len(images), EVAL_BATCH)])


def conditions(states: torch.Tensor, pooled: torch.Tensor, empty: tuple[torch.Tensor, torch.Tensor],
               index: torch.Tensor) -> Condition:
    """The captions ``index`` (B,) as a text Condition whose negative is the empty caption."""
    n = len(index)
    negative = Condition(text=empty[0].expand(n, -1, -1), pooled=empty[1].expand(n, -1))
    return Condition(text=states[index], pooled=pooled[index], negative=negative)


@dataclass
class PriorTask(LoopTask):
    """The prior's part of :func:`pipelines.train.loop.train_loop_worker`."""

    prior_config: dict  # ddpm.prior.PriorConfig.to_dict(): the CLIP's embedding and text widths
    schedule: dict  # NoiseSchedule.to_config()
    clip_files: object  # put_payload(the CLIP folder's files): every worker loads the same frozen CLIP
    clip_source: dict  # {uri, name, version}: where the CLIP came from (the checkpoint and the version's tags)
    caption_ids: object  # ObjectRef of (U + 1, L) int64: the distinct captions' token ids, the empty caption last
    held_out: object  # ObjectRef of {"images": (N, H, W, C) uint8, "caption_index": (N,) int64 into the distinct
    #                   captions, "caption_ids": (N, L) int64}
    caption_dropout: float = 0.1
    eval_steps: int = 20
    eval_guidance_scale: float = 1.0
    clip_net: clip.Clip | None = field(default=None, repr=False)  # after start
    states: tuple | None = field(default=None, repr=False)  # caption_conditions(...), after start
    noise: NoiseSchedule | None = field(default=None, repr=False)  # the schedule, after start
    held: dict | None = field(default=None, repr=False)  # rank 0, after start

    def build(self, config) -> DiffusionPrior:
        return DiffusionPrior(PriorConfig.from_dict(self.prior_config))

    def restore(self, net: DiffusionPrior, folder: Path):
        state, optimizer, rng = read_training_state(folder)
        net.load_state_dict(prior_format.load(folder / MODEL_DIR).model.state_dict())
        return state, optimizer, rng

    def probe(self, net: DiffusionPrior, device, dtype) -> None:
        cfg = net.config
        c = Condition(text=torch.zeros(2, 2, cfg.text_dim, device=device), pooled=torch.zeros(2, cfg.text_dim,
                                                                                              device=device))
        with (torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()):
            out = net(torch.zeros(2, cfg.embed_dim, device=device), torch.zeros(2, dtype=torch.long, device=device),
                      c)
        out.float().sum().backward()

    def start(self, *, rank: int, rows, device) -> None:
        from pipelines.actors import get_payload, unpacked

        with unpacked(get_payload(self.clip_files), prefix="ddpm-clip-") as folder:
            self.clip_net = clip.load(folder, device=device).model.requires_grad_(False)
        self.states = caption_conditions(self.clip_net, torch.as_tensor(ray.get(self.caption_ids)), device)
        self.noise = NoiseSchedule.from_config(self.schedule)
        if rank == 0:
            self.held = ray.get(self.held_out)

    def loss(self, model, images, labels, *, rows, n, world, device, autocast):
        """L_simple on sqrt(E) z, predicting x_0, with caption dropout; logs this rank's mean."""
        z = image_embeddings(self.clip_net, images, device)  # (used, E), frozen CLIP
        states, pooled, empty = self.states
        condition = drop_condition(conditions(states, pooled, empty, torch.as_tensor(labels, device=device)),
                                   self.caption_dropout)
        with autocast():
            loss = diffusion_loss(model, self.noise, embedding_scale(z.shape[1]) * z, condition=condition,
                                  prediction_type="sample")
        return loss, {"loss": loss.item()}

    def evaluate(self, net: DiffusionPrior, device, logger, *, seen: int, step: int) -> dict[str, float]:
        return evaluate(net, self.noise, self.clip_net, self.states, self.held, device, steps=self.eval_steps,
                        guidance_scale=self.eval_guidance_scale)

    def write(self, folder: Path, *, state: TrainingState, net: DiffusionPrior, optimizer, rng_states: dict) -> None:
        """model/ (``ddpm.prior.save``, with the CLIP it was trained on in model/clip/), then the training state."""
        from pipelines.actors import get_payload

        model_dir = folder / MODEL_DIR
        prior_format.save(model_dir, net, self.noise,
                          metadata={"clip": dict(self.clip_source, folder=CLIP_DIR), "images_seen": state.images_seen,
                                    "step": state.step, "mlflow_run_id": state.mlflow_run_id})
        for name, data in get_payload(self.clip_files).items():
            target = model_dir / CLIP_DIR / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        write_training_state(folder, state=state, optimizer=optimizer, rng_states=rng_states)


@torch.no_grad()
def evaluate(net: DiffusionPrior, schedule: NoiseSchedule, clip_net: clip.Clip, states: tuple, held: dict, device, *,
             steps: int, guidance_scale: float) -> dict[str, float]:
    """The module docstring's held-out figures: ``prior_cosine`` (sampled vs true image embedding, mean),
    ``text_cosine`` (the caption's CLIP text embedding vs the true image embedding, unCLIP's baseline), and the
    top-1 rate at which each finds its own image among the held-out ones (``prior_top1``, ``text_top1``)."""
    was_training = net.training
    net.eval()
    try:
        index = torch.as_tensor(held["caption_index"], device=device)  # (N,)
        truth = image_embeddings(clip_net, held["images"], device)  # (N, E)
        condition = conditions(*states, index)
        sampled = sample_embeddings(net, schedule, condition, list(range(len(index))), steps=steps,
                                    guidance_scale=guidance_scale).float()  # (N, E), seeds 0..N-1
        ids = held["caption_ids"]
        text = torch.cat([clip_net.encode_text(torch.as_tensor(ids[i:i + EVAL_BATCH]).to(device)).float()
                          for i in range(0, len(ids), EVAL_BATCH)])  # (N, E)
    finally:
        net.train(was_training)
    captions = [str(i) for i in held["caption_index"].tolist()]  # the same caption: the same right answers
    prior_top1 = clip.retrieval_topk(truth, sampled, captions, k=(1,))["top1"]
    text_top1 = clip.retrieval_topk(truth, text, captions, k=(1,))["top1"]
    return {"prior_cosine": F.cosine_similarity(sampled, truth).mean().item(),
            "text_cosine": F.cosine_similarity(F.normalize(text, dim=1), truth).mean().item(),
            "prior_top1": prior_top1, "text_top1": text_top1}
