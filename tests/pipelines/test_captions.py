"""Captions through ``ddpm preprocess --captions``: real Ray Data, moto's S3 server, real files.

The raw set is eight ``ddpm data shapes`` scenes at 24x24 (each ``NAME.png`` with its ``NAME.txt``, and
``shapes.json``), plus: two ``metadata.jsonl`` files (at the root and in a class folder) whose captions replace two
scenes' ``.txt``; an image without a caption; one whose caption is not UTF-8; one whose caption is over the byte
limit; one whose caption ends in a newline and holds another; and ``notes.txt``, which captions nothing.
"""

from __future__ import annotations

import json
import re

import pytest

from pipelines import cli, storage
from pipelines.data.captions import MAX_BYTES, BadCaption, decode_caption, read_metadata
from pipelines.data.dataset import load_captions, load_dataset, load_numpy, read_columns, read_manifest
from pipelines.data.preprocess import caption_digest, fingerprint, preprocess
from pipelines.data.shapes import write_shapes
from pipelines.errors import UserError

BAD = {"bad/latin1.png": "caption bad/latin1.txt: not UTF-8", "long/long.png": "caption long/long.txt: longer than",
       "notes.txt": "not an image file"}
METADATA_CAPTIONS = {"cyan-circle/0000.png": "un cercle cyan, été ☀", "yellow-circle/0001.png": "a yellow circle"}


def make_raw(uri: str) -> tuple[dict, dict[str, str]]:
    """Write the raw set under ``uri``; returns (shapes.json's content, image key -> expected caption)."""
    shapes = write_shapes(uri, count=8, size=24, seed=0)
    png = storage.read_bytes(storage.join(uri, "cyan-circle/0000.png"))
    expected = {e.key: storage.read_bytes(storage.join(uri, e.key[:-4] + ".txt")).decode()
                for e in storage.list_files(uri) if e.key.endswith(".png")}
    expected.update(METADATA_CAPTIONS)  # metadata.jsonl wins over NAME.txt
    line = {"file_name": "cyan-circle/0000.png", "text": METADATA_CAPTIONS["cyan-circle/0000.png"]}
    storage.write_bytes(storage.join(uri, "metadata.jsonl"), (json.dumps(line, ensure_ascii=False) + "\n\n").encode())
    storage.write_bytes(storage.join(uri, "yellow-circle/metadata.jsonl"),
                        b'{"file_name": "0001.png", "text": "a yellow circle", "extra": 1}')
    extras = {"lonely.png": None, "bad/latin1.png": b"caf\xe9", "long/long.png": b"x" * (MAX_BYTES + 1),
              "nl/newline.png": b"line one\nline two\n"}
    for key, caption in extras.items():
        storage.write_bytes(storage.join(uri, key), png)
        if caption is not None:
            storage.write_bytes(storage.join(uri, key[:-4] + ".txt"), caption)
    storage.write_bytes(storage.join(uri, "notes.txt"), b"captions nothing")
    expected.update({"lonely.png": "", "nl/newline.png": "line one\nline two"})
    return shapes, expected


@pytest.fixture(scope="module")
def captioned_s3(s3):
    """The raw set in a bucket, preprocessed once with ``captions="keep"``: (raw, out, shapes.json, expected,
    manifest)."""
    s3.create_bucket(Bucket="captions-module")
    raw, out = "s3://captions-module/raw", "s3://captions-module/processed"
    shapes, expected = make_raw(raw)
    return raw, out, shapes, expected, preprocess(raw, out, resolution=24, channels=3, captions="keep")


def test_captions_from_s3_land_in_the_caption_column_row_for_row(captioned_s3, ray_local):
    raw, out, shapes, expected, manifest = captioned_s3
    assert read_manifest(out) == manifest and manifest["caption_policy"] == "keep"
    assert manifest["counts"]["rows"] == 10 and manifest["counts"]["uncaptioned"] == 1
    assert manifest["counts"]["sidecars"] == 8 + 3 + 1 + 2  # .txt of the scenes and extras, shapes.json, metadata
    assert manifest["counts"]["objects"] == 10 + 3 + 14
    assert {s["key"]: s["reason"][:len(BAD[s["key"]])] for s in manifest["skipped"]} == BAD  # quarantined
    assert manifest["captions"] == {"max_bytes": MAX_BYTES, "found": {"metadata.jsonl": 2, "txt": 9},
                                    "metadata_unmatched": 0, "uncaptioned": ["lonely.png"]}
    assert manifest["source_manifest"] == shapes and manifest["source_manifest"]["held_out"]

    # Through the Ray Dataset that training reads: each image with its own caption.
    rows = load_dataset(out).take_all()
    survivors = {k: v for k, v in expected.items() if k not in BAD}
    assert {row["key"]: row["caption"] for row in rows} == survivors
    # Without Ray: load_captions is row for row with load_numpy.
    images, _ = load_numpy(out)
    keys = read_columns(out, manifest["shards"], ["key"], None).column("key").to_pylist()
    pixels = {row["key"]: row["image"] for row in rows}
    assert load_captions(out) == [survivors[k] for k in keys]
    assert all((images[i] == pixels[k]).all() for i, k in enumerate(keys))


