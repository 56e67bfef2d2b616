"""Generation at cluster scale (pipelines.generate) and evaluation at scale (pipelines.evaluate.features), on
real components: a local Ray with Ray Data actor pools, S3 served by moto, and the engine that ``POST /generate`` runs.

A tiny class-conditional U-Net (8x8x1, ten classes) and a few DDIM steps: what is under test is the bookkeeping
(seeds, shards, commits, resumption, partial sums, the cache) and that every path gives the same bytes.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint, encode_png, from_labels, generate_images, image_seeds
from pipelines import cli, storage
from pipelines.errors import UserError
from pipelines.generate.batch import generate_to
from pipelines.generate.job import Labels, Plan, Sampling
from pipelines.generate.model_source import ModelSource
from pipelines.generate.shards import image_digests, images_fingerprint, parquet_shard

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
CLASSES = 10


def save_tiny(path: Path, *, seed: int = 0, num_classes: int = CLASSES, **overrides) -> Path:
    torch.manual_seed(seed)
    net = UNet(UNetConfig.preset("tiny", num_classes=num_classes, **overrides))
    return checkpoint.save(path, net, NoiseSchedule.linear(1000), class_names=[str(c) for c in range(num_classes)])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny")


def read_pngs(output: str, seeds: list[int]) -> tuple[np.ndarray, list[bytes]]:
    """The PNG files of ``seeds`` under ``output``: decoded (N, H, W, 1) uint8, and their bytes."""
    files = [storage.read_bytes(storage.join(output, "images", f"seed-{s:06d}.png")) for s in seeds]
    return np.stack([np.asarray(Image.open(io.BytesIO(f)))[..., None] for f in files]), files


def single_process(path: Path, seed: int, n: int, labels) -> np.ndarray:
    """What ``ddpm generate --out images.npz`` computes: the core's one path in this process."""
    return generate_images(checkpoint.load(path), image_seeds(seed, n), condition=from_labels(labels, n),
                           steps=STEPS)


# -- the pixels ---------------------------------------------------------------------------------------------------
def test_two_actors_write_to_s3_the_bytes_of_the_endpoint_and_of_one_process(ray_local, bucket, tiny):
    from deploy.engine import Job, Queued, ServedModel, run_batch

    output, seed, n = f"s3://{bucket}/samples", 1000, 20
    source = ModelSource.resolve(str(tiny))
    logs: list[str] = []
    manifest = generate_to(output, source, Plan(seed, n, shard_images=6), Sampling("ddim", STEPS),
                           Labels.balanced(CLASSES), num_actors=2, progress=False, log=logs.append)

    keys = {e.key for e in storage.list_files(output)}
    assert keys == ({"job.json", "manifest.json"} | {f"images/seed-{s:06d}.png" for s in range(seed, seed + n)}
                    | {f"shards/shard-{j:06d}.json" for j in range(4)})  # shards of 6, 6, 6 and 2 images
    assert any("with 2 actor(s)" in line for line in logs), logs
    images, files = read_pngs(output, image_seeds(seed, n))

    # Single-process generation: every image, bit for bit; the manifest's fingerprint is the array's.
    expected = single_process(tiny, seed, n, np.arange(n) % CLASSES)
    np.testing.assert_array_equal(images, expected)
    assert manifest["fingerprint"] == images_fingerprint(expected)
    assert manifest["seeds"] == {"first": seed, "count": n, "last": seed + n - 1}
    assert manifest["sampling"] == {"sampler": "ddim", "steps": STEPS, "eta": 0.0, "guidance_scale": 1.0,
                                    "forward_rows": 16}
    assert manifest["model"]["sha256"] == source.sha256 and manifest["counts"]["per_class"]["0"] == 2

    # The endpoint's engine (what POST /generate runs), one request per image, alone and batched together.
    served = ServedModel(checkpoint.load(tiny), torch.device("cpu"), None, None, None)
    picks = [0, 7, 13, 19]  # in different shards, so made by either actor
    jobs = [Queued(Job(1, "ddim", STEPS, 0.0, seed + i, i % CLASSES, 1.0), time.monotonic()) for i in picks]
    for together in (run_batch(served, jobs, 16), [run_batch(served, [job], 16)[0] for job in jobs]):
        for i, generated in zip(picks, together):
            np.testing.assert_array_equal(generated.images[0], images[i])
            assert encode_png(generated.images[0]) == files[i]  # the very bytes of the file


