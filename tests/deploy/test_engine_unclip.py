"""The engine with unCLIP's decoder and a whole unCLIP model, without Ray: variations (an image's CLIP embedding) and
prompts (through the prior) share batches with their own kind, give the bytes ``ddpm.generate_images`` gives for
the request alone, count the prior in a request's cost, and what a model cannot take is refused by field. Serve over
HTTP is in test_serve_unclip.py.

The models are ``tests.support.save_unclip_checkpoint``'s tiny random ones (8x8x1, predicting x_0).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import checkpoint, generate_images
from ddpm.generation import FORWARD_ROWS
from deploy.engine import Job, Queued, ServedModel, Variation, check, run_batch
from tests.support import save_text_checkpoint, save_unclip_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see tests/conftest.py


def _served(path) -> ServedModel:
    return ServedModel(checkpoint.load(path, weights="ema"), torch.device("cpu"), None, None, None)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return _served(save_unclip_checkpoint(tmp_path_factory.mktemp("unclip") / "whole"))


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return _served(save_unclip_checkpoint(tmp_path_factory.mktemp("unclip") / "decoder", prior=False))


def png(value: int) -> tuple[bytes, np.ndarray]:
    image = np.full((8, 8, 1), value, np.uint8)
    image[:4, :4] = 255 - value
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0]).save(buffer, format="PNG")
    return buffer.getvalue(), image


def job(seed: int, *, prompt: str | None = None, image: bytes | None = None, w: float = 1.0, n: int = 1,
        prior_steps: int | None = 3, prior_w: float | None = None) -> Job:
    return Job(n, "ddim", 3, 0.0, seed, None, w, prompt=prompt,
               variation=None if image is None else Variation(image), prior_steps=prior_steps,
               prior_guidance_scale=prior_w)


def alone(served: ServedModel, j: Job, image: np.ndarray | None = None) -> np.ndarray:
    """What the core's one generation function gives for this job by itself (``ddpm generate`` / ``vary``)."""
    loaded = served.loaded
    condition = loaded.condition(j.num_images, prompts=j.prompt, images=image)
    steps, w = j.prior_settings()
    return generate_images(loaded, j.seeds(), condition=condition, steps=j.steps, guidance_scale=j.guidance_scale,
                           forward_rows=FORWARD_ROWS, prior_steps=steps, prior_guidance_scale=w)


def test_prompts_and_variations_of_a_whole_model_keep_their_bytes_in_one_batch(whole):
    bright, bright_pixels = png(200)
    dark, dark_pixels = png(30)
    jobs = [job(1, prompt="a small red circle", n=2), job(2, prompt="a large blue square", w=3.0),
            job(3, image=bright, n=2), job(4, image=dark, w=2.0), job(5),  # no prompt: the prior's empty caption
            job(6, prompt="a small red circle", prior_steps=5, prior_w=2.0)]
    outcomes = run_batch(whole, [Queued(j, 0.0) for j in jobs], FORWARD_ROWS)
    assert all(o.batch == {"requests": 6, "images": 8} for o in outcomes)
    pixels = {2: bright_pixels, 3: dark_pixels}
    for i, (j, outcome) in enumerate(zip(jobs, outcomes)):
        assert np.array_equal(outcome.images, alone(whole, j, pixels.get(i))), j
    assert not np.array_equal(outcomes[0].images[:1], outcomes[5].images)  # the prior's settings matter
    assert not np.array_equal(outcomes[2].images[:1], alone(whole, job(3, image=dark), dark_pixels))  # the image does


def test_a_decoder_varies_images_and_samples_without_one(decoder):
    bright, pixels = png(200)
    jobs = [job(1, image=bright, n=3, prior_steps=None), job(2, prior_steps=None)]
    outcomes = run_batch(decoder, [Queued(j, 0.0) for j in jobs], FORWARD_ROWS)
    assert np.array_equal(outcomes[0].images, alone(decoder, jobs[0], pixels))
    assert np.array_equal(outcomes[1].images, alone(decoder, jobs[1]))  # zero embedding: the unconditional model


def test_the_prior_counts_in_a_requests_cost(whole, decoder):
    assert whole.codec_rows["prior"] >= 1 and decoder.codec_rows["prior"] == 0
    plain = job(0, prompt="a small red circle", prior_steps=10)
    assert whole.cost(plain) == 3 + 10 * whole.codec_rows["prior"]  # 3 U-Net calls + 10 prior calls
    guided = job(0, prompt="a small red circle", w=2.0, prior_steps=10, prior_w=3.0)
    assert whole.cost(guided) == 2 * 3 + 2 * 10 * whole.codec_rows["prior"]
    assert whole.cost(job(0, image=png(9)[0], prior_steps=None)) == 3  # a variation skips the prior
    refused = check(job(0, prompt="a small red circle", n=4, prior_steps=1000, prior_w=2.0), whole, max_cost=2000)
    assert refused.field == "steps" and "for the prior" in refused.message


def test_what_a_model_cannot_take_is_refused_by_field(whole, decoder, tmp_path):
    (bad,) = run_batch(whole, [Queued(job(0, image=b"not an image"), 0.0)], FORWARD_ROWS)
    assert bad.field == "image" and "not a PNG, JPEG, WebP, BMP or GIF image" in bad.message
    refused = check(job(0, prompt="a small red circle", prior_steps=None), decoder)
    assert refused.field == "prompt" and "takes no prompt" in refused.message
    refused = check(job(0, prior_steps=4), decoder)
    assert refused.field == "prior_steps" and "has no prior" in refused.message
    text = _served(save_text_checkpoint(tmp_path / "text"))
    refused = check(job(0, image=png(9)[0], prior_steps=None), text)
    assert refused.field == "image" and "variations need unCLIP's decoder" in refused.message
    info = whole.describe()
    assert info["unclip"] and info["takes_prompt"] and info["takes_image"] and info["image_size"] == 8
    assert not decoder.describe()["takes_prompt"] and decoder.describe()["takes_image"]
