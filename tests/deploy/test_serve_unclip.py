"""unCLIP over real HTTP: one Serve application on 127.0.0.1 serving a tiny random whole unCLIP model (a checkpoint
folder that carries its prior: ``tests.support.save_unclip_checkpoint``, 8x8x1, a CLIP that reads 8x8x1 images).

Concurrent ``POST /variations`` (an image's CLIP embedding through the decoder) and ``POST /generate`` with prompts
(prompt -> prior -> decoder) share the endpoint, and each answer's bytes are what ``ddpm.generate_images`` gives for
that request alone, and what ``ddpm vary`` and ``ddpm generate`` write; bad images and prior settings are 422s
naming the field. The engine's side without Ray is tested in test_engine_unclip.py.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io

import numpy as np
import pytest
import requests
from PIL import Image

from ddpm import checkpoint, generate_images
from ddpm.generation import FORWARD_ROWS
from pipelines.cli import main as cli_main
from tests.support import free_port, save_unclip_checkpoint, start_local_ray, wait_http

TIMEOUT = 60  # seconds, for any single HTTP call
BRIGHT = np.full((8, 8, 1), 220, np.uint8)
BRIGHT[:4, :4] = 10
DARK = 255 - BRIGHT


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_unclip_checkpoint(tmp_path_factory.mktemp("unclip") / "ckpt")


@pytest.fixture(scope="module")
def loaded(model_path):
    return checkpoint.load(model_path, weights="ema")  # what the replica serves


@pytest.fixture(scope="module")
def server(model_path):
    from ray import serve

    from deploy.serve_app import build_app

    start_local_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # A long batch wait, so that requests sent together are batched together.
    serve.run(build_app({"model_uri": str(model_path), "num_cpus": 0.25, "batch_wait_timeout_s": 0.5,
                         "max_cost": 5000}), name="unclip", route_prefix="/unclip")
    base = f"http://127.0.0.1:{port}/unclip"
    wait_http(f"{base}/healthz")
    yield base
    serve.shutdown()


def b64png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, :, 0]).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def images_of(r: requests.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(s))))[:, :, None] for s in r.json()["images"]])


def alone(loaded, body: dict, image: np.ndarray | None = None) -> np.ndarray:
    """(N, 8, 8, 1) uint8: ``generate_images`` for this body by itself."""
    n = body.get("num_images", 4)
    condition = loaded.condition(n, prompts=body.get("prompt"), images=image)
    return generate_images(loaded, [(body["seed"] + i) % 2**32 for i in range(n)], condition=condition,
                           steps=body["steps"], guidance_scale=body.get("guidance_scale", 1.0),
                           forward_rows=FORWARD_ROWS, prior_steps=body.get("prior_steps"),
                           prior_guidance_scale=body.get("prior_guidance_scale"))


def test_v1_model_says_it_takes_prompts_and_images(server):
    info = requests.get(f"{server}/v1/model", timeout=TIMEOUT).json()
    assert info["unclip"] is True and info["takes_prompt"] is True and info["takes_image"] is True
    assert info["image_size"] == 8 and info["prior_defaults"] == {"prior_steps": 20, "prior_guidance_scale": 1.0}
    assert info["variation_takes_prompt"] is False  # the decoder reads no caption: a prompt goes to the prior only


def test_concurrent_variations_and_prompts_keep_their_bytes(server, loaded):
    requests_ = [
        ("variations", {"image": b64png(BRIGHT), "seed": 1, "num_images": 2, "steps": 3}, BRIGHT),
        ("variations", {"image": b64png(DARK), "seed": 1, "num_images": 1, "steps": 3, "guidance_scale": 3.0}, DARK),
        ("generate", {"prompt": "a small red circle", "seed": 2, "num_images": 2, "steps": 3, "prior_steps": 4}, None),
        ("generate", {"prompt": "a large blue square", "seed": 3, "num_images": 1, "steps": 3, "guidance_scale": 2.0,
                      "prior_steps": 5, "prior_guidance_scale": 3.0}, None),
        ("generate", {"seed": 4, "num_images": 1, "steps": 3}, None),  # no prompt: the prior's empty caption
    ]
    with cf.ThreadPoolExecutor(len(requests_)) as pool:
        answers = list(pool.map(lambda r: requests.post(f"{server}/{r[0]}", json=r[1] | {"output": "json"},
                                                        timeout=TIMEOUT), requests_))
    for (route, body, image), r in zip(requests_, answers):
        assert np.array_equal(images_of(r), alone(loaded, body, image)), (route, body)
    assert max(r.json()["batch"]["requests"] for r in answers) > 1  # they did share batches


def test_variations_and_prompts_give_the_command_lines_bytes(server, model_path, tmp_path):
    (tmp_path / "in.png").write_bytes(base64.b64decode(b64png(BRIGHT)))
    via_http = images_of(requests.post(f"{server}/variations", json={"image": b64png(BRIGHT), "seed": 7,
                                                                     "num_images": 2, "steps": 3,
                                                                     "guidance_scale": 2.0, "output": "json"},
                                       timeout=TIMEOUT))
    assert cli_main(["vary", "--model", str(model_path), "--image", str(tmp_path / "in.png"), "--seed", "7",
                     "--num-images", "2", "--steps", "3", "--guidance-scale", "2", "--out",
                     str(tmp_path / "v.npz")]) == 0
    assert np.array_equal(np.load(tmp_path / "v.npz")["images"], via_http)

    body = {"prompt": "a green triangle above a yellow circle", "seed": 9, "num_images": 2, "steps": 3,
            "prior_steps": 6, "prior_guidance_scale": 2.5}
    via_http = images_of(requests.post(f"{server}/generate", json=body | {"output": "json"}, timeout=TIMEOUT))
    assert cli_main(["generate", "--model", str(model_path), "--prompt", body["prompt"], "--seed", "9",
                     "--num-images", "2", "--steps", "3", "--prior-steps", "6", "--prior-guidance-scale", "2.5",
                     "--out", str(tmp_path / "g.npz")]) == 0
    assert np.array_equal(np.load(tmp_path / "g.npz")["images"], via_http)


@pytest.mark.parametrize("route, body, field", [
    ("variations", {"image": "not base64!"}, "image"),
    ("variations", {"image": base64.b64encode(b"not an image").decode()}, "image"),
    ("variations", {"image": b64png(np.zeros((16, 16, 1), np.uint8))}, "image"),  # not the CLIP's size
    ("variations", {"image": b64png(BRIGHT), "class_label": 1}, "class_label"),
    ("variations", {}, "image"),
    # a whole model's prompt goes to its prior, which a variation does not run; this decoder reads no caption
    ("variations", {"image": b64png(BRIGHT), "prompt": "a small red circle"}, "prompt"),
    ("generate", {"prior_steps": 0}, "prior_steps"),
    ("generate", {"prior_steps": 1001}, "prior_steps"),
    ("generate", {"prior_guidance_scale": -1.0}, "prior_guidance_scale"),
    ("generate", {"prior_steps": "4"}, "prior_steps"),
])
def test_bad_requests_are_a_422_naming_the_field(server, route, body, field):
    r = requests.post(f"{server}/{route}", json={"steps": 3} | body, timeout=TIMEOUT)
    assert r.status_code == 422, r.text
    assert field in {str(part) for error in r.json()["detail"] for part in error["loc"]}, r.text


def test_a_variation_of_another_size_is_stretched_when_asked(server, loaded):
    big = np.repeat(np.repeat(BRIGHT, 2, axis=0), 2, axis=1)  # 16x16
    r = requests.post(f"{server}/variations", json={"image": b64png(big), "resize": True, "seed": 0,
                                                    "num_images": 1, "steps": 3, "output": "json"}, timeout=TIMEOUT)
    assert images_of(r).shape == (1, 8, 8, 1)


def test_interpolation_slerps_between_two_images_and_ends_at_each(server, loaded, model_path, tmp_path):
    from ddpm import from_uint8
    from ddpm.conditioning import embed_images, slerp

    def vary(**body) -> np.ndarray:
        return images_of(requests.post(f"{server}/variations", json={"seed": 3, "num_images": 2, "steps": 3,
                                                                     "output": "json"} | body, timeout=TIMEOUT))

    plain_bright, plain_dark = vary(image=b64png(BRIGHT)), vary(image=b64png(DARK))
    assert np.array_equal(vary(image=b64png(BRIGHT), toward=b64png(DARK), mix=0.0), plain_bright)
    assert np.array_equal(vary(image=b64png(BRIGHT), toward=b64png(DARK), mix=1.0), plain_dark)
    halfway = vary(image=b64png(BRIGHT), toward=b64png(DARK))  # mix 0.5 by default
    z = embed_images(loaded.image_encoder.model, from_uint8(np.stack([BRIGHT, DARK])))
    expected = generate_images(loaded, [3, 4], condition=loaded.condition(2, image_embeddings=slerp(z[0], z[1], 0.5)),
                               steps=3, forward_rows=FORWARD_ROWS)
    assert np.array_equal(halfway, expected)
    (tmp_path / "a.png").write_bytes(base64.b64decode(b64png(BRIGHT)))
    (tmp_path / "b.png").write_bytes(base64.b64decode(b64png(DARK)))
    assert cli_main(["vary", "--model", str(model_path), "--image", str(tmp_path / "a.png"), "--toward",
                     str(tmp_path / "b.png"), "--seed", "3", "--num-images", "2", "--steps", "3", "--out",
                     str(tmp_path / "half.npz")]) == 0
    assert np.array_equal(np.load(tmp_path / "half.npz")["images"], halfway)
    r = requests.post(f"{server}/variations", json={"image": b64png(BRIGHT), "mix": 0.3}, timeout=TIMEOUT)
    assert r.status_code == 422 and "send toward as well" in r.text
    r = requests.post(f"{server}/variations", json={"image": b64png(BRIGHT), "toward": "???"}, timeout=TIMEOUT)
    assert r.status_code == 422 and "toward" in {str(p) for e in r.json()["detail"] for p in e["loc"]}
