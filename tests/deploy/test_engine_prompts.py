"""The engine with a text model, without Ray: requests with different prompts share one batch and one core call,
each distinct prompt is encoded once per batch, an image's bytes are those ``ddpm.generate_images`` gives for its
prompt alone, and what a model cannot take is refused by field. Serve over HTTP is in test_serve_prompts.py.

The model is ``tests.deploy.text_model``'s tiny random text model (8x8x1, predicting x_0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm import Autoencoder, AutoencoderConfig, UNet, UNetConfig, checkpoint, generate_images
from ddpm.generation import FORWARD_ROWS
from deploy.engine import Job, Queued, ServedModel, check, run_batch
from tests.deploy.text_model import save_text_model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    loaded = checkpoint.load(save_text_model(tmp_path_factory.mktemp("text") / "ckpt"), weights="ema")
    return ServedModel(loaded, torch.device("cpu"), None, None, None)


def job(seed: int, prompt: str | None = None, negative: str | None = None, w: float = 1.0, n: int = 1) -> Job:
    return Job(n, "ddim", 3, 0.0, seed, None, w, prompt=prompt, negative_prompt=negative)


def alone(served: ServedModel, j: Job) -> np.ndarray:
    """What the core's one generation function gives for this job by itself (``ddpm generate``'s path)."""
    loaded = served.loaded
    condition = loaded.condition(j.num_images, prompts=j.prompt, negative_prompts=j.negative_prompt)
    return generate_images(loaded, j.seeds(), condition=condition, steps=j.steps, guidance_scale=j.guidance_scale,
                           forward_rows=FORWARD_ROWS)


def test_different_prompts_share_a_batch_and_keep_their_bytes(served):
    jobs = [job(1, "a small red circle", n=2), job(2, "a large blue square"), job(3),  # no prompt: unconditional
            job(4, "a small red circle", "a large blue square", w=3.0), job(5, "a green triangle", w=3.0),
            job(6, "a small red circle")]
    assert len({j.batch_key() for j in jobs}) == 2  # the prompt is not in the key; guidance is
    encoder = served.loaded.text_encoder
    calls = []
    original = encoder.tokenize
    encoder.tokenize = lambda prompts: calls.append(list(prompts)) or original(prompts)
    try:
        outcomes = run_batch(served, [Queued(j, 0.0) for j in jobs], FORWARD_ROWS)
    finally:
        del encoder.tokenize
    # one tokenize (and encode) for the whole batch, each distinct string once, "" (no prompt, default negative)
    assert calls == [["a small red circle", "a large blue square", "", "a green triangle"]]
    assert all(o.batch == {"requests": 6, "images": 7} for o in outcomes)
    for j, outcome in zip(jobs, outcomes):
        assert np.array_equal(outcome.images, alone(served, j)), j
    assert not np.array_equal(outcomes[0].images[:1], outcomes[5].images)  # other seed
    assert not np.array_equal(outcomes[5].images, alone(served, job(6, "a large blue square")))  # the prompt matters
    assert not np.array_equal(outcomes[3].images, alone(served, job(4, "a small red circle", w=3.0)))  # the negative


def test_what_tokenizing_lost_is_reported_per_prompt(served):
    context = served.loaded.text_encoder.context_length  # 8: BOS, 6 words, EOS
    long = "a small red circle above a large blue square"  # 9 words: 3 past the context
    (out,) = run_batch(served, [Queued(job(0, long, "a pink", w=2.0), 0.0)], FORWARD_ROWS)
    report = out.prompt_report
    assert report["prompt"] == {"dropped_tokens": 9 + 2 - context, "unknown_words": []}
    assert report["negative_prompt"] == {"dropped_tokens": 0, "unknown_words": ["pink"]}
    assert report["warnings"] == [f"prompt: 3 tokens past the {context}-token context were dropped",
                                  "negative_prompt: unknown word: 'pink'"]
    (plain,) = run_batch(served, [Queued(job(0, "a small red circle"), 0.0)], FORWARD_ROWS)
    assert plain.prompt_report == {"prompt": {"dropped_tokens": 0, "unknown_words": []}, "warnings": []}


def test_a_model_refuses_what_it_cannot_take_by_field(served, tmp_path):
    refused = check(Job(1, "ddim", 3, 0.0, 0, 1, 1.0), served)
    assert refused.field == "class_label" and "prompt" in refused.message
    classes = checkpoint.load(checkpoint.save(tmp_path / "classes", UNet(UNetConfig.preset("tiny", num_classes=3)),
                                              served.loaded.schedule))
    plain = ServedModel(classes, torch.device("cpu"), None, None, None)
    refused = check(job(0, "a small red circle"), plain)
    assert refused.field == "prompt" and "no text encoder" in refused.message
    (outcome,) = run_batch(plain, [Queued(job(0, "a red circle"), 0.0)], FORWARD_ROWS)
    assert outcome.field == "prompt"  # refused in the batch, before any sampling
    assert plain.describe()["takes_prompt"] is False and plain.describe()["prompt_context_length"] is None


def test_a_prompt_costs_the_unet_rows_a_class_label_costs(served):
    assert served.cost(job(0, "a small red circle", n=4)) == 4 * 3
    assert served.cost(job(0, "a small red circle", w=3.0, n=4)) == 4 * 3 * 2  # guided: conditional + negative rows
    assert served.cost(job(0, "", w=1.0, n=4)) == 4 * 3
    info = served.describe()
    assert info["takes_prompt"] is True and info["prompt_context_length"] == served.loaded.text_encoder.context_length


def test_a_latent_text_models_decoder_is_counted(served):
    """The FLOP count behind a latent model's decode cost runs the U-Net once: a text U-Net needs a prompt's
    states for that (the empty prompt's), not a class label."""
    torch.manual_seed(0)
    text = served.loaded.text_encoder
    latent = checkpoint.LoadedModel(UNet(UNetConfig.preset("tiny", in_channels=4, text_dim=text.width)).eval(),
                                    served.loaded.schedule, "sample",
                                    autoencoder=Autoencoder(AutoencoderConfig.preset("tiny")).eval(),
                                    text_encoder=text)
    rows = ServedModel(latent, torch.device("cpu"), None, None, None).codec_rows
    assert rows["decode"] > 0 and rows["encode"] > 0
