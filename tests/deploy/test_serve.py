"""Serve over real HTTP: /generate and /inpaint, bad input, the API key, batching, autoscaling, alias swaps, and
``ddpm serve``. The engine without Ray is tested in test_engine.py, the configs and schemas in test_schemas.py.

The HTTP tests share one Serve instance on 127.0.0.1 (module fixture) running two applications:

- ``/reg``: a class-conditional tiny model registered in a real MLflow server and followed through
  ``models:/serve-test@production`` (alias poll every 0.5 s), with autoscaling delays of a second or two;
- ``/plain``: an unconditional tiny checkpoint folder behind an API key;
- ``/latent``: a latent model (a U-Net on 4x8x8 latents carrying the ``tiny`` f = 4 autoencoder), which serves
  32x32 RGB pixels.

The tiny models predict x_0 (``prediction_type="sample"``): with random weights an epsilon model drives every pixel
to 0 or 255, which would make "identical bytes" hold trivially; an x_0 model gives images with ~170 grey levels.
Serve is shut down at the end; the session's Ray stays up.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import http.client
import io
import json
import shutil
import socket
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint, make_grid
from pipelines.cli import main as cli_main
from tests.support import free_port, start_local_ray, wait_http

# Serve 2.60 warns that a look-back window under its (deprecated) 10 s metrics interval will be an error one day;
# today the 1 s window of /reg is what lets a test see the replica count rise and fall within seconds.
pytestmark = pytest.mark.filterwarnings("ignore:`look_back_period_s`:FutureWarning")

MODEL = "serve-test"
API_KEY = "test-key-3f9a"
TIMEOUT = 60  # seconds, for any single HTTP call


def save_tiny(path: Path, seed: int, num_classes: int = 0) -> Path:
    torch.manual_seed(seed)
    model = UNet(UNetConfig.preset("tiny", num_classes=num_classes))
    schedule = NoiseSchedule.linear(num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    return checkpoint.save(path, model, schedule, prediction_type="sample", class_names=["a", "b", "c"][:num_classes])


def save_tiny_latent(path: Path, seed: int) -> Path:
    """A latent model: a U-Net on 4x8x8 latents predicting x_0, with the ``tiny`` autoencoder (f = 4) it decodes with."""
    from ddpm import Autoencoder, AutoencoderConfig

    torch.manual_seed(seed)
    ae = Autoencoder(AutoencoderConfig.preset("tiny"))
    model = UNet(UNetConfig.preset("tiny", in_channels=4))
    schedule = NoiseSchedule.linear(num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    return checkpoint.save(path, model, schedule, prediction_type="sample", autoencoder=ae,
                           autoencoder_source={"uri": "tiny"})


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


# -- the application over HTTP --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registry(mlflow_server, tmp_path_factory):
    """``serve-test`` versions 1 and 2 (conditional, different weights) in the MLflow server; production -> 1."""
    from pipelines import registry, tracking

    root = tmp_path_factory.mktemp("models")
    client = tracking.client(mlflow_server.uri)
    experiment = tracking.ensure_experiment("serve-test", mlflow_server.uri)
    versions = []
    for seed in (1, 2):
        run_id = client.create_run(experiment).info.run_id
        uri = registry.log_model(save_tiny(root / f"v{seed}", seed, num_classes=3), run_id=run_id,
                                 tracking_uri=mlflow_server.uri)
        versions.append(registry.register(uri, MODEL, tags={"weights_seed": str(seed)}, tracking_uri=mlflow_server.uri))
    registry.promote(MODEL, versions[0], "production", mlflow_server.uri)
    yield mlflow_server.uri, versions
    # The replicas cached the downloads under the data folder they share with this process; remove them.
    cached = registry.resolve_model(f"models:/{MODEL}/{versions[0]}", tracking_uri=mlflow_server.uri).path
    models_root = tracking.home() / "models"
    shutil.rmtree(models_root / cached.relative_to(models_root).parts[0], ignore_errors=True)


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    """Serve on a free port with the /reg and /plain applications; shut down after the module."""
    from ray import serve

    from deploy.serve_app import build_app

    tracking_uri, _ = registry
    start_local_ray()  # the session's Ray (what ray_local yields, which a module fixture cannot request)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"num_cpus": 0.25, "batch_wait_timeout_s": 0.1, "max_cost": 5000}
    serve.run(build_app(common | {
        "model_uri": f"models:/{MODEL}@production", "tracking_uri": tracking_uri, "poll_interval_s": 0.5,
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 0.5,
        "downscale_delay_s": 2, "look_back_period_s": 1,
    }), name="reg", route_prefix="/reg")
    plain = save_tiny(tmp_path_factory.mktemp("plain") / "ckpt", seed=3)
    serve.run(build_app(common | {"model_uri": str(plain), "api_key": API_KEY}), name="plain", route_prefix="/plain")
    latent = save_tiny_latent(tmp_path_factory.mktemp("latent") / "ckpt", seed=4)
    serve.run(build_app(common | {"model_uri": str(latent)}), name="latent", route_prefix="/latent")
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/reg/healthz")
    yield base
    serve.shutdown()


def generate(url: str, headers: dict | None = None, **body) -> requests.Response:
    return requests.post(url, json=body, headers=headers, timeout=TIMEOUT)


def test_png_and_json_decode_to_the_models_shape(server):
    info = requests.get(f"{server}/reg/v1/model", timeout=TIMEOUT).json()
    assert (info["name"], info["alias"], info["resolution"], info["channels"]) == (MODEL, "production", 8, 1)
    assert info["classes"] == ["a", "b", "c"] and set(info["samplers"]) == {"ddpm", "ddim", "dpm++"}

    r = generate(f"{server}/reg/generate", num_images=5, steps=4, seed=11, class_label=1)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["X-Seed"] == "11" and r.headers["X-Model-Version"] == info["version"]
    expected = make_grid(np.zeros((5, 8, 8, 1), np.uint8)).shape[:2]  # 3 x 2 tiles with 1-pixel borders
    assert png_array(r.content).shape == expected

    r = generate(f"{server}/reg/generate", num_images=3, steps=4, seed=2**32 - 2, output="json", sampler="dpm++")
    assert r.status_code == 200
    body = r.json()
    assert body["seeds"] == [2**32 - 2, 2**32 - 1, 0], "seeds wrap around mod 2^32"
    assert body["model"] == {"name": MODEL, "version": info["version"], "alias": "production"}
    assert {"queue", "sample", "encode", "total"} <= set(body["timings_ms"])
    for image in body["images"]:
        assert png_array(base64.b64decode(image)).shape == (8, 8)


def test_every_path_returns_the_same_pixels(server, registry, tmp_path):
    """One model, seed and settings through the four doors: POST /generate, ``ddpm generate``, the MLflow pyfunc
    model and ``ddpm evaluate``'s samples give the same uint8 pixels, bit for bit (all four call
    ``ddpm.generate_images`` with the endpoint's default micro_batch as their forward rows). The seed wraps mod 2^32
    and guidance is on, so both the seed rule and the doubled forward batch are covered."""
    import mlflow

    from ddpm import checkpoint
    from pipelines.evaluate.quality import EvalSettings, Reference, evaluate_model
    from pipelines.registry import resolve_model

    tracking_uri, _ = registry
    version = requests.get(f"{server}/reg/v1/model", timeout=TIMEOUT).json()["version"]
    seed, n, settings = 2**32 - 2, 4, {"steps": 5, "class_label": 1, "guidance_scale": 1.5, "sampler": "ddim"}

    # 1. the endpoint, over HTTP
    r = generate(f"{server}/reg/generate", num_images=n, seed=seed, output="json", **settings)
    assert r.status_code == 200, r.text
    via_http = np.stack([png_array(base64.b64decode(image)) for image in r.json()["images"]])[..., None]

    # 2. the command line
    out = tmp_path / "images.npz"
    assert cli_main(["generate", "--model", f"models:/{MODEL}/{version}", "--tracking-uri", tracking_uri,
                     "--num-images", str(n), "--seed", str(seed), "--steps", "5", "--class-label", "1",
                     "--guidance-scale", "1.5", "--sampler", "ddim", "--out", str(out)]) == 0
    via_cli = np.load(out)["images"]

    # 3. the MLflow pyfunc model
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracking_uri), mlflow.set_registry_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version}")
        via_pyfunc = model.predict([{"seed": seed, "num_images": n, **settings}])
    finally:
        mlflow.set_tracking_uri(previous[0]), mlflow.set_registry_uri(previous[1])

    # 4. the evaluation's samples (a reference whose labels are all class 1; the scores themselves do not matter)
    loaded = checkpoint.load(resolve_model(f"models:/{MODEL}/{version}", tracking_uri=tracking_uri).path)
    features = lambda images: images.reshape(len(images), -1)[:, :3].astype(np.float64)  # noqa: E731
    reference = Reference("fingerprint", "classifier", 1.0, np.ones(n, dtype=np.int64), {"fd_cls": features},
                          {"fd_cls": np.random.default_rng(0).normal(size=(n, 3))}, {"fd_cls": 1.0})
    evaluation = evaluate_model(loaded, reference, EvalSettings(num_samples=n, sampler="ddim", steps=5,
                                                                guidance_scale=1.5, seed=seed), log=lambda _: None)

    assert via_http.shape == (n, 8, 8, 1) and via_http.dtype == np.uint8
    assert len(np.unique(via_http)) > 20  # real images (an x_0 model with random weights), not a constant
    for name, images in [("ddpm generate", via_cli), ("pyfunc", via_pyfunc), ("evaluate", evaluation.images)]:
        np.testing.assert_array_equal(images, via_http, err_msg=f"{name} differs from POST /generate")


def test_random_seed_is_returned_and_reproduces(server):
    first = generate(f"{server}/reg/generate", num_images=2, steps=3)
    again = generate(f"{server}/reg/generate", num_images=2, steps=3, seed=int(first.headers["X-Seed"]))
    assert first.content == again.content


def test_same_seed_gives_the_same_bytes_alone_and_batched(server):
    url = f"{server}/reg/generate"
    settings = {"steps": 6, "class_label": 2, "sampler": "ddim", "eta": 0.5}  # eta > 0: per-step noise too
    alone = generate(url, num_images=4, seed=1234, **settings)
    assert alone.status_code == 200

    # The same request among others with the same settings (and one that cannot share their batch), sent at once.
    others = [dict(num_images=n, seed=s, **settings) for n, s in [(3, 1), (7, 2), (1, 3), (5, 4)]]
    others.append(dict(num_images=2, seed=5, steps=6))
    for _ in range(3):  # a burst normally batches at once; retry if the scheduler split this one out
        with cf.ThreadPoolExecutor(len(others) + 1) as pool:
            mine = pool.submit(generate, url, num_images=4, seed=1234, **settings)
            list(pool.map(lambda body: generate(url, **body), others))
            batched = mine.result()
        if int(batched.headers["X-Batch-Requests"]) > 1:
            break
    assert int(batched.headers["X-Batch-Requests"]) > 1, "the burst was never batched"
    assert int(batched.headers["X-Batch-Images"]) > 4
    assert batched.content == alone.content

    # Per-image seeds: image i of a request is the image of seed + i requested on its own.
    grid = generate(url, num_images=3, seed=500, output="json", **settings).json()["images"]
    single = generate(url, num_images=1, seed=502, output="json", **settings).json()["images"]
    assert grid[2] == single[0] and grid[0] != grid[1]


@pytest.mark.parametrize("body, field", [
    ({"num_images": "4"}, "num_images"),
    ({"num_images": 4.0}, "num_images"),
    ({"num_images": 0}, "num_images"),
    ({"num_images": 65}, "num_images"),
    ({"sampler": "euler"}, "sampler"),
    ({"steps": 0}, "steps"),
    ({"steps": 1001}, "steps"),
    ({"eta": -0.1}, "eta"),
    ({"eta": 2.3e154}, "eta"),  # found by schemathesis: sigma**2 overflowed, a 500
    ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"),
    ({"class_label": 3}, "class_label"),
    ({"class_label": -1}, "class_label"),
    ({"class_label": "a"}, "class_label"),
    ({"guidance_scale": -1.0, "class_label": 0}, "guidance_scale"),
    ({"guidance_scale": 2.0}, "guidance_scale"),
    ({"output": "gif"}, "output"),
    ({"colour": "red"}, "colour"),
    ({"num_images": 64, "steps": 100}, "steps"),  # 6,400 image-steps > the budget of 5,000
    ({"sampler": "ddpm", "num_images": 6}, "steps"),  # DDPM's default 1,000 steps: 6,000 > 5,000
    ({"num_images": 40, "steps": 100, "class_label": 0, "guidance_scale": 2.0}, "steps"),  # guided: 2 x 4,000 rows
])
def test_bad_input_is_a_422_naming_the_field(server, body, field):
    r = generate(f"{server}/reg/generate", **body)
    assert r.status_code == 422, r.text
    assert field in {str(part) for error in r.json()["detail"] for part in error["loc"]}, r.text


@pytest.mark.parametrize("data", ["{not json", "[1, 2]", '"a string"'])
def test_malformed_json_is_a_422(server, data):
    r = requests.post(f"{server}/reg/generate", data=data, headers={"Content-Type": "application/json"},
                      timeout=TIMEOUT)
    assert r.status_code == 422, r.text


def test_class_label_on_an_unconditional_model_is_a_422(server):
    r = generate(f"{server}/plain/generate", headers={"Authorization": f"Bearer {API_KEY}"}, class_label=0, steps=2)
    assert r.status_code == 422 and "unconditional" in r.text


@pytest.mark.parametrize("app", ["plain", "reg"])
def test_a_prompt_to_a_model_without_a_text_encoder_is_a_422(server, app):
    r = generate(f"{server}/{app}/generate", headers={"Authorization": f"Bearer {API_KEY}"}, prompt="a red circle",
                 steps=2)
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "prompt"] and "no text encoder" in error["msg"]
    assert "takes_prompt" not in r.text and requests.get(f"{server}/{app}/v1/model", headers={
        "Authorization": f"Bearer {API_KEY}"}, timeout=TIMEOUT).json()["takes_prompt"] is False


def test_api_key_guards_every_route_but_healthz(server):
    plain, good = f"{server}/plain", {"Authorization": f"Bearer {API_KEY}"}
    assert requests.get(f"{plain}/healthz", timeout=TIMEOUT).status_code == 200
    for headers in [None, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"X-Api-Key": API_KEY}]:
        assert requests.get(f"{plain}/v1/model", headers=headers, timeout=TIMEOUT).status_code == 401
        assert generate(f"{plain}/generate", headers=headers, steps=2).status_code == 401
        assert requests.get(f"{plain}/openapi.json", headers=headers, timeout=TIMEOUT).status_code == 401
    assert requests.get(f"{plain}/v1/model", headers=good, timeout=TIMEOUT).json()["num_classes"] == 0
    r = generate(f"{plain}/generate", headers=good, steps=2, num_images=1)
    assert r.status_code == 200 and "X-Model-Version" not in r.headers  # a plain folder has no version
    assert API_KEY not in r.text and all(API_KEY not in v for v in r.headers.values())


def test_a_latent_model_serves_decoded_pixels(server, tmp_path):
    """The endpoint of a latent model answers in pixels: its latents decoded by the autoencoder it carries, the same
    bytes as the core's generation path; /inpaint keeps the known pixels exactly."""
    from ddpm import generate_images

    info = requests.get(f"{server}/latent/v1/model", timeout=TIMEOUT).json()
    assert (info["resolution"], info["channels"], info["latent"]) == (32, 3, True)
    r = generate(f"{server}/latent/generate", num_images=3, steps=4, seed=21, output="json")
    assert r.status_code == 200, r.text
    served = np.stack([png_array(base64.b64decode(image)) for image in r.json()["images"]])  # (3, 32, 32, 3)
    local = generate_images(checkpoint.load(save_tiny_latent(tmp_path / "same", seed=4)), [21, 22, 23], steps=4)
    assert served.shape == (3, 32, 32, 3) and np.array_equal(served, local)

    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[6:19, 10:27] = 255  # not aligned to the latents' 4x4 cells
    r = requests.post(f"{server}/latent/inpaint", json={"image": b64png(pixels), "mask": b64png(mask), "steps": 4,
                                                         "num_images": 2, "seed": 3, "output": "json"},
                      timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    keep = mask == 0
    for image in r.json()["images"]:
        result = png_array(base64.b64decode(image))
        assert np.array_equal(result[keep], pixels[keep]) and not np.array_equal(result[~keep], pixels[~keep])


def test_a_latent_models_budget_counts_its_decoder(server):
    """64 images x 78 steps = 4,992 U-Net rows fit the budget of 5,000, but each image is also decoded (several rows'
    worth of FLOPs, shown by GET /v1/model): refused, naming steps, before anything runs."""
    info = requests.get(f"{server}/latent/v1/model", timeout=TIMEOUT).json()
    assert info["max_cost"] == 5000 and info["autoencoder_rows"]["decode"] > 1
    r = generate(f"{server}/latent/generate", num_images=64, steps=78)
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "steps"] and "to decode the latents" in error["msg"]


