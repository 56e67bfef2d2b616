"""Where ``ddpm preprocess --captions`` finds each image's caption, and what makes a caption usable.

Two conventions, as people's datasets carry captions:

- ``NAME.txt`` beside ``NAME.png`` (img2dataset, WebDataset, ``ddpm data shapes``): read inside the Ray tasks,
  next to the image, so that the text never passes through the driver;
- ``metadata.jsonl`` in any folder, one JSON object a line with ``file_name`` (relative to that folder) and
  ``text`` (Hugging Face's imagefolder): read on the driver, one small file per folder.

When both name a caption for the same image, ``metadata.jsonl`` wins and the ``.txt`` is not read: a metadata file
is written on purpose for the whole folder, while a stray ``.txt`` may be a leftover. Two metadata lines for the
same image (in one file, or in a folder's and a parent folder's) are refused: there is no right one to choose.

A caption is UTF-8 text of at most :data:`MAX_BYTES` bytes once one trailing newline (``\\n`` or ``\\r\\n``) is
stripped; otherwise it is kept exactly as written. A caption that breaks either rule quarantines its image, which is
then reported in the manifest's ``skipped`` list like a corrupt image.

Sidecar files (captions, ``metadata.jsonl``, ``shapes.json``) are never reported as junk, with or without
``--captions``: they are counted apart.
"""

from __future__ import annotations

import json
import posixpath
from typing import Iterable

from pipelines import storage
from pipelines.errors import UserError

METADATA = "metadata.jsonl"
SOURCE_MANIFEST = "shapes.json"  # ddpm data shapes' manifest at the input's root: carried into the dataset's
MAX_BYTES = 1000  # a caption's UTF-8 bytes, at most: far past a CLIP context of 77 tokens, short of a document
POLICIES = ("keep", "required")  # an image without a caption: kept with an empty caption, or quarantined


class BadCaption(Exception):
    """A caption that is not usable text: its image is quarantined and reported, not a failure of the run."""


def decode_caption(data: bytes) -> str:
    """A caption file's bytes -> its text: UTF-8, one trailing newline stripped, at most :data:`MAX_BYTES` bytes."""
    if data.endswith(b"\n"):
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
    if len(data) > MAX_BYTES:  # first: a reader may pass only the first MAX_BYTES + 3 bytes of a long file
        raise BadCaption(f"longer than {MAX_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadCaption(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None


def text_file(image_key: str) -> str:
    """``cat/0001.png`` -> ``cat/0001.txt``: where an image's caption file sits."""
    return posixpath.splitext(image_key)[0] + ".txt"


def is_sidecar(key: str, text_files: set[str]) -> bool:
    """Whether a listed object is a caption or a manifest of the images rather than junk: the ``.txt`` of an image
    (``text_files``), a ``metadata.jsonl`` in any folder, or ``shapes.json`` at the root."""
    return key in text_files or posixpath.basename(key) == METADATA or key == SOURCE_MANIFEST


def read_metadata(input_uri: str, metadata_keys: Iterable[str], endpoint_url: str | None) -> dict[str, str]:
    """image key (relative to INPUT) -> its caption text, from every ``metadata.jsonl`` listed.

    A file that is not JSON lines of ``{"file_name": str, "text": str}`` stops the run with one line naming the file
    and the line: it is the user's index of the dataset, and guessing past an error in it would mislabel images.
    """
    captions: dict[str, str] = {}
    where: dict[str, str] = {}
    for meta in sorted(metadata_keys):
        folder = posixpath.dirname(meta)
        uri = storage.join(input_uri, meta)
        try:
            # split("\n"), not splitlines(): a JSON string may hold U+2028, which splitlines() would split at
            lines = storage.read_bytes(uri, endpoint_url).decode("utf-8").split("\n")
        except UnicodeDecodeError:
            raise UserError(f"{uri}: not UTF-8 text") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{uri} line {number}: not JSON ({exc.msg})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) \
                    or not isinstance(entry.get("text"), str):
                raise UserError(f"{uri} line {number}: expected an object with string fields file_name and text")
            name = posixpath.normpath(entry["file_name"])
            if name == ".." or name.startswith("../") or posixpath.isabs(name):
                raise UserError(f"{uri} line {number}: file_name {entry['file_name']!r} is outside {folder or '.'}/")
            key = posixpath.join(folder, name)
            if key in where:
                raise UserError(f"{uri} line {number}: a second caption for {key} (the first is in {where[key]})")
            captions[key], where[key] = entry["text"], f"{meta} line {number}"
    return captions
