"""Alignment: does an image show what its prompt says? A reader trained on the real captioned shapes data reads each
image's colours, shapes, size and relation, and the share of images whose reading matches their prompt is scored.

The reader (:class:`ReaderNet`) is a small CNN without global pooling before its heads: the features are flattened
with their positions, because a relation ("left of") is about where things are. Its heads, on a caption's words::

    count     one / two objects                      every image
    colour    first object's colour (6)              every image
    shape     first object's shape (3)               every image
    size      small / large                          one-object scenes only (two-object captions do not name it)
    relation  left of / right of / above / below     two-object scenes only
    colour2   second object's colour (6)             two-object scenes only
    shape2    second object's shape (3)              two-object scenes only

    loss = sum over heads of the mean cross-entropy over the rows where that head applies (masked CE)

It learns from the train half of the classifier's split (:func:`pipelines.evaluate.classifier.split`) and is scored
on the held-out half (accuracy per head), and on *held-out compositions*: scenes whose objects include a colour-shape
pair the dataset never draws (``pipelines.data.shapes.HELD_OUT``), rendered here with the data's own drawing code and
resized as ``ddpm preprocess`` resizes. Separate colour and shape heads have each seen every colour and every shape,
so they should read "a blue circle" without ever having seen one. The trained network is cached beside the FD-cls
classifier (``<DDPM_HOME>/classifiers/``), keyed by the dataset's fingerprint, its captions and this recipe:
safetensors + JSON, nothing unpickled.

The evaluation prompts (:func:`evaluation_prompts`) are fixed by the grammar; :func:`score` turns the reader's output
for (image, prompt) pairs into alignment: per attribute and all at once, separately for seen and held-out prompts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.data.shapes import COLOURS, HELD_OUT, PAIRS, RELATIONS, SHAPES, SIZES, Scene, Thing, parse_caption
from pipelines.errors import UserError

# Everything that changes the trained reader; its hash is part of the cache key.
RECIPE = {
    "version": 2,
    "widths": [8, 16, 32],    # the form trunk's conv stages, 2x2 max-pool after the first two: a (H/4, W/4) grid
    "hidden": 128,            # the flattened grid -> this many features -> the heads
    "steps": 300,             # with lr 5e-3: 2e-3 needed twice the steps for the same accuracy (measured)
    "max_epochs": 100,        # fewer steps on a small train half (classifier.training_steps)
    "batch_size": 128,
    "lr": 5e-3,
    "weight_decay": 1e-4,
    "max_images": 20_000,     # train-half images learned from, and held-out ones scored, at most (seeded subset)
    "held_out_scenes": 240,   # rendered scenes of held-out compositions, half one-object, half two-object
    "seed": 0,
}

COUNTS = ("one", "two")
AXES = ("horizontal", "vertical")  # left of / right of, above / below
# head -> its classes, in output order
HEADS: dict[str, tuple[str, ...]] = {"count": COUNTS, "colour": tuple(COLOURS), "shape": SHAPES,
                                     "size": tuple(SIZES), "axis": AXES, "colour2": tuple(COLOURS),
                                     "shape2": SHAPES}
ATTRIBUTES = ("count", "colour", "shape", "size", "relation")  # what alignment scores, besides "all"
IMAGES_PER_PROMPT = 8
TWO_OBJECT_SEEN, TWO_OBJECT_HELD_OUT = 12, 6  # the fixed sample of two-object prompts


# ---------------------------------------------------------------------------------------------------------------
# Captions <-> what the heads read


def canonical(caption: str) -> dict[str, str | None]:
    """A caption -> head -> word (None where the caption says nothing for that head).

    An image does not say which of two objects a caption names first ("a red circle left of a green square" is
    "a green square right of a red circle"), so a two-object scene is read in one canonical order: the axis of
    the relation, then the left (or top) object as colour/shape and the right (or bottom) one as colour2/shape2.
    """
    parsed = parse_caption(caption)
    first = parsed["objects"][0]
    if parsed["relation"] is None:
        return {"count": "one", "colour": first["colour"], "shape": first["shape"], "size": first["size"],
                "axis": None, "colour2": None, "shape2": None}
    a, b = parsed["objects"]
    if parsed["relation"] in ("right of", "below"):  # the first named object is the right (bottom) one
        a, b = b, a
    axis = "horizontal" if parsed["relation"] in ("left of", "right of") else "vertical"
    return {"count": "two", "colour": a["colour"], "shape": a["shape"], "size": None, "axis": axis,
            "colour2": b["colour"], "shape2": b["shape"]}


def targets(captions: Sequence[str]) -> np.ndarray:
    """(N, len(HEADS)) int64: each head's class for each caption (:func:`canonical`), -1 where the head does not
    apply or the caption is not in the grammar (an empty caption, a user's own words)."""
    out = np.full((len(captions), len(HEADS)), -1, np.int64)
    for i, caption in enumerate(captions):
        try:
            words = canonical(caption)
        except ValueError:
            continue
        for h, name in enumerate(HEADS):
            if words[name] is not None:
                out[i, h] = HEADS[name].index(words[name])
    return out


def is_held_out(prompt: str) -> bool:
    """Whether any object of ``prompt`` is a held-out colour-shape pair."""
    return any((o["colour"], o["shape"]) in HELD_OUT for o in parse_caption(prompt)["objects"])


# ---------------------------------------------------------------------------------------------------------------
# The network


COLOUR_HEADS = ("colour", "colour2")  # the heads that see colour; the others see a colour-blind image
COLOUR_GRID = 8  # the colour trunk's grid side


def _trunk(in_channels: int, widths: Sequence[int], side: int, hidden: int) -> nn.Sequential:
    """conv-ReLU-pool, conv-ReLU-pool, conv-ReLU, then the (side/4, side/4) grid flattened with its positions and
    a hidden layer: (B, in_channels, side, side) -> (B, hidden)."""
    w1, w2, w3 = widths
    grid = side // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, w1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w1, w2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w2, w3, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(w3 * grid * grid, hidden), nn.ReLU(),
    )