# -- POST /inpaint ------------------------------------------------------------------------------------------------
def b64png(pixels) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


PIXELS = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)  # the served models' 8x8 grey
RIGHT_HALF = np.zeros((8, 8), np.uint8)
RIGHT_HALF[:, 4:] = 255  # white = generate


def inpaint(url: str, headers: dict | None = None, **body) -> requests.Response:
    body = {"image": b64png(PIXELS), "mask": b64png(RIGHT_HALF), "steps": 4, "resample_times": 2} | body
    return requests.post(f"{url}/inpaint", json=body, headers=headers, timeout=TIMEOUT)


def test_inpaint_keeps_the_known_pixels_as_png_and_json(server):
    keep = RIGHT_HALF == 0
    r = inpaint(f"{server}/reg", num_images=3, seed=5, class_label=1, sampler="ddpm", output="json")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seeds"] == [5, 6, 7] and body["model"]["alias"] == "production"
    results = [png_array(base64.b64decode(image)) for image in body["images"]]
    for result in results:
        assert result.shape == (8, 8)
        assert np.array_equal(result[keep], PIXELS[keep])  # kept pixels come back bit for bit (uint8 in, uint8 out)
        assert not np.array_equal(result[~keep], PIXELS[~keep])
    assert not np.array_equal(results[0], results[1])  # one result per seed

    r = inpaint(f"{server}/reg", num_images=3, seed=5, class_label=1, sampler="ddpm")  # output png: one grid
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.headers["X-Seed"] == "5"
    grid = png_array(r.content)
    assert np.array_equal(grid, make_grid(np.stack(results)[..., None])[..., 0])  # the same images, tiled


