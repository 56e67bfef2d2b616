"""A whole unCLIP model in the core: a decoder checkpoint that carries its prior (ddpm/checkpoint.py's prior/), so
that a prompt goes prompt -> the CLIP's text tower -> the prior (one embedding per seed) -> the decoder inside the
one generation function. Random tiny parts: what is checked is the plumbing (the bytes equal the two stages run by
hand, no image depends on its batch-mates, a save and load keeps them, mismatched parts are refused); the decoder and
the prior each learn in test_decoder.py and test_prior.py."""

import numpy as np
import pytest
import torch

from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint, clip, generate_images, inpaint_images, text
from ddpm.conditioning import encode_prompts, with_image
from ddpm.folder_format import CheckpointError
from ddpm.generation import prior_seeds, sample_embeddings, unclip_condition
from ddpm.images import from_uint8
from ddpm.prior import DiffusionPrior, LoadedPrior, PriorConfig
from ddpm.settings import SettingError

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see tests/conftest.py

E, D = 16, 16
PROMPTS = ["a bright top", "a bright bottom", "a dark square"]


@pytest.fixture(scope="module")
def parts():
    tokenizer = text.train_tokenizer(PROMPTS, vocab_size=600, context_length=8)
    cfg = clip.ClipConfig.for_tokenizer(tokenizer, image_size=8, in_channels=1, image_channels=(8, 16),
                                        image_heads=2, embed_dim=E, text_width=D, text_layers=1, text_heads=2)
    torch.manual_seed(5)
    the_clip = clip.LoadedClip(clip.Clip(cfg).eval(), tokenizer)
    prior = LoadedPrior(DiffusionPrior(PriorConfig(embed_dim=E, text_dim=D, width=32, depth=1, heads=2)).eval(),
                        NoiseSchedule.cosine(), {"clip": {"uri": "models:/clip/1"}})
    torch.manual_seed(0)
    decoder = UNet(UNetConfig.preset("tiny", image_dim=E)).eval()
    return the_clip, prior, decoder


@pytest.fixture(scope="module")
def unclip(parts) -> checkpoint.LoadedModel:
    the_clip, prior, decoder = parts
    return checkpoint.LoadedModel(decoder, NoiseSchedule.linear(), "epsilon", image_encoder=the_clip, prior=prior)


ARGS = dict(sampler="ddim", steps=5, guidance_scale=2.0, prior_steps=4, prior_guidance_scale=1.5)


def test_a_prompt_goes_through_the_prior_then_the_decoder(unclip, parts):
    the_clip, prior, decoder = parts
    seeds = [3, 4, 5]
    images = generate_images(unclip, seeds, condition=unclip.condition(3, prompts=PROMPTS), **ARGS)
    # by hand: the CLIP's text tower, the prior from the prior's seeds, then the decoder alone
    encoder = text.TextEncoder(the_clip.tokenizer, the_clip.model.text_model)
    z = sample_embeddings(prior.model, prior.schedule, encode_prompts(encoder, PROMPTS), prior_seeds(seeds),
                          steps=4, guidance_scale=1.5)
    decoder_only = checkpoint.LoadedModel(decoder, unclip.schedule, "epsilon", image_encoder=the_clip)
    by_hand = generate_images(decoder_only, seeds, condition=with_image(z), sampler="ddim", steps=5,
                              guidance_scale=2.0)
    assert images.shape == (3, 8, 8, 1) and np.array_equal(images, by_hand)
    assert prior_seeds([0, 2**31, 2**32 - 1]) == [2**31, 0, 2**31 - 1]


def test_an_image_depends_on_its_prompt_and_seed_only(unclip):
    batch = generate_images(unclip, [3, 4, 5], condition=unclip.condition(3, prompts=PROMPTS), **ARGS)
    alone = generate_images(unclip, [4], condition=unclip.condition(1, prompts=PROMPTS[1]), **ARGS)
    assert np.array_equal(alone, batch[1:2])
    # the embedding the decoder gets: the prompt's, the seed's, and the prior's settings' (a random decoder's pixels
    # saturate, so the embeddings are compared)
    def embedding(prompt: str, seed: int, **settings):
        return unclip_condition(unclip, unclip.condition(1, prompts=prompt), [seed], **settings).image
    z = embedding(PROMPTS[1], 4, prior_steps=4)
    assert torch.equal(z, embedding(PROMPTS[1], 4, prior_steps=4))
    for other in (embedding(PROMPTS[0], 4, prior_steps=4), embedding(PROMPTS[1], 5, prior_steps=4),
                  embedding(PROMPTS[1], 4, prior_steps=2), embedding(PROMPTS[1], 4, prior_steps=4,
                                                                     prior_guidance_scale=3.0)):
        assert (other - z).abs().max() > 1e-3


