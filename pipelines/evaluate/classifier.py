"""The FD-cls feature extractor: a small CNN classifier trained on the labelled dataset itself.

Why not Inception-v3 for every dataset: FID's features come from ImageNet photographs at 299x299. For 16x16
grey digits they measure mostly how the images were upscaled, and the weights are a separate 100 MB download. A
classifier trained on the dataset's own labels has features that encode what distinguishes its classes (stroke
shape, for digits), so the Fréchet distance in them (FD-cls, the "FD in a domain classifier's features" of the
diffusion literature on small datasets) responds to what a viewer sees. Its numbers only compare models evaluated
with the same classifier on the same data, which is why every FD-cls is reported next to its real-versus-real floor
(see :mod:`pipelines.evaluate.quality`).

The data is split once, by a seeded permutation, into a *train* half (the classifier learns from it; the evaluation
takes its reference images from it) and a *held-out* half (the classifier's accuracy is measured on it; the
evaluation's floor compares it with the train half). Past ``RECIPE["max_images"]`` rows a half is subsampled (seeded)
for training and scoring, so the classifier needs a bounded part of a large dataset in memory; it reads those rows
from an array or a shard at a time (:class:`pipelines.evaluate.real.RealData`), with the same result. The trained network is cached per dataset fingerprint and
recipe as ``<DDPM_HOME>/classifiers/<fingerprint>-<recipe>.safetensors`` with a ``.json`` beside it: plain tensors
and JSON, nothing unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.errors import UserError

# Everything that changes the trained network; its hash is part of the cache key, so a new recipe never reuses an
# old file. Digits reach about 98% held-out accuracy with it in well under a minute of CPU.
RECIPE = {
    "version": 2,
    "widths": [16, 32, 64],   # channels of the three conv stages (2x2 max-pool after the first two)
    "feature_dim": 64,        # the penultimate layer: the features FD-cls is computed in
    "max_side": 32,           # larger images are 2x2-average-pooled down to this side first
    "steps": 600,
    "max_epochs": 100,        # fewer steps on a small train half: past ~100 passes it is memorised (a toy dataset)
    "batch_size": 128,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "max_shift": 0.125,       # random translations of up to this fraction of the side (augmentation)
    "held_out": 0.5,          # fraction of the data the classifier never trains on
    "max_images": 20_000,     # at most this many train-half images to learn from (and held-out ones to score), a
                              # seeded random subset: the driver holds only these, however large the dataset
    "seed": 0,
}


class FeatureNet(nn.Module):
    """conv stages -> global average pool -> Linear + ReLU (the features) -> Linear (the class logits).

    Global average pooling makes the network work at any resolution; the same recipe serves 16x16 digits and
    32x32 photographs. Images with a side above ``max_side`` are halved by 2x2 average pooling until they fit: the
    classes of this project's data (which digit, which photograph) show at 32x32, and the convolutions' cost grows with
    the pixels (benchmarks/RESULTS.md, "Latent diffusion": the 64x64 photos' evaluation).
    """

    def __init__(self, in_channels: int, num_classes: int, widths=(16, 32, 64), feature_dim: int = 64,
                 max_side: int = 32):
        super().__init__()
        w1, w2, w3 = widths
        self.max_side = max_side
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, w1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w1, w2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w2, w3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w3, w3, 3, padding=1), nn.ReLU(),
        )
        self.embed = nn.Linear(w3, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, feature_dim), the penultimate activations."""
        while max(x.shape[-2:]) > self.max_side:
            x = F.avg_pool2d(x, 2)
        return F.relu(self.embed(self.conv(x).mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class Classifier:
    """A trained :class:`FeatureNet` with the split it was trained on and its held-out accuracy."""

    net: FeatureNet
    train_index: np.ndarray     # (N_train,) rows of the dataset the classifier learned from
    held_out_index: np.ndarray  # (N_held_out,) rows it never saw
    accuracy: float             # on the held-out rows
    fingerprint: str            # of the dataset (images and labels)

    @property
    def key(self) -> str:
        """Names this extractor: same key, same features (dataset fingerprint + recipe hash)."""
        return f"{self.fingerprint[:32]}-{recipe_hash()}"

    def features(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """(N, H, W, C) uint8 -> (N, feature_dim) float64."""
        return net_features(self.net, images, batch_size)

    def weights_sha256(self) -> str:
        """sha256 of the tensors by name: same value, same features (whatever file they were read from)."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.net.state_dict().items()):
            h.update(name.encode() + b"\0" + tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def to_bytes(self) -> bytes:
        """The network as safetensors bytes (weights, and its shape in the metadata): what Ray actors load it from,
        and, hashed, the extractor's identity in a statistics cache key."""
        from safetensors.torch import save

        meta = {"in_channels": str(self.net.conv[0].in_channels), "num_classes": str(self.net.head.out_features)}
        return save({k: v.contiguous() for k, v in self.net.state_dict().items()}, metadata=meta)


def net_from_bytes(data: bytes) -> FeatureNet:
    """:meth:`Classifier.to_bytes` back into an eval-mode :class:`FeatureNet` (plain tensors, nothing unpickled)."""
    from safetensors.torch import load

    header_size = int.from_bytes(data[:8], "little")  # safetensors: u64 header length, then the JSON header
    meta = json.loads(data[8:8 + header_size])["__metadata__"]
    net = FeatureNet(int(meta["in_channels"]), int(meta["num_classes"]), RECIPE["widths"], RECIPE["feature_dim"],
                     RECIPE["max_side"])
    net.load_state_dict(load(data))
    return net.eval()


@torch.no_grad()
def net_features(net: FeatureNet, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, feature_dim) float64, on the network's device."""
    net.eval()
    device = next(net.parameters()).device
    out = [net.features(_to_tensor(images[i:i + batch_size]).to(device)).cpu()
           for i in range(0, len(images), batch_size)]
    if not out:
        return np.zeros((0, net.embed.out_features))
    return torch.cat(out).double().numpy()


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:8]


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the pixels, their shape and the labels: two datasets share a classifier only if all three match."""
    return fingerprint_parts(images.shape, [images], labels)


def fingerprint_parts(shape: tuple, parts, labels: np.ndarray) -> str:
    """:func:`fingerprint` of the images that ``parts`` yields in row order (e.g. one shard at a time), whose
    concatenation has ``shape``: the same hash without the whole dataset in memory."""
    h = hashlib.sha256(json.dumps([list(shape), str(np.dtype(np.uint8))]).encode())
    for part in parts:
        h.update(np.ascontiguousarray(part, dtype=np.uint8))  # hashed in place through the buffer protocol, no copy
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def split(num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows): a seeded permutation cut at ``RECIPE["held_out"]``, the same on every machine."""
    order = np.random.default_rng(RECIPE["seed"]).permutation(num_images)
    cut = num_images - int(round(num_images * RECIPE["held_out"]))
    return np.sort(order[:cut]), np.sort(order[cut:])


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 in [-1, 1], the scale the generator works in."""
    from ddpm import from_uint8

    return from_uint8(images)


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of (B, C, H, W) by up to ``max_shift`` pixels, filling with the border's values."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def subset(rows: np.ndarray) -> np.ndarray:
    """At most ``RECIPE["max_images"]`` of ``rows``: a seeded random choice, sorted (all of them when fewer)."""
    if len(rows) <= RECIPE["max_images"]:
        return rows
    return np.sort(np.random.default_rng(RECIPE["seed"]).choice(rows, RECIPE["max_images"], replace=False))


def training_steps(recipe: dict, num_images: int) -> int:
    """A recipe's optimizer steps on ``num_images`` training images: ``recipe["steps"]``, or fewer when that would
    pass over the images more than ``recipe["max_epochs"]`` times (at least one step)."""
    return max(1, min(recipe["steps"], math.ceil(recipe["max_epochs"] * num_images / recipe["batch_size"])))


def _fit(take, labels: np.ndarray, image_shape: tuple, log) -> tuple[FeatureNet, float]:
    """Train a :class:`FeatureNet` on (a subset of) the train split; ``take(rows)`` -> (len(rows), H, W, C) uint8
    images of those rows, ``labels`` (N,) int64 for every row.

    AdamW with cosine decay and random translations for :func:`training_steps` steps; deterministic for a given
    dataset (its own seeded generators; the global RNG is left untouched). Returns (net, held-out accuracy).
    """
    if (labels < 0).any():
        raise UserError("FD-cls needs a label for every image (some are -1, unlabelled): put each class in its "
                        "own folder and preprocess with --labels-from-dirs")
    num_classes = int(labels.max()) + 1
    if num_classes < 2:
        raise UserError("FD-cls needs at least two classes to train its feature extractor")
    train_rows, held_rows = (subset(rows) for rows in split(len(labels)))
    x = take(train_rows)  # (N_train, H, W, C) uint8: converted a batch at a time
    y = torch.from_numpy(labels[train_rows])
    g = torch.Generator().manual_seed(RECIPE["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RECIPE["seed"])
        net = FeatureNet(image_shape[-1], num_classes, RECIPE["widths"], RECIPE["feature_dim"], RECIPE["max_side"])
    optimizer = torch.optim.AdamW(net.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    steps = training_steps(RECIPE, len(train_rows))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    max_shift = int(round(RECIPE["max_shift"] * image_shape[0]))
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (RECIPE["batch_size"],), generator=g)
        loss = F.cross_entropy(net(_random_shift(_to_tensor(x[idx.numpy()]), max_shift, g)), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval()
    del x
    held = take(held_rows)
    with torch.no_grad():
        predicted = np.concatenate([net(_to_tensor(held[i:i + 512])).argmax(dim=1).numpy()
                                    for i in range(0, len(held), 512)])
    accuracy = float((predicted == labels[held_rows]).mean())
    log(f"[classifier] trained on {len(train_rows)} images, {num_classes} classes: "
        f"held-out accuracy {accuracy:.3f} on {len(held_rows)} images")
    return net, accuracy


def cache_dir() -> Path:
    from pipelines.tracking import home

    return home() / "classifiers"


def load_or_train(images: np.ndarray, labels: np.ndarray, *, directory: Path | None = None,
                  log=print) -> Classifier:
    """The classifier for this dataset (in memory) from the cache, or trained now and written to it."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return _load_or_fit(fingerprint(images, labels), labels, tuple(images.shape[1:]), lambda rows: images[rows],
                        directory, log)


def load_or_train_streamed(real, *, directory: Path | None = None, log=print) -> Classifier:
    """The same classifier for a :class:`pipelines.evaluate.real.RealData`, read a shard at a time: the same
    fingerprint, split and training rows, so either path reads the other's cache."""
    return _load_or_fit(real.fingerprint(), real.labels, tuple(real.image_shape), real.take, directory, log)


def _load_or_fit(fp: str, labels: np.ndarray, image_shape: tuple, take, directory: Path | None, log) -> Classifier:
    """The cache file names the dataset fingerprint and the recipe hash; the JSON beside the weights holds the
    architecture and the held-out accuracy. Files are written under a temporary name and renamed, JSON last, so a
    reader never sees half a classifier.
    """
    from safetensors.torch import load_file, save_file

    directory = directory or cache_dir()
    stem = directory / f"{fp[:32]}-{recipe_hash()}"
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    train_rows, held_rows = split(len(labels))
    if meta.is_file() and weights.is_file():
        info = json.loads(meta.read_text())
        net = FeatureNet(info["in_channels"], info["num_classes"], RECIPE["widths"], RECIPE["feature_dim"],
                         RECIPE["max_side"])
        net.load_state_dict(load_file(str(weights)))
        log(f"[classifier] cached {stem.name} (held-out accuracy {info['accuracy']:.3f})")
        return Classifier(net.eval(), train_rows, held_rows, info["accuracy"], fp)

    net, accuracy = _fit(take, labels, image_shape, log)
    directory.mkdir(parents=True, exist_ok=True)
    info = {"recipe": RECIPE, "fingerprint": fp, "accuracy": accuracy, "in_channels": int(image_shape[-1]),
            "num_classes": net.head.out_features, "image_shape": list(image_shape),
            "train_images": len(subset(train_rows)), "held_out_images": len(subset(held_rows))}
    _atomic_write(weights, lambda p: save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(p)))
    _atomic_write(meta, lambda p: p.write_text(json.dumps(info, indent=2, sort_keys=True)))
    return Classifier(net, train_rows, held_rows, accuracy, fp)


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
