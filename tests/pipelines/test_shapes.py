"""``ddpm data shapes`` (pipelines/data/shapes.py): captioned scenes whose every caption is true in the pixels, the
same files for a seed, the held-out pairs never drawn, the caption grammar inverted exactly."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipelines import cli, storage
from pipelines.data.shapes import (COLOURS, HELD_OUT, JITTER, MANIFEST, PAIRS, RELATIONS, SHAPES, mask,
                                   parse_caption, render, scene, side_range)

# the channels that are on, as bits r*4 + g*2 + b -> colour name; all off is the black background (None)
_BY_BITS = {int(np.dot(np.array(rgb) > 0, [4, 2, 1])): name for name, rgb in COLOURS.items()} | {0: None}


def files(uri: str) -> dict[str, bytes]:
    return {e.key: storage.read_bytes(storage.join(uri, e.key)) for e in storage.list_files(uri)}


def write(out, *flags: str) -> dict[str, bytes]:
    assert cli.main(["data", "shapes", "--output", str(out), *flags]) == 0
    return files(str(out))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """40 scenes of 32x32 at seed 0 written twice, at seed 1, and 48 at the default seed: the files of each."""
    root = tmp_path_factory.mktemp("shapes")
    return (write(root / "a", "--count", "40", "--seed", "0"), write(root / "b", "--count", "40", "--seed", "0"),
            write(root / "c", "--count", "40", "--seed", "1"), write(root / "d", "--count", "48"))


def colour_masks(image: np.ndarray) -> dict[str | None, np.ndarray]:
    """(H, W, 3) uint8 -> colour name -> (H, W) bool of its pixels, read from the pixels alone (None: black)."""
    bits = (image > 127) @ np.array([4, 2, 1])  # (H, W)
    assert set(np.unique(bits).tolist()) <= set(_BY_BITS)  # no white, no pixel of an unknown hue
    return {_BY_BITS[int(v)]: bits == v for v in np.unique(bits)}


def read_shape(pixels: np.ndarray) -> tuple[str, int]:
    """An object's pixel mask -> (the shape it looks like, its width in pixels), from how it fills its extent."""
    ys, xs = np.nonzero(pixels)
    width = xs.max() - xs.min() + 1
    fill = pixels.sum() / width**2
    top, bottom = pixels[: (ys.min() + ys.max() + 1) // 2].sum(), pixels[(ys.min() + ys.max() + 1) // 2:].sum()
    if fill > 0.95:
        return "square", width
    if fill > 0.65 and abs(top - bottom) <= width:  # pi/4 = 0.79, symmetric top to bottom
        return "circle", width
    if fill < 0.6 and top < bottom:  # 1/2, wider at the base
        return "triangle", width
    return "unknown", width


def check_scene(image: np.ndarray, caption: str, truth) -> None:
    """The caption parses, names the drawn objects, and what it says is what the pixels show."""
    parsed = parse_caption(caption)
    assert [(o["colour"], o["shape"]) for o in parsed["objects"]] == [(t.colour, t.shape) for t in truth.things]
    assert parsed["relation"] == truth.relation
    masks = colour_masks(image)
    assert set(masks) == {None, *(t.colour for t in truth.things)}  # black, plus one colour per object
    drawn = [mask(t, truth.size) for t in truth.things]
    assert not (drawn[0] & drawn[-1]).any() or len(drawn) == 1  # no overlap
    for t, o, d in zip(truth.things, parsed["objects"], drawn):
        pixels = masks[t.colour]
        assert (pixels == d).all()  # the object's pixels are exactly its colour's, nothing hides part of it
        assert (image[pixels] >= 255 - JITTER)[:, np.array(COLOURS[t.colour]) > 0].all()
        assert (image[pixels] <= JITTER)[:, np.array(COLOURS[t.colour]) == 0].all()
        shape, width = read_shape(pixels)
        assert shape == t.shape
        if o["size"] is not None:
            low, high = side_range(o["size"], truth.size)
            assert low <= width <= high
    assert (image[masks[None]] == 0).all()
    if truth.relation is not None:
        (x1, y1), (x2, y2) = (np.argwhere(masks[t.colour]).mean(axis=0)[::-1] for t in truth.things)
        dx, dy = x2 - x1, y2 - y1  # centroids; image rows grow downwards
        main, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[
            truth.relation]
        assert main > 0 and abs(across) < main  # the stated relation, and the dominant one


def test_files_captions_and_manifest(scenes):
    a, *_ = scenes
    images = {k: v for k, v in a.items() if k.endswith(".png")}
    captions = {k: v for k, v in a.items() if k.endswith(".txt")}
    assert len(images) == len(captions) == 40 and set(a) == set(images) | set(captions) | {MANIFEST}
    assert {k[:-4] for k in images} == {k[:-4] for k in captions}  # NAME.txt beside each NAME.png
    for key, data in images.items():
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
        i = int(key.split("/")[1][:-4])
        truth = scene(0, i, 32)
        caption = captions[key[:-4] + ".txt"].decode("utf-8")
        assert key.split("/")[0] == f"{truth.things[0].colour}-{truth.things[0].shape}"  # the subject's folder
        assert caption == truth.caption and (np.asarray(image) == render(truth)).all()
        check_scene(np.asarray(image), caption, truth)
    assert sum(len(parse_caption(c.decode())["objects"]) == 1 for c in captions.values()) == 20  # half and half
    manifest = json.loads(a[MANIFEST])
    assert manifest["parameters"] == {"count": 40, "size": 32, "seed": 0, "format": "png"}
    assert manifest["held_out"] == [{"colour": "red", "shape": "triangle"}, {"colour": "blue", "shape": "circle"},
                                    {"colour": "yellow", "shape": "square"}]
    assert manifest["vocabulary"]["sizes"] == {"small": [8, 10], "large": [14, 18]}
    assert set(manifest["vocabulary"]["colours"]) == set(COLOURS) and manifest["vocabulary"]["shapes"] == list(SHAPES)
    assert manifest["scenes"]["one_object"] == manifest["scenes"]["two_objects"] == 20


def test_a_seed_gives_the_same_files(scenes):
    a, b, c, d = scenes
    assert a == b
    assert sorted(c.values()) != sorted(a.values()) and not set(c.values()) & {v for k, v in a.items() if
                                                                               k.endswith(".png")}
    assert {k: d[k] for k in a if k != MANIFEST} == {k: v for k, v in a.items() if k != MANIFEST}  # count-free


def test_every_caption_is_true_in_its_pixels_and_held_out_pairs_are_never_drawn():
    drawn, relations, sizes = set(), set(), set()
    for size in (32, 24, 48):
        for i in range(200):
            truth = scene(7, i, size)
            check_scene(render(truth), truth.caption, truth)
            drawn |= {(t.colour, t.shape) for t in truth.things}
            relations.add(truth.relation)
            sizes |= {t.size for t in truth.things}
    assert drawn == set(PAIRS) and not drawn & set(HELD_OUT)  # every other pair shows up, in 600 scenes
    assert relations == {None, *RELATIONS} and sizes == {"small", "large"}


def test_parse_caption_inverts_the_grammar_and_refuses_the_rest():
    assert parse_caption("a small red triangle") == {  # a held-out pair: evaluation prompts for it
        "objects": [{"colour": "red", "shape": "triangle", "size": "small"}], "relation": None}
    assert parse_caption("a cyan square right of a blue circle") == {
        "objects": [{"colour": "cyan", "shape": "square", "size": None},
                    {"colour": "blue", "shape": "circle", "size": None}], "relation": "right of"}
    for bad in ["A small red triangle", "a small red triangle ", "a small  red triangle", "a red triangle",
                "a huge red triangle", "a small red triangle left of a blue circle", "a red circle near a blue square",
                "a red circle left of a blue", "a small purple circle", "a small red circle.", "", None, 3]:
        with pytest.raises(ValueError, match="not a shapes caption"):
            parse_caption(bad)


def test_shapes_to_a_bucket(bucket, tmp_path):
    uri = f"s3://{bucket}/raw/shapes"
    assert cli.main(["data", "shapes", "--output", uri, "--count", "6", "--size", "24", "--seed", "3"]) == 0
    remote = files(uri)
    assert len(remote) == 13 and remote == write(tmp_path, "--count", "6", "--size", "24", "--seed", "3")
    assert json.loads(remote[MANIFEST])["parameters"]["size"] == 24


def test_bad_flags_are_refused_in_one_line(tmp_path, capsys):
    assert cli.main(["data", "shapes", "--output", str(tmp_path), "--count", "0"]) == 1
    assert cli.main(["data", "shapes", "--output", str(tmp_path), "--size", "16"]) == 1
    assert cli.main(["data", "shapes", "--output", str(tmp_path), "--limit", "3"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "ddpm data: error: --count must be at least 1, got 0",
        "ddpm data: error: --size must be between 24 and 512 pixels for shapes, got 16",
        "ddpm data: error: --limit does not apply to shapes"]
    assert storage.list_files(str(tmp_path)) == []
