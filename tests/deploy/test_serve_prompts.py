"""Prompts over real HTTP: one Serve application on 127.0.0.1 serving a tiny random text model (a checkpoint folder,
``tests.deploy.text_model``: 8x8x1, a one-layer text encoder with an 8-token context whose tokenizer was learned
from four captions).

Concurrent requests with different prompts share batches, and each answer's bytes are what
``ddpm.generate_images`` (``ddpm.inpaint_images`` for /inpaint and /edit) gives for that prompt, seed and settings
alone; what tokenizing lost comes back in JSON and in headers; bad prompts are 422s naming the field. The engine's
side without Ray is tested in test_engine_prompts.py; a prompt to a model without a text encoder in test_serve.py.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from ddpm import checkpoint, encode_png, from_uint8, generate_images, inpaint_images, make_grid
from ddpm.generation import FORWARD_ROWS
from tests.deploy.text_model import save_text_model
from tests.support import free_port, start_local_ray, wait_http

TIMEOUT = 60  # seconds, for any single HTTP call


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return save_text_model(tmp_path_factory.mktemp("text") / "ckpt")


@pytest.fixture(scope="module")
def loaded(text_model):
    return checkpoint.load(text_model, weights="ema")  # what the replica serves


@pytest.fixture(scope="module")
def server(text_model):
    from ray import serve

    from deploy.serve_app import build_app

    start_local_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # A long batch wait, so that requests sent together are batched together.
    serve.run(build_app({"model_uri": str(text_model), "num_cpus": 0.25, "batch_wait_timeout_s": 0.5,
                         "max_cost": 5000}), name="text", route_prefix="/text")
    base = f"http://127.0.0.1:{port}/text"
    wait_http(f"{base}/healthz")
    yield base
    serve.shutdown()


def post(url: str, **body) -> requests.Response:
    return requests.post(url, json=body, timeout=TIMEOUT)


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def alone(loaded, body: dict) -> np.ndarray:
    """(N, 8, 8, 1) uint8: ``generate_images`` for this body's prompt, seed and settings by itself."""
    n = body.get("num_images", 4)
    condition = loaded.condition(n, prompts=body.get("prompt"), negative_prompts=body.get("negative_prompt"))
    seeds = [(body["seed"] + i) % 2**32 for i in range(n)]
    return generate_images(loaded, seeds, condition=condition, steps=body["steps"],
                           guidance_scale=body.get("guidance_scale", 1.0), forward_rows=FORWARD_ROWS)


def test_v1_model_says_it_takes_a_prompt(server):
    info = requests.get(f"{server}/v1/model", timeout=TIMEOUT).json()
    assert info["takes_prompt"] is True and info["prompt_context_length"] == 8 and info["max_prompt_bytes"] == 1000
    assert info["num_classes"] == 0


def test_concurrent_prompts_share_batches_and_keep_their_bytes(server, loaded):
    bodies = [
        {"prompt": "a small red circle", "seed": 1, "num_images": 2},
        {"prompt": "a large blue square", "seed": 1, "num_images": 1},
        {"prompt": "a small red circle", "negative_prompt": "a large blue square", "guidance_scale": 3.0, "seed": 2,
         "num_images": 1},
        {"prompt": "a green triangle above a yellow circle", "guidance_scale": 3.0, "seed": 3, "num_images": 3},
        {"seed": 4, "num_images": 1},  # no prompt: the unconditional model
        {"prompt": "a cyan square", "seed": 5, "num_images": 2, "output": "json"},
    ]
    bodies = [{"steps": 3} | b for b in bodies]
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: post(f"{server}/generate", **b), bodies))
    shared = []
    for body, r in zip(bodies, answers):
        assert r.status_code == 200, r.text
        expected = alone(loaded, body)
        if body.get("output") == "json":
            got = np.stack([png_array(base64.b64decode(image)) for image in r.json()["images"]])[..., None]
            assert np.array_equal(got, expected)
            shared.append(r.json()["batch"]["requests"])
        else:
            assert r.content == encode_png(make_grid(expected)), body  # the same PNG bytes
            shared.append(int(r.headers["X-Batch-Requests"]))
    assert max(shared) > 1, shared  # prompts did share a batch
    assert len(np.unique(alone(loaded, bodies[0]))) > 20  # real images, not a constant
    assert not np.array_equal(alone(loaded, bodies[0])[:1], alone(loaded, bodies[1]))  # the prompt matters