def test_parquet_shards_are_a_dataset_with_the_fingerprint_of_the_pixels(ray_local, tmp_path, tiny):
    from pipelines.data.dataset import load_numpy, read_columns

    output, seed, n = str(tmp_path / "parquet"), 2**32 - 3, 10  # the seeds wrap: 2^32-3 .. 2^32-1, 0 .. 6
    manifest = generate_to(output, ModelSource.resolve(str(tiny)), Plan(seed, n, shard_images=4),
                           Sampling("ddim", STEPS), Labels.one(3), fmt="parquet", num_actors=1,
                           progress=False, log=lambda _: None)
    images, labels = load_numpy(output)  # the dataset reader that training and evaluation use
    expected = single_process(tiny, seed, n, 3)
    np.testing.assert_array_equal(images, expected)
    assert labels.tolist() == [3] * n and manifest["fingerprint"] == images_fingerprint(expected)
    seeds = read_columns(output, manifest["shards"], ["seed", "key"], None)
    assert seeds["seed"].to_pylist() == image_seeds(seed, n) and seeds["key"][3].as_py() == "seed-000000"


# -- failures and resumption --------------------------------------------------------------------------------------
def test_a_killed_actor_is_restarted_its_shard_retried_and_reruns_regenerate_only_what_is_missing(ray_local, bucket,
                                                                                                    tiny):
    import psutil
    import ray

    output, n = f"s3://{bucket}/resume", 40
    source = ModelSource.resolve(str(tiny))
    plan, sampling, labels = Plan(0, n, shard_images=4), Sampling("ddim", 50), Labels.balanced(10)
    result: dict = {}

    def first_run() -> None:
        try:
            result["manifest"] = generate_to(output, source, plan, sampling, labels, num_actors=2,
                                             progress=False, log=lambda _: None)
        except Exception as exc:  # kept, and asserted below: the run must not end in an error
            result["error"] = exc

    def commits() -> set[str]:
        return {e.key for e in storage.list_files(output) if e.key.startswith("shards/")}

    # This session's raylet's children only: other Ray sessions may run on the machine.
    raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)

    def samplers() -> dict[int, psutil.Process]:
        found = {}
        for p in raylet.children(recursive=True):
            try:
                if "ShardSampler" in " ".join(p.cmdline()):
                    found[p.pid] = p
            except psutil.NoSuchProcess:
                pass
        return found

    run = threading.Thread(target=first_run)
    run.start()
    deadline = time.monotonic() + 180
    while not commits() and run.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    before = samplers()
    at_kill = len(commits())
    assert len(before) == 2 and 0 < at_kill < plan.num_shards, (before, at_kill)
    killed = min(before)
    before[killed].kill()  # SIGKILL, mid-run
    replaced = False
    while run.is_alive() and not replaced:  # Ray restarts the actor: a new ShardSampler process appears
        replaced = bool(set(samplers()) - set(before))
        time.sleep(0.05)
    run.join(timeout=300)
    assert not run.is_alive()

    # The first run completes by itself: the killed actor's shard is retried, on the restarted actor or the other.
    assert "error" not in result, result.get("error")
    assert replaced, "no new sampler actor process appeared after the kill"
    expected = single_process_at(tiny, n, sampling.steps)
    np.testing.assert_array_equal(read_pngs(output, list(range(n)))[0], expected)
    manifest = result["manifest"]
    assert manifest["fingerprint"] == images_fingerprint(expected)
    assert commits() == {f"shards/shard-{j:06d}.json" for j in range(plan.num_shards)}

    # A rerun of the complete job does nothing.
    logs: list[str] = []
    assert generate_to(output, source, plan, sampling, labels, num_actors=2, progress=False,
                       log=logs.append)["fingerprint"] == manifest["fingerprint"]
    assert any("is complete already" in line for line in logs), logs

    # A shard that lost its commit and one that lost an image: those two are made again, and only those.
    s3_delete(output, "shards/shard-000002.json")
    s3_delete(output, "images/seed-000037.png")  # in shard 9
    logs.clear()
    again = generate_to(output, source, plan, sampling, labels, num_actors=1, progress=False, log=logs.append)
    assert any("8 of 10 shards already" in line and "generating 8 images in 2 shards" in line for line in logs), logs
    assert again["fingerprint"] == manifest["fingerprint"]
    np.testing.assert_array_equal(read_pngs(output, list(range(8, 12)) + [37])[0], expected[[8, 9, 10, 11, 37]])

    # Another job in the same place is refused before any work, naming what differs.
    with pytest.raises(UserError, match="another job .*seeds differ"):
        generate_to(output, source, Plan(5, n, 4), sampling, labels, progress=False, log=lambda _: None)


def single_process_at(path: Path, n: int, steps: int) -> np.ndarray:
    labels = from_labels(np.arange(n) % CLASSES, n)
    return generate_images(checkpoint.load(path), image_seeds(0, n), condition=labels, steps=steps)


