"""Training on scikit-learn's digits in this process, with the core alone (no Ray, no MLflow): ``ddpm train-local``.

The smallest honest end-to-end run: real data, the real model, the real loop, a grid of samples at the end.
Useful as a smoke test of a machine and as the reference the Ray Train loop is benchmarked against
(``benchmarks/quality.py``). The command's flags live in ``pipelines/commands/train_local.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import UserError


@dataclass
class LocalRun:
    checkpoint: Path
    images_seen: int
    steps: int
    first_loss: float
    last_loss: float
    seconds: float


def digits_dataset(resolution: int = 16):
    """scikit-learn's 1,797 digits as (N, 1, R, R) float32 in [-1, 1] and (N,) int64 labels.

    The 8x8 originals hold levels 0..16; they are scaled to [0, 255], quantised to uint8 like every image the
    ingest stage writes, and resized with antialiasing.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    x = torch.from_numpy(images).float()[:, None] / 127.5 - 1  # (N, 1, 8, 8)
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1, 1), torch.from_numpy(digits.target).long()


def train_local(config, images, labels, *, out_dir: str | Path, class_names: list[str] | None = None,
                log=print) -> LocalRun:
    """Train ``config`` on ``images`` (N, C, H, W) in [-1, 1] until ``total_images`` or ``max_minutes`` run out.

    Saves the checkpoint (raw + EMA weights, ddpm.checkpoint format) to ``out_dir`` and returns a summary.
    """
    import torch

    from ddpm import EMA, UNet, checkpoint
    from ddpm.training import drop_labels, lr_at, random_flip, train_step

    tc = config.train
    if tc.text_encoder or config.model.text_dim or tc.image_encoder or config.model.image_dim:
        raise UserError("ddpm train-local trains no text or image-embedding models (the digits have no captions); "
                        "use ddpm train")
    if tc.class_conditional:
        config = config.with_num_classes(int(labels.max()) + 1)
    torch.manual_seed(tc.seed)
    model = UNet(config.model)
    schedule = config.schedule.build()
    ema = EMA(model, decay=tc.ema_decay, warmup=tc.ema_warmup)
    optimizer = tc.build_optimizer(model.parameters())
    total_steps = -(-tc.total_images // tc.batch_size)
    warmup_steps = tc.warmup_images // tc.batch_size
    g = torch.Generator().manual_seed(tc.seed)
    step_options = tc.step_options(images.device)

    start, step, seen, losses = time.monotonic(), 0, 0, []
    model.train()
    while not tc.finished(seen, time.monotonic() - start):
        n = min(tc.batch_size, tc.total_images - seen)
        idx = torch.randint(0, images.shape[0], (n,), generator=g)
        x0 = random_flip(images[idx], g) if tc.random_flip else images[idx]
        y = drop_labels(labels[idx], tc.label_dropout, g) if tc.class_conditional else None
        lr = lr_at(step, base_lr=tc.lr, warmup_steps=warmup_steps, total_steps=total_steps, decay=tc.lr_decay,
                   time_spent=tc.time_spent(time.monotonic() - start))
        loss, grad_norm = train_step(model, optimizer, schedule, x0, lr=lr, condition=y, **step_options)
        ema.update(model)
        losses.append(loss)
        step, seen = step + 1, seen + n
        if step % tc.log_every_steps == 0:
            elapsed = time.monotonic() - start
            log(f"step {step:6d}  images {seen:8d}  loss {sum(losses[-tc.log_every_steps:]) / tc.log_every_steps:.4f}"
                f"  lr {lr:.2e}  grad_norm {grad_norm:.3f}  {seen / elapsed:.0f} img/s")

    path = checkpoint.save(out_dir, model, schedule, ema_state=ema.state_dict(), prediction_type=tc.prediction_type,
                           class_names=class_names or [], metadata={"images_seen": seen, "steps": step})
    head, tail = losses[: min(20, len(losses))], losses[-min(20, len(losses)):]
    return LocalRun(path, seen, step, sum(head) / len(head), sum(tail) / len(tail), time.monotonic() - start)


def sample_grid(checkpoint_path, *, per_class: int = 10, steps: int = 50, seed: int = 0):
    """A (rows, cols, C) uint8 grid from the EMA weights with DDIM: one row per class (or 10 rows if unconditional)."""
    from ddpm import checkpoint
    from pipelines.train import samples

    loaded = checkpoint.load(checkpoint_path)
    return samples.sample_grid(loaded, rows=loaded.config.num_classes or 10, columns=per_class, steps=steps,
                               first_seed=seed)