def test_what_tokenizing_lost_comes_back_in_json_and_headers(server):
    long = "a small red circle above a large blue square"  # 9 words + BOS + EOS: 3 tokens past the context of 8
    r = post(f"{server}/generate", prompt=long, negative_prompt="naïve", guidance_scale=2.0, steps=2,
             num_images=1, seed=0, output="json")
    assert r.status_code == 200, r.text
    report = r.json()["prompt_report"]
    assert report["prompt"] == {"dropped_tokens": 3, "unknown_words": []}
    assert report["negative_prompt"] == {"dropped_tokens": 0, "unknown_words": ["naïve"]}
    assert report["warnings"] == ["prompt: 3 tokens past the 8-token context were dropped",
                                  "negative_prompt: unknown word: 'naïve'"]

    r = post(f"{server}/generate", prompt=long, negative_prompt="naïve", guidance_scale=2.0, steps=2,
             num_images=1, seed=0)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["X-Prompt-Dropped-Tokens"] == "3"
    assert json.loads(r.headers["X-Prompt-Warnings"]) == report["warnings"]  # ASCII on the wire, "ï" escaped

    r = post(f"{server}/generate", prompt="a small red circle", steps=2, num_images=1, seed=0)
    assert r.headers["X-Prompt-Dropped-Tokens"] == "0" and "X-Prompt-Warnings" not in r.headers


@pytest.mark.parametrize("body, field", [
    ({"class_label": 0}, "class_label"),  # a class label to a text model
    ({"prompt": 3}, "prompt"),  # not a string
    ({"prompt": ["a red circle"]}, "prompt"),
    ({"prompt": "é" * 501}, "prompt"),  # 1002 bytes of UTF-8 in 501 characters: over the byte limit
    ({"prompt": "x" * 1001}, "prompt"),
    ({"negative_prompt": "a red circle", "guidance_scale": 2.0}, "negative_prompt"),  # without a prompt
    ({"prompt": "a red circle", "negative_prompt": "a blue square"}, "negative_prompt"),  # without guidance
    ({"prompt": "", "guidance_scale": 2.0}, "guidance_scale"),  # the empty prompt: nothing to guide
])
def test_bad_prompts_are_a_422_naming_the_field(server, body, field):
    r = post(f"{server}/generate", steps=2, **body)
    assert r.status_code == 422, r.text
    assert field in {str(part) for error in r.json()["detail"] for part in error["loc"]}, r.text


def b64png(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def test_inpaint_repaints_the_mask_to_a_prompt(server, loaded):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    generate = np.zeros((8, 8), np.uint8)
    generate[2:6, 2:6] = 255  # white = repaint
    settings = {"image": b64png(pixels), "mask": b64png(generate), "steps": 4, "resample_times": 2,
                "guidance_scale": 2.0, "seed": 7, "num_images": 2, "output": "json"}
    results = {}
    for prompt in ("a small red circle", "a large blue square"):
        r = post(f"{server}/inpaint", prompt=prompt, **settings)
        assert r.status_code == 200, r.text
        results[prompt] = np.stack([png_array(base64.b64decode(image)) for image in r.json()["images"]])
        known = from_uint8(np.repeat(pixels[None, :, :, None], 2, axis=0))  # (2, 1, 8, 8)
        masks = torch.as_tensor(generate == 255, dtype=torch.float32)[None, None].expand(2, -1, -1, -1)
        expected = inpaint_images(loaded, [7, 8], known, masks, condition=loaded.condition(2, prompts=prompt),
                                  steps=4, guidance_scale=2.0, resample_times=2, forward_rows=FORWARD_ROWS)
        assert np.array_equal(results[prompt], expected[..., 0])
    keep = generate == 0
    red, blue = results.values()
    assert np.array_equal(red[:, keep], blue[:, keep]) and (red[:, keep] == pixels[keep]).all()  # kept exactly
    assert not np.array_equal(red[:, ~keep], blue[:, ~keep])  # the masked region follows the prompt


def test_edit_redraws_the_whole_image_toward_a_prompt(server, loaded):
    """SDEdit with a new prompt (no mask): the bytes ``ddpm.inpaint_images`` gives with ``strength`` alone, for two
    prompts sent at once (an edit's prompt, like a generation's, is per image: the two share a batch)."""
    pixels = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    settings = {"image": b64png(pixels), "steps": 10, "strength": 0.5, "guidance_scale": 2.0, "seed": 3,
                "num_images": 2, "output": "json"}
    prompts = ("a small red circle", "a large blue square")
    with cf.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda p: post(f"{server}/edit", prompt=p, **settings), prompts))
    known = from_uint8(np.repeat(pixels[None, :, :, None], 2, axis=0))  # (2, 1, 8, 8)
    results = []
    for prompt, r in zip(prompts, answers):
        assert r.status_code == 200, r.text
        results.append(np.stack([png_array(base64.b64decode(image)) for image in r.json()["images"]]))
        expected = inpaint_images(loaded, [3, 4], known, None, condition=loaded.condition(2, prompts=prompt),
                                  steps=10, strength=0.5, guidance_scale=2.0, forward_rows=FORWARD_ROWS)
        assert np.array_equal(results[-1], expected[..., 0])
    assert not np.array_equal(*results)  # the prompt steers the edit
