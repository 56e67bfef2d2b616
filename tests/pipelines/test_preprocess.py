"""The ingest stage end to end: real Ray Data, a real S3 endpoint (moto), real folders, real image files.

The raw set is 60 of scikit-learn's digits in class folders (40 PNG, 20 JPEG) plus three objects that must be
skipped and reported: a corrupt PNG, an empty object and a text file; and one caption beside an image, which is a
sidecar (counted apart, not reported as junk) even without ``--captions``.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import ray
from PIL import Image

from pipelines import cli, storage
from pipelines.data.dataset import load_captions, load_dataset, load_numpy, read_manifest
from pipelines.data.digits import digits, write_images
from pipelines.data.preprocess import UnusableImage, prepare_image, preprocess
from pipelines.errors import UserError

EXPECTED_SKIPS = {
    "3/corrupt.png": "corrupt image",
    "5/empty.png": "empty object (0 bytes)",
    "notes.txt": "not an image file ('.txt' extension)",
}


def make_raw(uri: str) -> dict[str, tuple[np.ndarray, int]]:
    """Write the raw set under ``uri``; returns key -> (image (8, 8) uint8, label) for the 60 digits."""
    images, labels = digits()
    keys = write_images(uri, images[:40], labels[:40], fmt="png")
    keys += write_images(uri, images[40:60], labels[40:60], fmt="jpeg", first_index=40)
    storage.write_bytes(storage.join(uri, "3/corrupt.png"), b"\x89PNG\r\n\x1a\n" + b"not really a png")
    storage.write_bytes(storage.join(uri, "5/empty.png"), b"")
    storage.write_bytes(storage.join(uri, "notes.txt"), b"not an image")
    storage.write_bytes(storage.join(uri, keys[0][:-4] + ".txt"), b"a handwritten digit")  # a caption
    return {key: (images[i], int(labels[i])) for i, key in enumerate(keys)}


def by_key(uri: str) -> dict[str, tuple[np.ndarray, int]]:
    """key -> (image (H, W, C), label), read through the Ray Dataset that training uses."""
    return {row["key"]: (row["image"], row["label"]) for row in load_dataset(uri).take_all()}


@pytest.fixture(scope="module")
def processed_s3(s3):
    """The raw set in a bucket, preprocessed once at 8x8 grey: (raw URI, output URI, source, manifest)."""
    s3.create_bucket(Bucket="preprocess-module")
    raw, out = "s3://preprocess-module/raw", "s3://preprocess-module/processed"
    source = make_raw(raw)
    return raw, out, source, preprocess(raw, out, resolution=8, channels=1)


def test_s3_rows_shapes_labels_and_skips(processed_s3, ray_local):
    raw, out, source, manifest = processed_s3
    assert manifest["counts"] == {
        "objects": 64, "rows": 60, "skipped": 3, "sidecars": 1,
        "per_class": {str(c): sum(label == c for _, label in source.values()) for c in range(10)},
    }
    assert manifest["class_names"] == [str(c) for c in range(10)] and manifest["image_shape"] == [8, 8, 1]
    assert {s["key"] for s in manifest["skipped"]} == EXPECTED_SKIPS.keys()
    for item in manifest["skipped"]:
        assert item["reason"].startswith(EXPECTED_SKIPS[item["key"]])
    assert read_manifest(out) == manifest
    # Without --captions nothing about captions: no policy, section or column, and the fingerprint as before.
    assert not {"caption_policy", "captions", "source_manifest"} & manifest.keys()
    with pytest.raises(UserError, match="has no captions: run ddpm preprocess --captions"):
        load_captions(out)

    # Ray Dataset: every image with its label; PNGs exactly as written, JPEGs within their compression error.
    rows = by_key(out)
    assert rows.keys() == source.keys()
    for key, (image, label) in rows.items():
        assert image.shape == (8, 8, 1) and image.dtype == np.uint8 and label == source[key][1]
        error = np.abs(image[..., 0].astype(int) - source[key][0])
        assert error.max() == 0 if key.endswith(".png") else error.mean() < 8

    # Without Ray: the same images and labels.
    images, labels = load_numpy(out)
    assert images.shape == (60, 8, 8, 1) and images.dtype == np.uint8 and labels.dtype == np.int64
    expected = sorted((label, image.tobytes()) for image, label in rows.values())
    assert sorted((int(label), image.tobytes()) for image, label in zip(images, labels)) == expected

    # Plain Ray Data reads the shards as they are: image is fixed-size binary of H*W*C bytes.
    fs, root = storage.filesystem_for(out)
    ds = ray.data.read_parquet([f"{root}/{shard}" for shard in manifest["shards"]], filesystem=fs)
    assert ds.count() == 60 and ds.schema().names == ["image", "label", "key", "sha256"]
    assert ds.schema().base_schema.field("image").type == pa.binary(8 * 8 * 1)


def test_load_dataset_reads_with_ray_datas_v1_parquet_reader(processed_s3, ray_local):
    """Ray 2.60's default Parquet reader (V2) starts FooterReader actors, new processes, on every read: seconds per
    read on 2 cores (benchmarks/parquet_reader.py). load_dataset reads with V1 and leaves the session's choice as it
    was."""
    context = ray.data.DataContext.get_current()
    before = context.use_datasource_v2
    stats = load_dataset(processed_s3[1], columns=["label"]).materialize().stats()
    assert "ReadParquet" in stats and "ListFiles" not in stats, stats
    assert context.use_datasource_v2 == before


def test_local_folder_gives_the_same_dataset(processed_s3, tmp_path, ray_local):
    _, _, source, on_s3 = processed_s3
    make_raw(str(tmp_path / "raw"))
    manifest = preprocess(str(tmp_path / "raw"), str(tmp_path / "out"), resolution=8, channels=1)
    assert manifest["fingerprint"] == on_s3["fingerprint"]  # keys are relative, and the bytes are the same
    assert manifest["counts"] == on_s3["counts"] and manifest["skipped"] == on_s3["skipped"]
    assert {key: label for key, (_, label) in by_key(str(tmp_path / "out")).items()} == {
        key: label for key, (_, label) in source.items()
    }


def test_fingerprint_is_stable_and_follows_the_bytes(bucket, ray_local):
    raw, out = f"s3://{bucket}/raw", f"s3://{bucket}/processed"
    make_raw(raw)
    first = preprocess(raw, out, resolution=8, channels=1)
    again = preprocess(raw, out, resolution=8, channels=1)
    assert again["fingerprint"] == first["fingerprint"] and again["shards"] != first["shards"]
    tops = {e.key.split("/", 1)[0] for e in storage.list_files(out)}
    assert tops == {"manifest.json", again["shards"][0].split("/", 1)[0]}  # the previous generation is gone

    images, labels = digits()
    write_images(raw, 255 - images[:1], labels[:1], fmt="png")  # overwrite 0/0000.png with its negative
    changed = preprocess(raw, out, resolution=8, channels=1)
    assert changed["fingerprint"] != first["fingerprint"] and changed["counts"] == first["counts"]
    assert preprocess(raw, out, resolution=8, channels=3)["fingerprint"] != changed["fingerprint"]


def test_crash_or_failure_leaves_the_previous_output_readable(tmp_path, ray_local):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    make_raw(raw)
    manifest = preprocess(raw, out, resolution=8, channels=1)
    before = load_numpy(out)

    # A run that died midway: its scratch and a half-written generation that no manifest names.
    storage.write_json(storage.join(out, "_tmp-0123456789ab/started.json"), {"input": raw})
    storage.write_bytes(storage.join(out, "data-0123456789ab/part-0.parquet"), b"PAR1 half a shard")
    assert read_manifest(out) == manifest
    assert all(np.array_equal(a, b) for a, b in zip(load_numpy(out), before))

    # A run that fails after its Ray stage (every image unusable) commits nothing and cleans up after itself.
    storage.write_bytes(str(tmp_path / "bad" / "0" / "x.png"), b"\x89PNG\r\n\x1a\n" + b"garbage")
    with pytest.raises(UserError, match="no usable images"):
        preprocess(str(tmp_path / "bad"), out, resolution=8, channels=1)
    assert read_manifest(out) == manifest
    assert all(np.array_equal(a, b) for a, b in zip(load_numpy(out), before))

    # The next good run commits and removes what the dead run left.
    rerun = preprocess(raw, out, resolution=8, channels=1)
    assert {e.key.split("/", 1)[0] for e in storage.list_files(out)} == {"manifest.json", rerun["shards"][0].split("/")[0]}


def test_small_images_are_skipped_or_upscaled(tmp_path, ray_local):
    raw = str(tmp_path / "raw")
    images, labels = digits()
    write_images(raw, images[:3], labels[:3])  # 8x8
    wide = np.zeros((12, 20, 3), np.uint8)
    wide[:, 4:16] = 255  # white centre square, black side bands that the centre crop drops
    storage.write_bytes(storage.join(raw, "7/wide.png"), _png(wide))

    skipped = preprocess(raw, str(tmp_path / "skip"), resolution=10, channels=1, small="skip")
    assert skipped["counts"]["rows"] == 1 and skipped["counts"]["skipped"] == 3
    assert {s["reason"] for s in skipped["skipped"]} == {"too small (8x8 < 10)"}
    assert (load_numpy(str(tmp_path / "skip"))[0] == 255).all()

    upscaled = preprocess(raw, str(tmp_path / "up"), resolution=10, channels=1, small="upscale")
    assert upscaled["counts"]["rows"] == 4 and load_numpy(str(tmp_path / "up"))[0].shape == (4, 10, 10, 1)


def test_missing_bucket_exits_non_zero_with_one_line(s3):
    uri = "s3://no-such-bucket-anywhere/raw"
    run = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "preprocess", "--input", uri, "--output", uri + "-out",
         "--resolution", "8"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode != 0
    assert run.stderr.count("\n") == 1 and uri in run.stderr and "bucket does not exist" in run.stderr


def test_readers_need_a_manifest(bucket, tmp_path):
    for uri in (f"s3://{bucket}/nothing", str(tmp_path)):
        for read in (read_manifest, load_dataset, load_numpy):
            with pytest.raises(UserError, match="^" + re.escape(f"no manifest.json at {uri}: run ddpm preprocess first") + "$"):
                read(uri)


def test_prepare_image_formats_modes_and_orientation():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    for fmt in ("PNG", "BMP", "GIF", "WEBP"):
        out = prepare_image(_encode(Image.fromarray(grey), fmt, lossless=True), 8, 1)
        assert out.shape == (8, 8, 1) and np.array_equal(out[..., 0], grey), fmt

    rgb = prepare_image(_encode(Image.fromarray(grey), "PNG"), 8, 3)
    assert rgb.shape == (8, 8, 3) and np.array_equal(rgb[..., 1], grey)

    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red: shows as white
    assert (prepare_image(_encode(clear, "PNG"), 8, 3) == 255).all()

    deep = Image.fromarray((grey.astype(np.uint16) << 8) | 0x7F)  # 16-bit grey keeps its top byte
    assert np.array_equal(prepare_image(_encode(deep, "PNG"), 8, 1)[..., 0], grey)

    tall = np.zeros((16, 8), np.uint8)
    tall[:8] = 255  # top half white; EXIF orientation 6 turns it a quarter clockwise, so the right half is white
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(tall).save(buf, "JPEG", quality=100, exif=exif)
    turned = prepare_image(buf.getvalue(), 8, 1, upscale=True)[..., 0].astype(int)
    assert turned[:, 6:].mean() > 200 and turned[:, :2].mean() < 50

    truncated = _png(np.full((64, 64), 7, np.uint8))[:60]  # the header survives, the pixels do not
    for bad, reason in ((truncated, "corrupt image"), (b"%PDF-1.4", "not a recognised image")):
        with pytest.raises(UnusableImage, match=reason):
            prepare_image(bad, 8, 1)


def test_data_command_writes_class_folders(tmp_path):
    assert cli.main(["data", "digits", "--output", str(tmp_path), "--format", "jpeg"]) == 0
    entries = storage.list_files(str(tmp_path))
    assert len(entries) == 1797 and {e.key.split("/")[0] for e in entries} == {str(c) for c in range(10)}
    assert all(e.key.endswith(".jpeg") for e in entries)


def test_an_output_that_is_the_input_or_holds_another_kind_of_dataset_is_refused(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_raw(str(raw))
    generated = tmp_path / "generated"
    storage.write_json(str(generated / "manifest.json"), {"kind": "ddpm-generated", "format_version": 1})
    storage.write_bytes(str(generated / "data-1" / "part-0.parquet"), b"pixels")
    for output, message in ((raw, f"--output {raw} is the --input of this run"),
                            (generated, f"--output {generated} holds generated images (ddpm generate), which "
                                        f"ddpm preprocess would replace")):
        before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
        assert cli.main(["preprocess", "--input", str(raw), "--output", str(output), "--resolution", "8"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before


def test_photos_refuse_a_folder_made_with_other_settings_or_holding_other_files(tmp_path, capsys):
    from pipelines.data.photos import SETTINGS_FILE

    out = tmp_path / "photos"

    def photos(*flags: str) -> int:
        return cli.main(["data", "photos", "--output", str(out), "--count", "8", *flags])

    assert photos("--size", "8", "--seed", "0") == 0
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert len(written) == 8 + 1 and storage.read_json(str(out / SETTINGS_FILE))["size"] == 8
    capsys.readouterr()
    for flags in (("--size", "16", "--seed", "0"), ("--size", "8", "--seed", "1")):
        assert photos(*flags) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "holds crops made with --size 8 --seed 0" in err, err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == written
    assert photos("--size", "8", "--seed", "0", "--count", "16") == 0  # more crops of the same dataset
    assert len(list(out.rglob("*.png"))) == 16 and storage.read_json(str(out / SETTINGS_FILE))["count"] == 16

    other = tmp_path / "digits"
    assert cli.main(["data", "digits", "--output", str(other), "--limit", "5"]) == 0
    capsys.readouterr()
    assert cli.main(["data", "photos", "--output", str(other), "--count", "8"]) == 1
    assert "holds other files" in capsys.readouterr().err
    assert not (other / SETTINGS_FILE).exists() and len(list(other.rglob("*.png"))) == 5


def _encode(img: Image.Image, fmt: str, lossless: bool = False) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"lossless": True} if lossless and fmt == "WEBP" else {}))
    return buf.getvalue()


def _png(pixels: np.ndarray) -> bytes:
    return _encode(Image.fromarray(pixels), "PNG")