def s3_delete(output: str, key: str) -> None:
    fs, path = storage.filesystem_for(storage.join(output, key))
    fs.delete_file(path)


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/model"], "/nonexistent/model: no such"),
    (["--output", "s3://no-such-bucket-here/x"], "s3://no-such-bucket-here/x: the bucket does not exist"),
    (["--labels", "balanced", "--model", "UNCONDITIONAL"], "--labels: this model is unconditional"),
    (["--class-label", "10"], "--class-label: unknown class 10; this model has classes 0..9"),
    (["--format", "png", "--model", "TWO_CHANNELS"], "--format png: this model makes 2-channel images"),
    (["--output", "grid.jpg"], "--out grid.jpg: a file name must end in .png"),
])
def test_bad_input_is_one_line_before_any_actor_starts(argv, message, s3, tiny, tmp_path, capsys):
    models = {"UNCONDITIONAL": save_tiny(tmp_path / "unconditional", num_classes=0),
              "TWO_CHANNELS": save_tiny(tmp_path / "two", in_channels=2)}
    flags = {"--model": str(tiny), "--output": str(tmp_path / "out")}
    pairs = dict(zip(argv[::2], argv[1::2]))
    flags |= {k: str(models.get(v, v)) for k, v in pairs.items()}
    args = [a for k, v in flags.items() for a in (k, v)]
    assert cli.main(["generate", "--num-images", "4", "--steps", "2", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "images").exists()


def test_an_output_holding_a_dataset_or_the_model_itself_is_refused_and_left_as_it_was(tiny, tmp_path, capsys):
    processed = tmp_path / "processed"
    storage.write_json(str(processed / "manifest.json"), {"format_version": 1, "image_shape": [8, 8, 1],
                                                          "shards": ["data-1/part-0.parquet"]})
    storage.write_bytes(str(processed / "data-1" / "part-0.parquet"), b"pixels")
    for output, message in ((processed, f"--output {processed} holds processed images (ddpm preprocess), which "
                                        f"ddpm generate would replace"),
                            (tiny, f"--output {tiny} is the --model of this run")):
        before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
        argv = ["generate", "--model", str(tiny), "--num-images", "4", "--steps", "2", "--output", str(output)]
        assert cli.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before


# -- evaluation at scale ------------------------------------------------------------------------------------------
def test_evaluate_at_scale_matches_in_process_and_reads_the_cached_reference_the_second_time(ray_local, bucket,
                                                                                           tmp_path):
    import json

    from pipelines.evaluate.quality import EvalSettings, evaluate, load_data

    # The digits at 8x8, written as a preprocessed dataset in the bucket (the reader's format).
    images, labels = load_data("digits", 8)
    data = f"s3://{bucket}/digits"
    storage.write_bytes(storage.join(data, "data", "shard-000000.parquet"),
                        parquet_shard(images, list(range(len(images))), labels.tolist(), image_digests(images)))
    storage.write_json(storage.join(data, "manifest.json"),
                       {"format_version": 1, "image_shape": [8, 8, 1], "shards": ["data/shard-000000.parquet"],
                        "class_names": [str(c) for c in range(CLASSES)], "fingerprint": "digits-8",
                        "counts": {"rows": len(images)}})
    model = save_tiny(tmp_path / "model", seed=1)
    settings = EvalSettings(num_samples=64, steps=STEPS)

    runs = []
    for i in range(2):
        logs: list[str] = []
        (evaluation,), _ = evaluate(str(model), data, settings, num_actors=2, out=tmp_path / f"scale{i}",
                                    log=logs.append)
        runs.append((evaluation, logs))
    (first, first_logs), (second, second_logs) = runs
    assert sum("on feature actors" in line for line in first_logs) == 2, first_logs  # reference and held-out
    assert not any("on feature actors" in line for line in second_logs), second_logs
    assert sum("from the cache in s3://" in line for line in second_logs) == 2, second_logs
    cached = sorted(e.key for e in storage.list_files(storage.join(data, "_stats")))
    assert len(cached) == 2 and all(k.endswith(".npz") and "-n64." in k for k in cached), cached
    assert {k: v for k, v in first.metrics.items() if k != "images_per_s"} == \
        {k: v for k, v in second.metrics.items() if k != "images_per_s"}

    # In this process, the same seeds, labels and pixels: the same numbers, up to rounding (the moments are summed
    # in another order, and a covariance of 64 points in 64 dimensions is singular, which the matrix root amplifies).
    (local,), _ = evaluate(str(model), data, settings, out=tmp_path / "local", log=lambda _: None)
    for key, value in local.metrics.items():
        if key != "images_per_s":
            assert first.metrics[key] == pytest.approx(value, rel=1e-6), key
    np.testing.assert_array_equal(first.images, local.images[:len(first.images)])

    written = json.loads((tmp_path / "scale0" / "evaluation.json").read_text())[0]
    assert written["n"] == {"samples": 64, "reference": 64, "held_out": 64, "precision_recall": 64}
    assert "biased" in written["warnings"][0]