def test_inpaint_resizes_only_when_asked(server):
    big = np.full((16, 16, 3), 200, np.uint8)  # RGB, converted to the model's grey
    mask = np.kron(RIGHT_HALF, np.ones((2, 2), np.uint8))  # (16, 16)
    r = inpaint(f"{server}/reg", image=b64png(big), mask=b64png(mask))
    assert r.status_code == 422
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "image"] and "16x16 but the model expects 8x8" in error["msg"]
    assert "resize" in error["msg"]

    r = inpaint(f"{server}/reg", image=b64png(big), mask=b64png(mask), resize=True, num_images=1, output="json")
    assert r.status_code == 200, r.text
    result = png_array(base64.b64decode(r.json()["images"][0]))
    assert result.shape == (8, 8) and (result[:, :4] == 200).all()


def _png_bytes_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.mark.parametrize("body, field", [
    ({"mask": b64png(np.full((8, 6), 255))}, "mask"),  # not the image's size
    ({"mask": b64png(RIGHT_HALF // 2)}, "mask"),  # grey levels, not black and white
    ({"mask": b64png(np.zeros((8, 8)))}, "mask"),  # all black: nothing to generate
    ({"mask": None}, "mask"),
    ({"image": b64png(np.zeros((6, 6)))}, "mask"),  # a mismatch names the mask, as `ddpm inpaint` does
    ({"image": "not base64!"}, "image"),
    ({"image": _png_bytes_b64(b"GIF89a, or is it?")}, "image"),
    ({"image": b64png(np.zeros((12, 12))), "mask": b64png(np.full((12, 12), 255))}, "image"),  # not the model's size
    ({"resample_times": 0}, "resample_times"),
    ({"resample_times": 2, "resample_jumps": 4}, "resample_jumps"),  # j must be < steps = 4
    ({"num_images": 16, "steps": 50, "resample_times": 10}, "resample_times"),  # 16 * 491 > the budget of 5,000
    ({"class_label": 3}, "class_label"),
    ({"resize": "yes"}, "resize"),
    ({"colour": "red"}, "colour"),
])
def test_inpaint_bad_input_is_a_422_naming_the_field(server, body, field):
    r = inpaint(f"{server}/reg", **body)
    assert r.status_code == 422, r.text
    assert field in {str(part) for error in r.json()["detail"] for part in error["loc"]}, r.text


def test_inpaint_needs_the_api_key(server):
    assert inpaint(f"{server}/plain").status_code == 401
    r = inpaint(f"{server}/plain", headers={"Authorization": f"Bearer {API_KEY}"}, num_images=1)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


# -- POST /edit -----------------------------------------------------------------------------------------------------
def edit(url: str, headers: dict | None = None, **body) -> requests.Response:
    body = {"image": b64png(PIXELS), "steps": 4, "output": "json"} | body
    return requests.post(f"{url}/edit", json=body, headers=headers, timeout=TIMEOUT)


def images_of(r: requests.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.stack([png_array(base64.b64decode(image)) for image in r.json()["images"]])  # (N, 8, 8)


def test_edit_redraws_the_image_as_the_command_line_does(server, registry, tmp_path):
    """/edit (SDEdit) gives the bytes ``ddpm edit`` writes for the same seed and settings. Strength 1 starts from pure
    noise, so the image does not matter; lower, it does (that the result stays nearer the image the lower the
    strength is measured on an exact denoiser in tests/ddpm/test_edit.py: these weights are random). With a mask, the
    rest of the image comes back exactly."""
    r = edit(f"{server}/reg", num_images=2, seed=8, class_label=2, strength=0.5)
    via_http, version = images_of(r), r.json()["model"]["version"]
    (tmp_path / "in.png").write_bytes(base64.b64decode(b64png(PIXELS)))
    for i, seed in enumerate((8, 9)):
        out = tmp_path / f"{seed}.png"
        assert cli_main(["edit", "--model", f"models:/{MODEL}/{version}", "--tracking-uri", registry[0],
                         "--image", str(tmp_path / "in.png"), "--steps", "4", "--seed", str(seed),
                         "--class-label", "2", "--strength", "0.5", "--out", str(out)]) == 0
        assert np.array_equal(png_array(out.read_bytes()), via_http[i])

    other = b64png(255 - PIXELS)
    assert np.array_equal(images_of(edit(f"{server}/reg", seed=8, strength=1.0)),
                          images_of(edit(f"{server}/reg", seed=8, strength=1.0, image=other)))
    assert not np.array_equal(images_of(edit(f"{server}/reg", seed=8, strength=0.5)),
                              images_of(edit(f"{server}/reg", seed=8, strength=0.5, image=other)))

    masked = images_of(edit(f"{server}/reg", seed=8, strength=0.5, mask=b64png(RIGHT_HALF)))
    keep = RIGHT_HALF == 0
    assert all(np.array_equal(image[keep], PIXELS[keep]) for image in masked)


@pytest.mark.parametrize("body, field", [
    ({"strength": 0}, "strength"),
    ({"strength": 1.5}, "strength"),
    ({"strength": "0.5"}, "strength"),
    ({"image": None}, "image"),
    ({"mask": b64png(np.zeros((8, 8)))}, "mask"),
    # 16 images x (50 steps of 100 at strength 0.5 + 9 x 49 re-denoised) = 7,856 rows > the budget of 5,000
    ({"num_images": 16, "steps": 100, "strength": 0.5, "resample_times": 10}, "resample_times"),
])
def test_edit_bad_input_is_a_422_naming_the_field(server, body, field):
    r = edit(f"{server}/reg", **body)
    assert r.status_code == 422, r.text
    assert field in {str(part) for error in r.json()["detail"] for part in error["loc"]}, r.text
    if field == "resample_times":
        assert "491 model calls" in r.text


# -- progress and cancellation -------------------------------------------------------------------------------------
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(url: str, body: dict, headers: dict | None = None) -> http.client.HTTPConnection:
    """``POST url`` with ``body`` on a connection of its own, left open: read it (``getresponse``) or drop it."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)
    connection.request("POST", parts.path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
    return connection


def open_stream(url: str, body: dict, headers: dict | None = None) -> http.client.HTTPResponse:
    """The response to ``POST url`` as soon as its head arrives (a stream's events follow)."""
    return post(url, body, headers).getresponse()


def drop(connection: http.client.HTTPConnection) -> None:
    """The client goes away: its connection is shut down without a word."""
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()


def read_events(response: http.client.HTTPResponse, until: str | None = None):
    """Server-Sent Events from ``response`` as (name, data, arrival time), up to the first ``until`` event."""
    name = None
    for raw in response:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            yield name, json.loads(line[len("data: "):]), time.monotonic()
            if name == until:
                return


def test_a_stream_reports_progress_before_its_result_which_is_the_plain_answer(server):
    """``"stream": true``: progress events as the sampler steps (at most every 0.1 s, the last one always), then the
    JSON answer, whose images are those of the same request without streaming."""
    settings = {"num_images": 3, "seed": 41, "class_label": 1, "steps": 100, "sampler": "ddim"}
    response = open_stream(f"{server}/reg/generate", settings | {"stream": True})
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = list(read_events(response))
    names = [name for name, _, _ in events]
    assert names[-1] == "result" and set(names[:-1]) == {"progress"} and len(names) >= 3, names
    progress = [data for name, data, _ in events if name == "progress"]
    steps = [p["step"] for p in progress]
    assert steps == sorted(steps) and steps[0] < 100 and {p["steps"] for p in progress} == {100}
    assert progress[-1] == {"step": 100, "steps": 100, "images_done": 3, "num_images": 3}
    assert events[0][2] < events[-1][2]  # the first progress arrived before the result, not with it
    plain = generate(f"{server}/reg/generate", output="json", **settings).json()
    assert events[-1][1]["images"] == plain["images"] and events[-1][1]["seeds"] == [41, 42, 43]

    edit = {"image": b64png(PIXELS), "mask": b64png(RIGHT_HALF), "num_images": 1, "seed": 3, "steps": 5,
            "resample_times": 3, "resample_jumps": 2}
    events = list(read_events(open_stream(f"{server}/reg/inpaint", edit | {"stream": True})))
    assert events[-1][0] == "result" and events[-2][1]["steps"] == 5 + 2 * 2 * 2  # RePaint's calls, counted
    assert events[-1][1]["images"] == inpaint(f"{server}/reg", output="json", **edit).json()["images"]


@pytest.mark.parametrize("body, field", [({"class_label": 7}, "class_label"), ({"output": "png"}, "output"),
                                         ({"num_images": 64, "steps": 100}, "steps")])
def test_a_stream_refused_before_it_starts_is_a_plain_422(server, body, field):
    r = generate(f"{server}/reg/generate", stream=True, **body)
    assert r.status_code == 422 and r.headers["content-type"] == "application/json", r.text
    assert r.json()["detail"][0]["loc"] == ["body", field]


def metric(base: str, name: str) -> float:
    """The sum of ``name`` over its series in ``GET base/metrics`` (0 when absent)."""
    text = requests.get(f"{base}/metrics", headers=AUTH, timeout=TIMEOUT).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.mark.parametrize("how", ["stream closed", "connection dropped"])
def test_a_client_that_goes_away_leaves_the_batch_and_its_batch_mate_is_unchanged(server, how):
    """Two requests share a batch; one client goes away mid-run (it closes its stream after the first progress
    event, or drops a plain request's connection): its rows leave at the next step, the other request's bytes are
    those it gets alone, and ``GET /metrics`` counts the cancelled request and the image-steps it saved."""
    base, steps = f"{server}/plain", 150
    mate = {"num_images": 2, "seed": 900, "steps": steps, "output": "json"}
    alone = generate(f"{base}/generate", AUTH, **mate).json()
    cancelled, saved = metric(base, "ddpm_cancelled_requests_total"), metric(base, "ddpm_cancelled_image_steps_total")
    leaving = {"num_images": 3, "seed": 7, "steps": steps} | ({"stream": True} if how == "stream closed" else {})
    for _ in range(3):  # sent together they normally share a batch; retry if the scheduler split them
        with cf.ThreadPoolExecutor(1) as pool:
            connection = post(f"{base}/generate", leaving, AUTH)
            together = pool.submit(generate, f"{base}/generate", AUTH, **mate)
            if how == "stream closed":
                next(read_events(connection.getresponse(), until="progress"))  # it is sampling
            else:
                time.sleep(0.3)  # a plain answer's head comes with its images: wait a while instead
            drop(connection)
            answer = together.result().json()
        if answer["batch"]["requests"] == 2:
            break
    assert answer["batch"] == {"requests": 2, "images": 5}, "the two requests never shared a batch"
    assert answer["images"] == alone["images"]  # byte for byte
    deadline = time.monotonic() + 20
    while metric(base, "ddpm_cancelled_requests_total") == cancelled and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(base, "ddpm_cancelled_requests_total") == cancelled + 1
    assert 0 < metric(base, "ddpm_cancelled_image_steps_total") - saved < 3 * steps  # left mid-run, not at the end


def sampler_replicas(app: str) -> int:
    """The Sampler deployment's RUNNING replicas, from ``serve.status()``."""
    from ray import serve

    states = serve.status().applications[app].deployments["Sampler"].replica_states
    return states.get("RUNNING", 0)


def wait_for_replicas(app: str, count: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and sampler_replicas(app) != count:
        time.sleep(0.5)
    return sampler_replicas(app)


def test_replicas_scale_up_under_a_burst_and_back_down(server):
    url = f"{server}/reg/generate"
    assert wait_for_replicas("reg", 1) == 1, "an earlier burst's replica never went away"
    deadline = time.monotonic() + 60
    peak = 1

    def client():  # bounded: stops at the deadline or once the second replica runs
        sent = 0
        while time.monotonic() < deadline and peak < 2 and sent < 200:
            assert generate(url, num_images=4, steps=20, class_label=0).status_code == 200
            sent += 1

    with cf.ThreadPoolExecutor(12) as pool:
        clients = [pool.submit(client) for _ in range(12)]
        while time.monotonic() < deadline and peak < 2:
            peak = max(peak, sampler_replicas("reg"))
            time.sleep(0.25)
        for c in clients:
            c.result()
    assert peak == 2, "12 concurrent clients against target_ongoing_requests=2 never added a replica"

    assert wait_for_replicas("reg", 1) == 1, "the idle deployment did not scale back to min_replicas"


def test_moving_the_alias_swaps_the_model(server, registry):
    from pipelines.registry import promote

    tracking_uri, (v1, v2) = registry
    url = f"{server}/reg"
    before = generate(f"{url}/generate", num_images=2, steps=4, seed=7, class_label=0)
    assert before.headers["X-Model-Version"] == v1

    promote(MODEL, v2, "production", tracking_uri)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if requests.get(f"{url}/v1/model", timeout=TIMEOUT).json()["version"] == v2:
            break
        time.sleep(0.5)
    assert requests.get(f"{url}/v1/model", timeout=TIMEOUT).json()["version"] == v2

    after = generate(f"{url}/generate", num_images=2, steps=4, seed=7, class_label=0)
    assert after.headers["X-Model-Version"] == v2 and after.content != before.content


def test_ddpm_serve_command_deploys_the_same_app(server, tmp_path, capsys):
    """``ddpm serve`` without --blocking on an already running Ray: deploys, prints the URL, returns."""
    from ray import serve

    from pipelines.cli import main

    port = int(server.rsplit(":", 1)[1])  # Serve's HTTP options are per cluster: the fixture's port
    ckpt = save_tiny(tmp_path / "ckpt", seed=4)
    assert main(["serve", "--model", str(ckpt), "--port", str(port), "--name", "cli", "--num-cpus", "0.25",
                 "--api-key", API_KEY]) == 0
    try:
        assert f"http://127.0.0.1:{port}" in capsys.readouterr().out
        r = generate(f"{server}/generate", headers={"Authorization": f"Bearer {API_KEY}"}, steps=2, output="json")
        assert r.status_code == 200 and len(r.json()["images"]) == 4
    finally:
        serve.delete("cli")
