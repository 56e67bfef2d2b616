"""``ddpm data photos`` (pipelines/data/photos.py): crops of scikit-image's colour photographs, one folder per photo,
the same files for a seed, and ``ddpm preprocess`` ingests them with the photos as labels."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipelines import cli, storage
from pipelines.data.dataset import load_numpy, read_manifest
from pipelines.data.photos import PHOTOS, SETTINGS_FILE

RECORD = SETTINGS_FILE  # what a folder of crops was made with: a rerun with other settings is refused

PHOTO_NAMES = sorted(PHOTOS)  # the class ids preprocess gives: sorted folder names


def files(uri: str) -> dict[str, bytes]:
    """The images written under ``uri``, by key (the generator's record, ``_photos.json``, apart)."""
    return {e.key: storage.read_bytes(storage.join(uri, e.key)) for e in storage.list_files(uri)
            if e.key != RECORD}


def write(out, *flags: str) -> dict[str, bytes]:
    assert cli.main(["data", "photos", "--output", str(out), *flags]) == 0
    return files(str(out))


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """40 crops of 32x32 at seed 0, written twice, and at seed 1 and in a larger count: (folder, files each)."""
    root = tmp_path_factory.mktemp("photos")
    base = ["--count", "40", "--size", "32"]
    return (root / "a", write(root / "a", *base, "--seed", "0"), write(root / "b", *base, "--seed", "0"),
            write(root / "c", *base, "--seed", "1"), write(root / "d", "--count", "48", "--size", "32"))


def test_one_folder_per_photo_of_rgb_crops(crops):
    _, a, *_ = crops
    assert len(a) == 40 and {key.split("/")[0] for key in a} == set(PHOTOS)
    per_photo = {name: sum(key.startswith(f"{name}/") for key in a) for name in PHOTOS}
    assert set(per_photo.values()) == {5}  # crop i comes from photo i mod 8
    for data in a.values():
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(d))) for d in a.values()])
    assert pixels.std(axis=(1, 2, 3)).min() > 1  # no blank crops
    assert len(set(a.values())) == 40  # and no two alike


def test_a_seed_gives_the_same_files(crops):
    _, a, b, c, d = crops
    assert a == b
    assert set(c) == set(a) and all(c[k] != a[k] for k in a)  # same layout, other crops
    assert {k: d[k] for k in a} == a  # crop i does not depend on the count: the default seed is 0
    record = json.loads(storage.read_bytes(storage.join(str(crops[0]), RECORD)))
    assert {k: record[k] for k in ("dataset", "size", "seed", "count")} == {"dataset": "photos", "size": 32,
                                                                            "seed": 0, "count": 40}


def test_bad_flags_are_refused_in_one_line(tmp_path, capsys):
    assert cli.main(["data", "photos", "--output", str(tmp_path), "--count", "0"]) == 1
    assert cli.main(["data", "photos", "--output", str(tmp_path), "--size", "4"]) == 1
    assert cli.main(["data", "digits", "--output", str(tmp_path), "--seed", "3"]) == 1
    assert cli.main(["data", "photos", "--output", str(tmp_path), "--limit", "3"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["ddpm data: error: --count must be at least 1, got 0",
                     "ddpm data: error: --size must be between 8 and 512 pixels, got 4",
                     "ddpm data: error: --seed does not apply to digits",
                     "ddpm data: error: --limit does not apply to photos"]
    assert storage.list_files(str(tmp_path)) == []


def test_preprocess_ingests_the_photos_with_their_labels(crops, tmp_path, ray_local):
    folder, a, *_ = crops
    out = tmp_path / "processed"
    assert cli.main(["preprocess", "--input", str(folder), "--output", str(out), "--resolution", "32"]) == 0
    images, labels = load_numpy(str(out))
    assert images.shape == (40, 32, 32, 3) and np.bincount(labels).tolist() == [5] * 8
    assert read_manifest(str(out))["class_names"] == PHOTO_NAMES
    # each row is its file's pixels, labelled with its photo
    source = {np.asarray(Image.open(io.BytesIO(data))).tobytes(): PHOTO_NAMES.index(key.split("/")[0])
              for key, data in a.items()}
    assert {img.tobytes(): int(label) for img, label in zip(images, labels)} == source


def test_photos_to_a_bucket(bucket, tmp_path):
    uri = f"s3://{bucket}/raw/photos"
    assert cli.main(["data", "photos", "--output", uri, "--count", "16", "--size", "16", "--format", "jpeg"]) == 0
    keys = sorted(e.key for e in storage.list_files(uri) if e.key != RECORD)
    assert len(keys) == 16 and keys[0] == "astronaut/0000.jpeg" and {k.split("/")[0] for k in keys} == set(PHOTOS)
    local = write(tmp_path, "--count", "16", "--size", "16", "--format", "jpeg")
    assert files(uri) == local  # the same bytes wherever they go