class ReaderNet(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> {head: (B, classes) logits}. Two trunks of conv stages whose (H/4, W/4) grid is
    flattened with its positions (no global pooling: relations need where things are):

    - the form trunk sees a colour-blind image, max over channels (every hue is one channel or two at full value,
      so each object is equally bright); count, shape, size, axis and shape2 read from it, so a shape head cannot
      learn that red is never a triangle in the data, and reads the held-out pairs' shapes like any other;
    - the colour trunk sees the image averaged down to an (8, 8) grid (the objects are flat colour on black, so an
      average keeps each object's hue): a 1x1 and a 3x3 convolution, flattened with its positions, a hidden layer;
      colour and colour2 read from it.
    """

    def __init__(self, side: int, widths=(8, 16, 32), hidden: int = 128):
        super().__init__()
        self.side = side
        self.form = _trunk(1, widths, side, hidden)
        self.colour = nn.Sequential(nn.AvgPool2d(side // COLOUR_GRID),  # (B, 3, 8, 8)
                                    nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                                    nn.Flatten(), nn.Linear(16 * COLOUR_GRID**2, hidden // 2), nn.ReLU())
        self.heads = nn.ModuleDict({
            name: nn.Linear(hidden // 2 if name in COLOUR_HEADS else hidden, len(classes))
            for name, classes in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        form = self.form(x.amax(dim=1, keepdim=True))  # (B, hidden) from (B, 1, H, W)
        colour = self.colour((x + 1) / 2)  # (B, hidden / 2) from [0, 1], where black is 0
        return {name: head(colour if name in COLOUR_HEADS else form) for name, head in self.heads.items()}


def masked_loss(logits: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """sum over heads of mean CE over the rows where the head applies (y[:, h] >= 0); y (B, len(HEADS))."""
    total = logits["count"].new_zeros(())
    for h, name in enumerate(HEADS):
        rows = y[:, h] >= 0
        if rows.any():
            total = total + F.cross_entropy(logits[name][rows], y[rows, h])
    return total


@dataclass
class Reader:
    """A trained :class:`ReaderNet` and its measured accuracies (per head, and ``all``: every applicable head right),
    on the real held-out half and on rendered held-out compositions."""

    net: ReaderNet
    key: str
    accuracy: dict = field(default_factory=dict)           # head -> accuracy on the real held-out half
    held_out_accuracy: dict = field(default_factory=dict)  # head -> accuracy on rendered held-out compositions

    @torch.no_grad()
    def read(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, len(HEADS)) int64, each head's predicted class."""
        from ddpm import from_uint8

        self.net.eval()
        out = [torch.stack([v.argmax(1) for v in self.net(from_uint8(images[i:i + batch_size])).values()], 1)
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, len(HEADS)), np.int64)

    def words(self, images: np.ndarray) -> list[dict[str, str]]:
        """(N, H, W, 3) uint8 -> per image, head -> the word read."""
        return [{name: HEADS[name][c] for name, c in zip(HEADS, row)} for row in self.read(images)]


def accuracies(predicted: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Per head: the share of rows where it applies that it reads right; ``all``: rows with every applicable head
    right (rows with no target are left out)."""
    applies = y >= 0
    right = (predicted == y) | ~applies
    out = {name: float(right[applies[:, h], h].mean()) for h, name in enumerate(HEADS) if applies[:, h].any()}
    labelled = applies.any(1)
    out["all"] = float(right[labelled].all(1).mean()) if labelled.any() else float("nan")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Held-out compositions, rendered


def held_out_scenes(count: int, size: int, seed: int = RECIPE["seed"]) -> list[Scene]:
    """``count`` scenes (even i: one object, odd i: two) whose first object is a held-out pair: the data's scene i
    (positions, sizes, relation, second object) with its first object repainted to HELD_OUT[i mod 3], or the next
    held-out pair whose colour differs from the second object's (two objects never share a colour)."""
    from pipelines.data.shapes import scene

    scenes = []
    for i in range(count):
        base = scene(seed, i, size)
        others = {t.colour for t in base.things[1:]}
        colour, shape = next(p for k in range(len(HELD_OUT)) if (p := HELD_OUT[(i + k) % len(HELD_OUT)])[0]
                             not in others)
        first = base.things[0]
        jitter = np.random.default_rng([seed, i, 1]).integers(0, 25, size=3)  # as the data: within JITTER levels
        rgb = tuple(int(v) for v in np.where(np.array(COLOURS[colour]) > 0, 255 - jitter, jitter))
        scenes.append(Scene(size, (Thing(colour, shape, first.size, first.box, rgb), *base.things[1:]),
                            base.relation))
    return scenes


def rendered(scenes: Sequence[Scene], side: int) -> np.ndarray:
    """(N, side, side, 3) uint8: each scene rendered, PNG-encoded and read back the way ``ddpm preprocess`` reads an
    image (centre crop, LANCZOS resize to ``side``)."""
    from ddpm import encode_png
    from pipelines.data.preprocess import prepare_image
    from pipelines.data.shapes import render

    return np.stack([prepare_image(encode_png(render(s)), side, 3) for s in scenes]) if scenes else \
        np.zeros((0, side, side, 3), np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Training and the cache


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:8]


def reader_key(fingerprint: str, captions: Sequence[str]) -> str:
    """The cache key: the dataset (pixels and labels: the FD-cls classifier's fingerprint), its captions, the recipe."""
    h = hashlib.sha256(fingerprint.encode())
    h.update(json.dumps(list(captions), ensure_ascii=False).encode())
    return f"{h.hexdigest()[:32]}-align-{recipe_hash()}"


def fit(take, captions: Sequence[str], side: int, log=print) -> tuple[ReaderNet, dict, dict]:
    """Train a :class:`ReaderNet` on the train half's parseable captions; ``take(rows)`` -> (len(rows), H, W, 3)
    uint8. AdamW with cosine decay, no augmentation (a shift could push an object off the canvas and break the
    relation); deterministic (its own seeded generators). Returns (net, held-out accuracy, held-out-composition
    accuracy)."""
    from ddpm import from_uint8
    from pipelines.evaluate.classifier import split, subset, training_steps

    y_all = targets(captions)
    train_rows, held_rows = (subset(rows) for rows in split(len(captions)))
    train_rows = train_rows[(y_all[train_rows] >= 0).any(1)]
    if len(train_rows) < 2:
        raise UserError("alignment needs captions in the shapes grammar (ddpm data shapes, preprocessed with "
                        "--captions); this dataset's train half has none")
    x, y = take(train_rows), torch.from_numpy(y_all[train_rows])
    g = torch.Generator().manual_seed(RECIPE["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RECIPE["seed"])
        net = ReaderNet(side, RECIPE["widths"], RECIPE["hidden"])
    optimizer = torch.optim.AdamW(net.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    steps = training_steps(RECIPE, len(train_rows))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (RECIPE["batch_size"],), generator=g)
        loss = masked_loss(net(from_uint8(x[idx.numpy()])), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval()
    del x
    reader = Reader(net, "")
    accuracy = accuracies(reader.read(take(held_rows)), y_all[held_rows])
    scenes = held_out_scenes(RECIPE["held_out_scenes"], max(side, 32))
    held_out_accuracy = accuracies(reader.read(rendered(scenes, side)), targets([s.caption for s in scenes]))
    log(f"[alignment] reader trained on {len(train_rows)} captioned images; held-out accuracy "
        + " ".join(f"{k} {v:.3f}" for k, v in accuracy.items())
        + "; held-out compositions " + " ".join(f"{k} {v:.3f}" for k, v in held_out_accuracy.items()))
    return net, accuracy, held_out_accuracy


def load_or_train(real, captions: Sequence[str], fingerprint: str, *, directory: Path | None = None,
                  log=print) -> Reader:
    """The reader for this dataset from the cache, or trained now and written to it. ``real``: a
    :class:`pipelines.evaluate.real.RealData` (``take``, ``image_shape``); ``captions`` row-aligned with it;
    ``fingerprint``: the FD-cls classifier's (pixels and labels)."""
    from safetensors.torch import load_file, save_file

    from pipelines.evaluate.classifier import _atomic_write, cache_dir

    h, w, c = real.image_shape
    if c != 3 or h != w or h % 8:
        raise UserError(f"alignment reads RGB square images with a side divisible by 8 (shapes scenes); this data "
                        f"holds {h}x{w}x{c}")
    if len(captions) != len(real):
        raise ValueError(f"{len(captions)} captions for {len(real)} images")
    key = reader_key(fingerprint, captions)
    directory = directory or cache_dir()
    weights, meta = directory / f"{key}.safetensors", directory / f"{key}.json"
    if meta.is_file() and weights.is_file():
        info = json.loads(meta.read_text())
        net = ReaderNet(info["side"], RECIPE["widths"], RECIPE["hidden"])
        net.load_state_dict(load_file(str(weights)))
        log(f"[alignment] cached reader {key} (held-out accuracy all {info['accuracy']['all']:.3f}, held-out "
            f"compositions all {info['held_out_accuracy']['all']:.3f})")
        return Reader(net.eval(), key, info["accuracy"], info["held_out_accuracy"])
    net, accuracy, held_out_accuracy = fit(real.take, captions, h, log)
    directory.mkdir(parents=True, exist_ok=True)
    info = {"recipe": RECIPE, "fingerprint": fingerprint, "side": h, "heads": {k: list(v) for k, v in HEADS.items()},
            "accuracy": accuracy, "held_out_accuracy": held_out_accuracy}
    _atomic_write(weights, lambda p: save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(p)))
    _atomic_write(meta, lambda p: p.write_text(json.dumps(info, indent=2, sort_keys=True)))
    return Reader(net, key, accuracy, held_out_accuracy)


# ---------------------------------------------------------------------------------------------------------------
# The evaluation prompts and the score


def evaluation_prompts() -> list[str]:
    """The fixed prompts, in this order: seen one-object (each drawn pair x each size), held-out one-object (each
    HELD_OUT pair x each size), then a seeded sample of two-object prompts: ``TWO_OBJECT_SEEN`` of seen pairs only,
    ``TWO_OBJECT_HELD_OUT`` with a held-out pair among their objects (two objects never share a colour)."""
    one = [f"a {size} {c} {s}" for c, s in PAIRS for size in SIZES]
    held = [f"a {size} {c} {s}" for c, s in HELD_OUT for size in SIZES]
    every = list(PAIRS) + list(HELD_OUT)
    two = [f"a {c1} {s1} {r} a {c2} {s2}" for c1, s1 in every for r in RELATIONS for c2, s2 in every if c1 != c2]
    seen_two = [p for p in two if not is_held_out(p)]
    held_two = [p for p in two if is_held_out(p)]
    rng = np.random.default_rng(RECIPE["seed"])

    def sample(prompts: list[str], k: int) -> list[str]:  # k of them, in their listed order
        return [prompts[i] for i in sorted(rng.choice(len(prompts), k, replace=False))]

    return one + held + sample(seen_two, TWO_OBJECT_SEEN) + sample(held_two, TWO_OBJECT_HELD_OUT)


def matches(read: dict[str, str], prompt: str) -> dict[str, bool | None]:
    """Which attributes of ``prompt`` the reading (head -> word, :func:`canonical` order) matches; None where the
    prompt does not name the attribute.

    count; for one object: colour, shape, size. For two (the prompt taken to canonical order too): colour and shape
    as the pair of words, whichever side each is on; relation: the axis and which colour is on which side (with
    the wrong colours there is no right relation). all: every head the prompt names reads right, in canonical
    order, so a swapped binding (a red square and a green circle for "a red circle ... a green square") fails it.
    """
    want = canonical(prompt)
    if want["count"] == "one":
        out = {"count": read["count"] == "one", "colour": read["colour"] == want["colour"],
               "shape": read["shape"] == want["shape"], "size": read["size"] == want["size"], "relation": None}
    else:
        out = {"count": read["count"] == "two",
               "colour": sorted((read["colour"], read["colour2"])) == sorted((want["colour"], want["colour2"])),
               "shape": sorted((read["shape"], read["shape2"])) == sorted((want["shape"], want["shape2"])),
               "size": None,
               "relation": (read["axis"], read["colour"], read["colour2"]) ==
                           (want["axis"], want["colour"], want["colour2"])}
    out["all"] = all(read[name] == word for name, word in want.items() if word is not None)
    return out


def score(reader: Reader, images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
    """Alignment of ``images`` (N, H, W, 3) uint8 with their ``prompts`` (N, in the grammar): for each group (seen,
    held_out) and attribute (count, colour, shape, size, relation, all), the share of the group's images that name
    the attribute whose reading matches, as ``align_<group>_<attribute>``; groups or attributes with no image are
    left out."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    rows = [(is_held_out(p), matches(read, p)) for read, p in zip(reader.words(images), prompts)]
    out = {}
    for group, held in (("seen", False), ("held_out", True)):
        for attribute in (*ATTRIBUTES, "all"):
            hits = [m[attribute] for h, m in rows if h == held and m[attribute] is not None]
            if hits:
                out[f"align_{group}_{attribute}"] = float(np.mean(hits))
    return out