def test_variations_and_edits_of_a_whole_model(unclip, parts):
    the_clip, _, decoder = parts
    image = np.zeros((8, 8, 1), np.uint8)
    image[:4] = 255
    # a variation skips the prior: the image's own embedding
    varied = generate_images(unclip, [1, 2], condition=unclip.condition(2, images=image), sampler="ddim", steps=5)
    decoder_only = checkpoint.LoadedModel(decoder, unclip.schedule, "epsilon", image_encoder=the_clip)
    assert np.array_equal(varied, generate_images(decoder_only, [1, 2], condition=decoder_only.condition(
        2, images=image), sampler="ddim", steps=5))
    # an edit toward a prompt: the prior's embedding of it, from the edit's seed
    known = from_uint8(image[None])
    edited = inpaint_images(unclip, [7], known, None, condition=unclip.condition(1, prompts=PROMPTS[2]),
                            strength=0.6, **ARGS)
    z = sample_embeddings(unclip.prior.model, unclip.prior.schedule, unclip.condition(1, prompts=PROMPTS[2]),
                          prior_seeds([7]), steps=4, guidance_scale=1.5)
    assert np.array_equal(edited, inpaint_images(decoder_only, [7], known, None, condition=with_image(z),
                                                 strength=0.6, sampler="ddim", steps=5, guidance_scale=2.0))


def test_a_saved_whole_model_loads_with_its_prior_and_gives_the_same_bytes(tmp_path, unclip, parts):
    the_clip, prior, decoder = parts
    checkpoint.save(tmp_path / "m", decoder, unclip.schedule, image_encoder=the_clip, prior=prior,
                    prior_source={"uri": "models:/prior/2", "name": "prior", "version": "2"})
    loaded = checkpoint.load(tmp_path / "m")
    assert loaded.prior is not None and checkpoint.read_config(tmp_path / "m")["prior"]["source"]["version"] == "2"
    condition = unclip.condition(2, prompts=PROMPTS[:2])
    assert np.array_equal(generate_images(loaded, [0, 1], condition=loaded.condition(2, prompts=PROMPTS[:2]), **ARGS),
                          generate_images(unclip, [0, 1], condition=condition, **ARGS))

    wide = LoadedPrior(DiffusionPrior(PriorConfig(embed_dim=E + 1, text_dim=D, width=32, depth=1, heads=2)),
                       prior.schedule, {})
    with pytest.raises(CheckpointError, match="samples embeddings of width 17, but the decoder takes width 16"):
        checkpoint.save(tmp_path / "n", decoder, unclip.schedule, image_encoder=the_clip, prior=wide)
    # a decoder that reads captions with another text encoder than the CLIP's tower cannot be one model
    torch.manual_seed(1)
    other_tower = text.TextEncoder(the_clip.tokenizer, text.TextTransformer(the_clip.model.config.text_config()))
    reader = UNet(UNetConfig.preset("tiny", image_dim=E, text_dim=D))
    with pytest.raises(CheckpointError, match="another text encoder than its CLIP's text tower"):
        checkpoint.save(tmp_path / "o", reader, unclip.schedule, image_encoder=the_clip, prior=prior,
                        text_encoder=other_tower)
    same_tower = text.TextEncoder(the_clip.tokenizer, the_clip.model.text_model)
    checkpoint.save(tmp_path / "p", reader, unclip.schedule, image_encoder=the_clip, prior=prior,
                    text_encoder=same_tower)
    both = checkpoint.load(tmp_path / "p")
    assert both.condition(1, prompts=PROMPTS[0]).fields() == ("text", "pooled")  # for the prior, kept for the decoder
    assert generate_images(both, [0], condition=both.condition(1, prompts=PROMPTS[0]), **ARGS).shape == (1, 8, 8, 1)


def test_prior_settings_are_refused_where_there_is_no_prior(unclip, parts):
    the_clip, _, decoder = parts
    unclip.check_request(prompt="a bright top", prior_steps=20, prior_guidance_scale=3.0)
    with pytest.raises(SettingError, match="prior_steps: must be at most 1000, the prior's number of timesteps"):
        unclip.check_request(prior_steps=1001)
    decoder_only = checkpoint.LoadedModel(decoder, unclip.schedule, "epsilon", image_encoder=the_clip)
    for field in ("prior_steps", "prior_guidance_scale"):
        with pytest.raises(SettingError, match=f"{field}: this model has no prior"):
            decoder_only.check_request(**{field: 2})
    with pytest.raises(SettingError, match="prompt: this model takes no prompt"):
        decoder_only.check_request(prompt="a bright top")  # a decoder alone reads no text: variations only
