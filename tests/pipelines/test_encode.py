"""``ddpm encode`` end to end: real Ray Data actor pools, S3 served by moto, a real (tiny, seeded) autoencoder.

The data: 48 photo crops of 16x16 RGB (``pipelines.data.photos``), preprocessed once. The autoencoder: the ``tiny``
preset (f = 4, 4 latent channels), random weights under a fixed seed, scaling factor 0.5. What is under test is the
bookkeeping (shards, manifest, the autoencoder copy, generations, errors) and that every latent is, bit for bit,
what one process computes with the same chunk size and one thread.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from ddpm import Autoencoder, AutoencoderConfig, autoencoder, from_uint8
from pipelines import cli, storage
from pipelines.data.dataset import load_dataset, load_numpy, read_columns, read_manifest
from pipelines.data.encode import encode
from pipelines.data.photos import write_photos
from pipelines.data.preprocess import preprocess
from pipelines.errors import UserError

COUNT, SIZE, CHUNK = 48, 16, 8
BUCKET = "encode-module"


@pytest.fixture(scope="module")
def tiny_ae(tmp_path_factory):
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig.preset("tiny"))
    ae.set_scaling_factor(0.5)
    return autoencoder.save(tmp_path_factory.mktemp("ae") / "tiny", ae, metadata={"test": True})


@pytest.fixture(scope="module")
def processed(s3):
    """48 crops in a bucket, preprocessed at 16x16 RGB: (URI, images by key, labels by key, manifest)."""
    s3.create_bucket(Bucket=BUCKET)
    raw, out = f"s3://{BUCKET}/raw", f"s3://{BUCKET}/processed"
    write_photos(raw, count=COUNT, size=SIZE)
    manifest = preprocess(raw, out, resolution=SIZE, channels=3)
    table = read_columns(out, manifest["shards"], ["key"], None)
    images, labels = load_numpy(out)
    keys = table["key"].to_pylist()
    return out, dict(zip(keys, images)), dict(zip(keys, labels.tolist())), manifest


def reference(folder, images: np.ndarray, threads: int = 1) -> np.ndarray:
    """Single-process encode: the same chunk size and thread count as an actor, chunks padded with zeros.
    (N, h, w, c) float32. The thread count matters: PyTorch's CPU kernels split their sums by thread, so 1 and 2
    threads differ in the last bits (measured: up to 3e-7 here); batch-mates do not."""
    ae = autoencoder.load(folder)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = []
        with torch.inference_mode():
            x = from_uint8(images)  # (N, C, H, W)
            for start in range(0, len(x), CHUNK):
                chunk = torch.zeros((CHUNK, *x.shape[1:]))
                n = min(CHUNK, len(x) - start)
                chunk[:n] = x[start:start + n]
                out.append(ae.encode(chunk)[:n])
        return torch.cat(out).permute(0, 2, 3, 1).numpy()
    finally:
        torch.set_num_threads(before)


def latents_by_key(uri: str) -> dict[str, np.ndarray]:
    manifest = read_manifest(uri)
    latents, _ = load_numpy(uri)
    keys = read_columns(uri, manifest["shards"], ["key"], None)["key"].to_pylist()
    return dict(zip(keys, latents))


def tops(uri: str) -> set[str]:
    return {e.key.split("/", 1)[0] for e in storage.list_files(uri)}


def test_two_actors_on_s3_give_the_single_process_latents(processed, tiny_ae, ray_local):
    data, images, labels, source = processed
    output = f"s3://{BUCKET}/latents"
    lines: list[str] = []
    manifest = encode(data, str(tiny_ae), output, num_actors=2, batch_size=CHUNK, progress=lines.append)

    # The manifest.
    generation = manifest["shards"][0].split("/")[0]
    weights = (tiny_ae / autoencoder.WEIGHTS_FILE).read_bytes()  # ours already: saved again, the same bytes
    assert manifest["kind"] == "latents" and manifest["dtype"] == "float32" and manifest["format_version"] == 1
    assert manifest["image_shape"] == [4, 4, 4] and manifest["pixel_shape"] == [SIZE, SIZE, 3]
    assert manifest["class_names"] == source["class_names"] and manifest["flip"] is False
    assert manifest["counts"] == {"rows": COUNT, "per_class": source["counts"]["per_class"]}
    assert manifest["source"] == {"uri": data, "fingerprint": source["fingerprint"]}
    assert manifest["autoencoder"] == {
        "uri": str(tiny_ae), "name": None, "version": None, "sha256": hashlib.sha256(weights).hexdigest(),
        "scaling_factor": 0.5, "shift_factor": 0.0, "downsample_factor": 4, "latent_channels": 4,
        "folder": f"{generation}/autoencoder"}
    assert len(manifest["fingerprint"]) == 64 and read_manifest(output) == manifest
    assert all(s.startswith(f"{generation}/part-") for s in manifest["shards"])
    assert tops(output) == {"manifest.json", generation}  # the autoencoder copy is in its generation
    assert "on 2 CPU actor(s)" in lines[0] and "images/s (" in lines[-1] and lines[-1].endswith(f"-> {output}"), lines

    # The autoencoder copy: our format, its scaling kept, the bytes the manifest names.
    copied = storage.read_bytes(storage.join(output, generation, "autoencoder", autoencoder.WEIGHTS_FILE))
    assert hashlib.sha256(copied).hexdigest() == manifest["autoencoder"]["sha256"]
    config = json.loads(storage.read_bytes(storage.join(output, generation, "autoencoder", autoencoder.CONFIG_FILE)))
    assert config["format"] == autoencoder.FORMAT and config["autoencoder"]["scaling_factor"] == 0.5

    # load_numpy: (N, h, w, c) float32, every latent bit for bit the single-process one (rows matched by key).
    latents, got_labels = load_numpy(output)
    assert latents.shape == (COUNT, 4, 4, 4) and latents.dtype == np.float32 and got_labels.dtype == np.int64
    by_key = latents_by_key(output)
    keys = sorted(images)
    assert sorted(by_key) == keys
    expected = reference(tiny_ae, np.stack([images[k] for k in keys]))
    np.testing.assert_array_equal(np.stack([by_key[k] for k in keys]), expected)
    assert sorted(got_labels.tolist()) == sorted(labels.values())

    # load_dataset: the same latents through Ray Data, as (h, w, c) float32 tensors, with their labels.
    rows = load_dataset(output).take_all()
    assert len(rows) == COUNT
    for row in rows:
        assert row["image"].dtype == np.float32 and row["image"].shape == (4, 4, 4)
        np.testing.assert_array_equal(row["image"], by_key[row["key"]])
        assert row["label"] == labels[row["key"]]


def test_flip_stores_mirrors_and_a_rerun_replaces_the_generation(processed, tiny_ae, tmp_path, ray_local):
    data, images, labels, _ = processed
    output = str(tmp_path / "latents")
    flipped = encode(data, str(tiny_ae), output, num_actors=1, batch_size=CHUNK, flip=True, progress=None)
    assert flipped["counts"]["rows"] == 2 * COUNT and flipped["flip"] is True
    assert sum(flipped["counts"]["per_class"].values()) == 2 * COUNT
    by_key = latents_by_key(output)
    keys = sorted(images)
    assert sorted(by_key) == sorted(keys + [k + "#flip" for k in keys])
    # One actor on the 2-CPU cluster holds both CPUs, so it runs 2 torch threads: so does the reference.
    mirrored = np.stack([images[k][:, ::-1] for k in keys])  # (N, H, W, C): W reversed
    np.testing.assert_array_equal(np.stack([by_key[k + "#flip"] for k in keys]),
                                  reference(tiny_ae, mirrored, threads=2))
    np.testing.assert_array_equal(np.stack([by_key[k] for k in keys]),
                                  reference(tiny_ae, np.stack([images[k] for k in keys]), threads=2))
    _, got_labels = load_numpy(output)
    assert sorted(got_labels.tolist()) == sorted(list(labels.values()) * 2)

    # A rerun without --flip: a new generation replaces the old one, nothing else is left behind.
    plain = encode(data, str(tiny_ae), output, num_actors=1, batch_size=CHUNK, progress=None)
    generation = plain["shards"][0].split("/")[0]
    assert generation != flipped["shards"][0].split("/")[0]
    assert tops(output) == {"manifest.json", generation}  # the autoencoder copy is in its generation
    assert plain["autoencoder"]["folder"] == f"{generation}/autoencoder"
    assert plain["counts"]["rows"] == COUNT and load_numpy(output)[0].shape == (COUNT, 4, 4, 4)
    assert plain["fingerprint"] != flipped["fingerprint"]
    np.testing.assert_array_equal(np.stack([latents_by_key(output)[k] for k in keys]),
                                  np.stack([by_key[k] for k in keys]))  # other actors, other batches, same bits


def _fake_source(tmp_path, processed, **changes) -> str:
    """A copy of the source manifest with some fields changed (the shape checks run before any shard is read)."""
    data, _, _, manifest = processed
    folder = tmp_path / "fake"
    storage.write_json(str(folder / "manifest.json"), {**manifest, **changes})
    return str(folder)


def test_errors_are_one_line_user_errors(processed, tiny_ae, tmp_path, ray_local, capsys):
    data, _, _, manifest = processed
    out = str(tmp_path / "out")

    def fails(match: str, data_uri: str = data, ae_uri: str = str(tiny_ae), output: str = out) -> None:
        with pytest.raises(UserError, match=match) as info:
            encode(data_uri, ae_uri, output, num_actors=1, batch_size=CHUNK, progress=None)
        assert "\n" not in str(info.value)

    fails("no manifest.json at .*run ddpm preprocess first", data_uri=str(tmp_path))
    fails("the bucket does not exist", data_uri="s3://no-such-bucket-encode/processed")
    fails("images have 1 channel\\(s\\) but the autoencoder .* takes 3",
          data_uri=_fake_source(tmp_path, processed, image_shape=[SIZE, SIZE, 1]))
    fails("images of 18x18 pixels .* divisible by its downsampling factor f = 4",
          data_uri=_fake_source(tmp_path, processed, image_shape=[18, 18, 3]))
    fails("no such autoencoder folder", ae_uri=str(tmp_path / "missing"))
    (tmp_path / "not-ae").mkdir()
    fails("no autoencoder", ae_uri=str(tmp_path / "not-ae"))
    fails("the bucket does not exist", output="s3://no-such-bucket-encode/latents")
    assert not (tmp_path / "out").exists()  # nothing was written for any of them

    # A latent dataset is refused as --data, through the command line: one line, exit 1.
    latent = _fake_source(tmp_path, processed, kind="latents", dtype="float32")
    assert cli.main(["encode", "--data", latent, "--autoencoder", str(tiny_ae), "--output", out]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is a latent dataset already" in error


def test_a_registered_autoencoder_is_named_in_the_manifest(processed, tiny_ae, tmp_path, mlflow_server, ray_local):
    from pipelines import registry, tracking

    data, images, _, _ = processed
    uri = mlflow_server.uri
    run = tracking.client(uri).create_run(tracking.ensure_experiment("test-encode", uri))
    model_uri = registry.log_autoencoder(tiny_ae, run_id=run.info.run_id, tracking_uri=uri)
    version = registry.register(model_uri, "encode-ae", tags={}, tracking_uri=uri)
    output = str(tmp_path / "latents")
    manifest = encode(data, f"models:/encode-ae/{version}", output, num_actors=2, batch_size=CHUNK,
                      tracking_uri=uri, progress=None)
    assert manifest["autoencoder"]["uri"] == f"models:/encode-ae/{version}"
    assert (manifest["autoencoder"]["name"], manifest["autoencoder"]["version"]) == ("encode-ae", version)
    weights = (tiny_ae / autoencoder.WEIGHTS_FILE).read_bytes()
    assert manifest["autoencoder"]["sha256"] == hashlib.sha256(weights).hexdigest()
    by_key = latents_by_key(output)
    keys = sorted(images)
    np.testing.assert_array_equal(np.stack([by_key[k] for k in keys]),
                                  reference(tiny_ae, np.stack([images[k] for k in keys])))
    with pytest.raises(UserError, match="models:/no-such-ae/1") as info:  # a bad registry URI: one line, naming it
        encode(data, "models:/no-such-ae/1", str(tmp_path / "none"), tracking_uri=uri, progress=None)
    assert "\n" not in str(info.value) and not (tmp_path / "none").exists()


# -- outputs that would destroy data --------------------------------------------------------------------------------
def files(uri: str) -> dict[str, bytes]:
    return {e.key: storage.read_bytes(storage.join(uri, e.key)) for e in storage.list_files(uri)}


def test_an_output_that_is_the_input_or_another_kind_of_dataset_is_refused_and_nothing_is_deleted(
        processed, tiny_ae, tmp_path, ray_local, capsys):
    data = processed[0]
    raw = data.rsplit("/", 1)[0] + "/raw"
    kept = files(data)

    def refused(argv: list[str], message: str) -> None:
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err

    # encode onto its own --data (spelled with a trailing slash): its pixel shards would be deleted at the commit
    refused(["encode", "--data", data, "--autoencoder", str(tiny_ae), "--output", data + "/"],
            f"--output {data}/ is the --data of this run")
    assert files(data) == kept

    # a latent dataset as the --output of preprocess, and a processed one as the --output of encode's twin: refused
    latents = str(tmp_path / "latents")
    manifest = encode(data, str(tiny_ae), latents, num_actors=1, batch_size=CHUNK, progress=None)
    latent_files = files(latents)
    refused(["preprocess", "--input", raw, "--output", latents, "--resolution", str(SIZE)],
            f"--output {latents} holds latents (ddpm encode), which ddpm preprocess would replace")
    assert files(latents) == latent_files and read_manifest(latents) == manifest
    other = str(tmp_path / "other")
    storage.write_json(storage.join(other, "manifest.json"), {"format_version": 1, "kind": "ddpm-generated"})
    refused(["encode", "--data", data, "--autoencoder", str(tiny_ae), "--output", other],
            f"--output {other} holds generated images (ddpm generate), which ddpm encode would replace")
    assert sorted(files(other)) == ["manifest.json"]


# -- the autoencoder copy is committed with the manifest -----------------------------------------------------------
def test_a_run_that_dies_before_its_manifest_keeps_the_previous_latents_and_their_autoencoder_which_training_checks(
        processed, tiny_ae, tmp_path, ray_local, monkeypatch):
    from pipelines.data.dataset import autoencoder_copy
    from pipelines.train.driver import latent_autoencoder

    data = processed[0]
    output = str(tmp_path / "latents")
    first = encode(data, str(tiny_ae), output, num_actors=1, batch_size=CHUNK, progress=None)
    torch.manual_seed(1)  # another autoencoder: other weights, the same shapes
    other = autoencoder.save(tmp_path / "other-ae", Autoencoder(AutoencoderConfig.preset("tiny")))

    # The process dies the moment it would write manifest.json: after the shards and the autoencoder copy.
    write_json = storage.write_json

    def dies_at_the_manifest(uri, obj, endpoint_url=None):
        if uri.endswith("/manifest.json"):
            raise KeyboardInterrupt("killed")
        return write_json(uri, obj, endpoint_url)

    monkeypatch.setattr(storage, "write_json", dies_at_the_manifest)
    with pytest.raises(KeyboardInterrupt):
        encode(data, str(other), output, num_actors=1, batch_size=CHUNK, progress=None)
    monkeypatch.undo()

    # The manifest still names the first run's latents and, beside them, the autoencoder that made them.
    assert read_manifest(output) == first
    folder = autoencoder_copy(output, first)
    weights = storage.read_bytes(storage.join(folder, autoencoder.WEIGHTS_FILE))
    assert hashlib.sha256(weights).hexdigest() == first["autoencoder"]["sha256"]
    assert weights == (tiny_ae / autoencoder.WEIGHTS_FILE).read_bytes()
    assert latent_autoencoder(output, first)["uri"] == folder

    # A copy whose weights are not the manifest's (a damaged or hand-edited folder): training refuses it in one
    # line that names both hashes.
    wrong = (other / autoencoder.WEIGHTS_FILE).read_bytes()
    storage.write_bytes(storage.join(folder, autoencoder.WEIGHTS_FILE), wrong)
    with pytest.raises(UserError) as info:
        latent_autoencoder(output, first)
    message = str(info.value)
    assert "\n" not in message
    assert hashlib.sha256(wrong).hexdigest() in message and first["autoencoder"]["sha256"] in message


# -- one unit in every line ---------------------------------------------------------------------------------------
def test_progress_and_summary_count_source_images_per_second_with_flip(processed, tiny_ae, tmp_path, ray_local,
                                                                       monkeypatch):
    import re

    from pipelines.data import encode as encode_module

    data = processed[0]
    lines: list[str] = []
    monkeypatch.setattr(encode_module, "PROGRESS_EVERY_S", 0.0)  # a progress line for every shard but the last
    encode(data, str(tiny_ae), str(tmp_path / "latents"), num_actors=1, batch_size=CHUNK, flip=True,
           shard_rows=CHUNK, progress=lines.append)
    progress = [line for line in lines if re.search(r"\d+/\d+ images", line)]
    assert progress and all(f"/{COUNT} images" in line for line in progress), lines
    summary = lines[-1]
    found = re.search(r"(\d+) images in ([\d.]+) s: ([\d.,]+) images/s", summary)
    assert found, summary
    images, seconds, rate = int(found[1]), float(found[2]), float(found[3].replace(",", ""))
    assert images == COUNT and f"{2 * COUNT} latents" in summary
    assert rate == pytest.approx(COUNT / seconds, rel=0.1)  # of source images: mirrors would make it twice as much
