"""``ddpm data shapes``: synthetic scenes of coloured shapes with captions, so that alignment can be scored exactly.

A scene is a black canvas with one or two flat shapes:

- colours red, green, blue, yellow, magenta, cyan (pure hues, each channel jittered by at most ``JITTER`` levels);
- shapes circle, square, triangle (pointing up), inscribed in a square box;
- sizes small and large: the box's side is drawn from ``SIZES`` x the canvas side (8-10 and 14-18 px at 32x32).

Scene i is a one-object scene for even i and a two-object scene for odd i (half and half, exactly, for any count)::

    a {size} {colour} {shape}                                   position random, not named
    a {colour} {shape} {left of|right of|above|below} a {colour} {shape}

In a two-object scene the two objects have different colours (so each object is one colour's pixels), their boxes
are ``GAP`` pixels apart or more along the relation's axis (so they never overlap), and their centres are offset
along the other axis by at most half their offset along the relation's axis (so the relation is the one a reader of
centroids sees, not a diagonal that could also be read as another). Sizes are drawn as in one-object scenes (and
drawn again until both fit side by side); the caption does not name them.

Three colour-shape pairs are never drawn: ``HELD_OUT`` (red triangle, blue circle, yellow square), the compositions
evaluation prompts for and training never sees. The output follows the img2dataset / WebDataset convention, a
caption ``NAME.txt`` (UTF-8, no trailing newline) beside each image ``NAME.png``, one folder per subject (the first
named object's colour-shape pair, 15 classes), and ``shapes.json`` at the root, written last::

    OUTPUT/red-square/0000.png  OUTPUT/red-square/0000.txt  ...  OUTPUT/shapes.json

Scene i draws from its own generator seeded with ``(seed, i)``: a seed gives the same files on every run, and the
first N scenes of a larger count are the N scenes of a smaller one. :func:`scene` is the ground truth (objects and
boxes) for evaluation and tests, :func:`parse_caption` inverts the caption grammar.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipelines import storage
from pipelines.data.digits import write_images
from pipelines.errors import UserError

# colour -> which RGB channels are on (255) and off (0)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
# size -> the box's side as a fraction of the canvas side, (smallest, largest): 8-10 and 14-18 px at 32x32
SIZES: dict[str, tuple[float, float]] = {"small": (0.25, 0.31), "large": (0.44, 0.56)}
RELATIONS = ("left of", "right of", "above", "below")
HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT)  # the 15 pairs that are drawn

JITTER = 24  # an "on" channel is 255 - U{0..JITTER}, an "off" one U{0..JITTER}: still unmistakably its hue
GAP = 2  # pixels between the two boxes along the relation's axis, at least
MIN_SIZE, MAX_SIZE = 24, 512  # below 24 px a small circle (6 px) is no longer told from a square
MANIFEST = "shapes.json"
CHUNK = 256  # scenes held in memory at once: the writer streams, whatever the count
_WRITERS = 16  # caption PUTs in flight: an object store answers each after a round trip

_ONE = re.compile(f"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})")
_TWO = re.compile(f"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) ({'|'.join(RELATIONS)}) "
                  f"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})")


@dataclass(frozen=True)
class Thing:
    """One drawn object: its words, its box (left, top, right, bottom) in pixels, right and bottom exclusive, and
    its jittered colour."""

    colour: str
    shape: str
    size: str
    box: tuple[int, int, int, int]
    rgb: tuple[int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        left, top, right, bottom = self.box
        return (left + right) / 2, (top + bottom) / 2


@dataclass(frozen=True)
class Scene:
    """A canvas side, one or two objects and, for two, the first one's relation to the second."""

    size: int
    things: tuple[Thing, ...]
    relation: str | None = None

    @property
    def caption(self) -> str:
        a = self.things[0]
        if self.relation is None:
            return f"a {a.size} {a.colour} {a.shape}"
        b = self.things[1]
        return f"a {a.colour} {a.shape} {self.relation} a {b.colour} {b.shape}"

    @property
    def label(self) -> str:
        """The folder: the subject's colour-shape pair (``red-square``)."""
        return f"{self.things[0].colour}-{self.things[0].shape}"