def test_missing_caption_quarantined_and_an_edited_caption_changes_the_fingerprint(captioned_s3, tmp_path, capsys,
                                                                                    ray_local):
    raw, _, _, expected, on_s3 = captioned_s3
    local, out = tmp_path / "raw", str(tmp_path / "out")
    for entry in storage.list_files(raw):  # the same bytes in a local folder, one caption edited
        storage.write_bytes(str(local / entry.key), storage.read_bytes(storage.join(raw, entry.key)))
    (local / "cyan-triangle/0002.txt").write_text("an edited caption\n")

    assert cli.main(["preprocess", "--input", str(local), "--output", out, "--resolution", "24",
                     "--captions", "required"]) == 0
    assert "1 images without one (quarantined)" in capsys.readouterr().out
    manifest = read_manifest(out)
    reasons = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert reasons["lonely.png"].startswith("no caption") and manifest["captions"]["uncaptioned"] == ["lonely.png"]
    assert manifest["counts"]["rows"] == 9 and load_captions(out).count("an edited caption") == 1

    # The fingerprint covers each caption: the S3 run's rows, less lonely.png, with the edit, give this one's.
    kept = read_columns(out, manifest["shards"], ["key", "sha256"], None).to_pylist()
    settings = {k: manifest[k] for k in ("format_version", "resolution", "channels", "labels_from_dirs", "small",
                                         "caption_policy")}

    def rows(edited: str) -> list[tuple[str, str, str]]:
        captions = {**expected, "cyan-triangle/0002.png": edited}
        return [(r["key"], r["sha256"], caption_digest(captions[r["key"]])) for r in kept]

    assert manifest["fingerprint"] == fingerprint(rows("an edited caption"), settings)
    assert manifest["fingerprint"] != fingerprint(rows(expected["cyan-triangle/0002.png"]), settings)
    assert manifest["fingerprint"] != on_s3["fingerprint"]


def test_uncaptioned_fingerprint_is_the_one_it_always_was():
    # Computed with the code before captions existed (commit 36695f0): rows of (key, sha256) hash as they did.
    settings = {"format_version": 1, "resolution": 8, "channels": 1, "labels_from_dirs": True, "small": "skip"}
    assert fingerprint([("b/1.png", "ff" * 32), ("a/0.png", "00" * 32)], settings) == \
        "09207e9f94fdabbfeab5eb3b189d1ec91b416a5ad07b4e84b4a8ccfcefb70a0e"


def test_caption_text_rules():
    assert decode_caption(b"a red square\n") == "a red square"
    assert decode_caption(b"a red square\r\n") == "a red square"
    assert decode_caption(b" two\n\nnewlines \n\n") == " two\n\nnewlines \n"  # one newline stripped, no more
    assert decode_caption("été".encode()) == "été" and decode_caption(b"") == ""
    assert decode_caption(b"x" * MAX_BYTES + b"\n") == "x" * MAX_BYTES
    for bad, reason in ((b"x" * (MAX_BYTES + 1), "longer than"), (b"caf\xe9", "not UTF-8"),
                        ("é".encode() * (MAX_BYTES // 2 + 1), "longer than")):
        with pytest.raises(BadCaption, match=reason):
            decode_caption(bad)


def test_a_broken_metadata_jsonl_stops_the_run_with_one_line(tmp_path):
    cases = {
        b'{"file_name": "a.png", "text": "x"}\nnot json': "metadata.jsonl line 2: not JSON",
        b'{"file_name": "a.png"}': "line 1: expected an object with string fields file_name and text",
        b'{"file_name": "a.png", "text": 3}': "line 1: expected an object",
        b'{"file_name": "a.png", "text": "x"}\n{"file_name": "./a.png", "text": "y"}':
            "line 2: a second caption for sub/a.png (the first is in sub/metadata.jsonl line 1)",
        b'{"file_name": "../a.png", "text": "x"}': "line 1: file_name '../a.png' is outside sub/",
        b"\xff": "metadata.jsonl: not UTF-8 text",
    }
    for content, message in cases.items():
        storage.write_bytes(str(tmp_path / "sub" / "metadata.jsonl"), content)
        with pytest.raises(UserError, match=re.escape(message)) as caught:
            read_metadata(str(tmp_path), ["sub/metadata.jsonl"], None)
        assert "\n" not in str(caught.value)