def parse_caption(text: str) -> dict:
    """A caption -> ``{"objects": [{"colour", "shape", "size"}, ...], "relation": str | None}``.

    The exact inverse of :attr:`Scene.caption`'s grammar (``size`` is None in two-object captions, which do not
    name it); anything else, extra spaces and capitals included, raises ValueError. Held-out pairs parse: evaluation
    prompts for them.
    """
    if isinstance(text, str) and (m := _ONE.fullmatch(text)):
        size, colour, shape = m.groups()
        return {"objects": [{"colour": colour, "shape": shape, "size": size}], "relation": None}
    if isinstance(text, str) and (m := _TWO.fullmatch(text)):
        c1, s1, relation, c2, s2 = m.groups()
        return {"objects": [{"colour": c1, "shape": s1, "size": None}, {"colour": c2, "shape": s2, "size": None}],
                "relation": relation}
    raise ValueError(f"not a shapes caption: {text!r}")


def side_range(size_name: str, size: int) -> tuple[int, int]:
    """The box sides (smallest, largest) in pixels of a ``size_name`` object on a ``size`` x ``size`` canvas."""
    low, high = SIZES[size_name]
    return round(low * size), round(high * size)


def mask(thing: Thing, size: int) -> np.ndarray:
    """The pixels (size, size) bool whose centres lie inside the shape; the shape is inscribed in its box."""
    left, top, right, bottom = thing.box
    y, x = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    inside_box = (x >= left) & (x <= right) & (y >= top) & (y <= bottom)
    cx, cy = thing.centre
    half = (right - left) / 2
    if thing.shape == "square":
        return inside_box
    if thing.shape == "circle":  # (x - cx)^2 + (y - cy)^2 <= r^2
        return (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    # triangle: apex (cx, top), base from (left, bottom) to (right, bottom); its half-width grows linearly downwards
    return inside_box & (np.abs(x - cx) <= (y - top) / (bottom - top) * half)


def render(scene: Scene) -> np.ndarray:
    """The scene's image (size, size, 3) uint8: black, each object filled flat with its colour, no antialiasing
    (every pixel is the background's or one object's)."""
    image = np.zeros((scene.size, scene.size, 3), np.uint8)
    for thing in scene.things:
        image[mask(thing, scene.size)] = thing.rgb
    return image


def _thing(rng: np.random.Generator, pair: tuple[str, str], size_name: str, side: int,
           left: int, top: int) -> Thing:
    on = np.array(COLOURS[pair[0]]) > 0
    jitter = rng.integers(0, JITTER + 1, size=3)
    rgb = np.where(on, 255 - jitter, jitter)
    return Thing(pair[0], pair[1], size_name, (left, top, left + side, top + side), tuple(int(v) for v in rgb))


def _draw_size(rng: np.random.Generator, size: int) -> tuple[str, int]:
    size_name = tuple(SIZES)[rng.integers(len(SIZES))]
    low, high = side_range(size_name, size)
    return size_name, int(rng.integers(low, high + 1))


def scene(seed: int, i: int, size: int = 32) -> Scene:
    """Scene number ``i`` for ``seed`` on a ``size`` x ``size`` canvas: one object for even i, two for odd i."""
    rng = np.random.default_rng([seed, i])  # scene i's own draws: independent of the count and of the others
    first = PAIRS[rng.integers(len(PAIRS))]
    if i % 2 == 0:
        size_name, side = _draw_size(rng, size)
        left, top = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        return Scene(size, (_thing(rng, first, size_name, side, left, top),))

    others = [p for p in PAIRS if p[0] != first[0]]
    second = others[rng.integers(len(others))]
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    while True:  # sizes that fit side by side with the gap; two large ones fit only at their smallest
        (n1, s1), (n2, s2) = _draw_size(rng, size), _draw_size(rng, size)
        if s1 + GAP + s2 <= size:
            break
    # Along the relation's axis: the free pixels split into before / between / after at two uniform cut points,
    # so the lower object starts at a and the higher one at s_low + GAP + b (a <= b).
    first_is_lower = relation in ("left of", "above")
    s_low, s_high = (s1, s2) if first_is_lower else (s2, s1)
    a, b = sorted(int(v) for v in rng.integers(0, size - s1 - GAP - s2 + 1, size=2))
    low, high = a, s_low + GAP + b
    main1, main2 = (low, high) if first_is_lower else (high, low)
    # Across it: uniform positions, drawn again until the centres' offset is at most half the offset along it
    offset = abs((main1 + s1 / 2) - (main2 + s2 / 2))
    while True:
        across1, across2 = int(rng.integers(0, size - s1 + 1)), int(rng.integers(0, size - s2 + 1))
        if abs((across1 + s1 / 2) - (across2 + s2 / 2)) <= offset / 2:
            break
    horizontal = relation in ("left of", "right of")
    (x1, y1), (x2, y2) = ((main1, across1), (main2, across2)) if horizontal else ((across1, main1), (across2, main2))
    return Scene(size, (_thing(rng, first, n1, s1, x1, y1), _thing(rng, second, n2, s2, x2, y2)), relation)


def manifest(*, count: int, size: int, seed: int, fmt: str) -> dict:
    """What ``shapes.json`` holds: the generator's parameters, the vocabulary, the grammar and the held-out pairs."""
    return {
        "dataset": "shapes",
        "format_version": 1,
        "parameters": {"count": count, "size": size, "seed": seed, "format": fmt},
        "layout": f"<colour>-<shape>/<index>.{fmt} (the subject's pair), its caption in <colour>-<shape>/<index>.txt",
        "scenes": {"one_object": (count + 1) // 2, "two_objects": count // 2, "rule": "even index: one object"},
        "grammar": {"one_object": "a {size} {colour} {shape}",
                    "two_objects": "a {colour} {shape} {relation} a {colour} {shape}"},
        "vocabulary": {
            "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
            "shapes": list(SHAPES),
            "sizes": {name: list(side_range(name, size)) for name in SIZES},
            "relations": list(RELATIONS),
        },
        "held_out": [{"colour": c, "shape": s} for c, s in HELD_OUT],
        "classes": sorted(f"{c}-{s}" for c, s in PAIRS),
        "colour_jitter": JITTER,
        "min_gap_px": GAP,
    }


def write_shapes(output_uri: str, *, count: int = 10_000, size: int = 32, seed: int = 0, fmt: str = "png",
                 endpoint_url: str | None = None) -> dict:
    """Write ``count`` scenes under ``output_uri``, each image with its caption beside it, then ``shapes.json``;
    returns the manifest."""
    if count < 1:
        raise UserError(f"--count must be at least 1, got {count}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"--size must be between {MIN_SIZE} and {MAX_SIZE} pixels for shapes, got {size}")
    if not 0 <= seed < 2**63:
        raise UserError(f"--seed must be between 0 and 2^63 - 1, got {seed}")
    with ThreadPoolExecutor(_WRITERS) as pool:
        for start in range(0, count, CHUNK):
            scenes = [scene(seed, i, size) for i in range(start, min(start + CHUNK, count))]
            images = np.stack([render(s) for s in scenes])
            keys = write_images(output_uri, images, [s.label for s in scenes], fmt=fmt, first_index=start,
                                endpoint_url=endpoint_url)
            captions = [(storage.join(output_uri, key.rsplit(".", 1)[0] + ".txt"), s.caption.encode("utf-8"))
                        for key, s in zip(keys, scenes)]
            list(pool.map(lambda kv: storage.write_bytes(*kv, endpoint_url), captions))
    result = manifest(count=count, size=size, seed=seed, fmt=fmt)
    storage.write_json(storage.join(output_uri, MANIFEST), result, endpoint_url)  # last: the commit point
    return result
