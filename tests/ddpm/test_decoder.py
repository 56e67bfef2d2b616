"""unCLIP's decoder in the core: a CLIP image embedding in the one conditioning object, the U-Net that reads it (time
embedding + context tokens), embedding dropout, a checkpoint that pins its CLIP, variations of an image through the
one generation function, and the rules a door applies. Tiny sizes: an 8x8x1 U-Net and a CLIP of width 16."""

import numpy as np
import pytest
import torch

from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint, clip, generate_images, text
from ddpm.conditioning import Condition, embed_images, encode_prompts, with_image
from ddpm.folder_format import CheckpointError
from ddpm.images import from_uint8
from ddpm.settings import SettingError
from ddpm.training import drop_condition, train_step

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see tests/conftest.py

E, CAPTIONS = 16, ["a bright top", "a bright bottom"]


@pytest.fixture(scope="module")
def tiny_clip() -> clip.LoadedClip:
    tokenizer = text.train_tokenizer(CAPTIONS, vocab_size=600, context_length=8)
    cfg = clip.ClipConfig.for_tokenizer(tokenizer, image_size=8, in_channels=1, image_channels=(8, 16),
                                        image_heads=2, embed_dim=E, text_width=16, text_layers=1, text_heads=2)
    torch.manual_seed(5)
    return clip.LoadedClip(clip.Clip(cfg).eval(), tokenizer)


def two_images() -> np.ndarray:
    """(2, 8, 8, 1) uint8: the top half white, then the bottom half white."""
    images = np.zeros((2, 8, 8, 1), np.uint8)
    images[0, :4], images[1, 4:] = 255, 255
    return images


def decoder(**overrides) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig.preset("tiny", image_dim=E, **overrides))


# -- the object and the network ------------------------------------------------------------------------------------
def test_an_image_condition_selects_pads_concatenates_and_drops_to_zeros():
    z = torch.nn.functional.normalize(torch.randn(3, E), dim=-1)
    c = with_image(z)
    assert c.fields() == ("image",) and len(c) == 3
    assert torch.equal(c.null().image, torch.zeros(3, E))
    assert torch.equal(c.select(slice(1, 3)).image, z[1:])
    padded = c.pad_to(5)
    assert torch.equal(padded.image[:3], z) and not padded.image[3:].any()
    assert torch.equal(Condition.cat([c, c.null()]).image, torch.cat([z, torch.zeros(3, E)]))
    assert torch.equal(Condition(image=z).null().image, torch.zeros(3, E))  # no negative: zeros all the same
    with pytest.raises(ValueError, match="image must be"):
        Condition(image=torch.zeros(3))
    with pytest.raises(ValueError, match="row counts"):
        Condition(labels=torch.zeros(2, dtype=torch.long), image=z)


def test_the_decoder_reads_the_embedding_and_refuses_to_go_without_it():
    net = decoder().eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    z = torch.nn.functional.normalize(torch.randn(2, E), dim=-1)
    with torch.no_grad():
        a, b = net(x, t, with_image(z)), net(x, t, with_image(z.flip(0)))
        zero = net(x, t, with_image(z).null())
    assert a.shape == x.shape and not torch.allclose(a, b) and not torch.allclose(a, zero)
    with pytest.raises(ValueError, match="CLIP image embedding"):
        net(x, t)
    with pytest.raises(ValueError, match="takes no image"):
        UNet(UNetConfig.preset("tiny"))(x, t, with_image(z))
    with pytest.raises(ValueError, match="image_tokens"):
        UNetConfig.preset("tiny", image_dim=E, image_tokens=0)
    # Both the time embedding and the context tokens carry it: either path alone changes the output.
    for part in ("image_proj", "image_tokens"):
        other = decoder().eval()
        with torch.no_grad():
            getattr(other, part).weight.zero_()
            getattr(other, part).bias.zero_()
            assert not torch.allclose(other(x, t, with_image(z)), other(x, t, with_image(z.flip(0))))


def test_a_decoder_that_reads_the_caption_too_attends_to_both(tiny_clip):
    encoder = text.TextEncoder(tiny_clip.tokenizer, tiny_clip.model.text_model)
    net = decoder(text_dim=16).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    z = torch.nn.functional.normalize(torch.randn(2, E), dim=-1)
    prompts = encode_prompts(encoder, CAPTIONS)
    both = with_image(z, prompts)
    assert both.fields() == ("text", "pooled", "image")
    assert both.negative.fields() == ("text", "pooled", "image") and not both.negative.image.any()
    with torch.no_grad():
        out = net(x, t, both)
        assert not torch.allclose(out, net(x, t, with_image(z.flip(0), prompts)))
        assert not torch.allclose(out, net(x, t, with_image(z, encode_prompts(encoder, CAPTIONS[::-1]))))


def test_embedding_dropout_zeroes_whole_rows_independently_of_caption_dropout(tiny_clip):
    encoder = text.TextEncoder(tiny_clip.tokenizer, tiny_clip.model.text_model)
    n = 4000
    z = torch.nn.functional.normalize(torch.randn(n, E), dim=-1)
    prompts = encode_prompts(encoder, [CAPTIONS[0]] * n)
    dropped = drop_condition(with_image(z, prompts), 0.5, torch.Generator().manual_seed(0), image_p=0.1)
    image_gone = ~dropped.image.any(dim=1)
    text_gone = (dropped.pooled == prompts.negative.pooled).all(dim=1)
    assert torch.equal(dropped.image[~image_gone], z[~image_gone])  # a kept row is kept whole
    assert abs(image_gone.float().mean() - 0.1) < 0.015 and abs(text_gone.float().mean() - 0.5) < 0.03
    # independent: P(both) = 0.05, not 0.1 (the same rows) or 0
    assert abs((image_gone & text_gone).float().mean() - 0.05) < 0.012
    same_rows = drop_condition(with_image(z), 0.3, torch.Generator().manual_seed(0))
    assert abs((~same_rows.image.any(dim=1)).float().mean() - 0.3) < 0.03


def test_embed_images_is_unit_norm_and_does_not_depend_on_the_batch(tiny_clip):
    images = from_uint8(np.random.default_rng(0).integers(0, 256, (11, 8, 8, 1), dtype=np.uint8))
    z = embed_images(tiny_clip.model, images)
    assert z.shape == (11, E) and torch.allclose(z.norm(dim=1), torch.ones(11), atol=1e-5)
    assert torch.equal(embed_images(tiny_clip.model, images[3:4]), z[3:4])  # alone vs in a batch of 11


# -- learning, sampling and the checkpoint ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_clip) -> checkpoint.LoadedModel:
    """A decoder trained on two images, each conditioned on its own CLIP embedding (10% embedding dropout)."""
    images = two_images()
    z = embed_images(tiny_clip.model, from_uint8(images))  # (2, E)
    net, schedule = decoder(), NoiseSchedule.linear()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    torch.manual_seed(1)
    for _ in range(300):
        pick = torch.randint(0, 2, (16,))
        y = drop_condition(with_image(z[pick]), 0.1)
        train_step(net, optimizer, schedule, from_uint8(images)[pick], lr=3e-3, condition=y)
    return checkpoint.LoadedModel(net.eval(), schedule, "epsilon", image_encoder=tiny_clip)


def test_variations_of_an_image_look_like_it(trained):
    images = two_images()
    for i in range(2):
        out = generate_images(trained, [0, 1, 2, 3], condition=trained.condition(4, images=images[i]),
                              sampler="ddim", steps=20, guidance_scale=2.0)  # (4, 8, 8, 1) uint8
        top, bottom = out[:, :4].mean(axis=(1, 2, 3)), out[:, 4:].mean(axis=(1, 2, 3))
        assert ((top > bottom) == (i == 0)).all(), (i, top, bottom)  # each variation keeps the bright half


def test_a_decoder_checkpoint_pins_its_clip_and_gives_the_same_bytes(tmp_path, trained, tiny_clip):
    checkpoint.save(tmp_path / "m", trained.model, trained.schedule, image_encoder=tiny_clip,
                    image_encoder_source={"uri": "models:/clip/1", "name": "clip", "version": "1"})
    loaded = checkpoint.load(tmp_path / "m")
    assert loaded.image_encoder is not None and loaded.text_encoder is None
    config = checkpoint.read_config(tmp_path / "m")
    assert config["image_encoder"]["embed_dim"] == E and config["image_encoder"]["source"]["version"] == "1"
    image = two_images()[1]
    args = dict(sampler="ddim", steps=10, guidance_scale=3.0)
    a = generate_images(trained, [7, 8], condition=trained.condition(2, images=image), **args)
    b = generate_images(loaded, [7, 8], condition=loaded.condition(2, images=image), **args)
    assert np.array_equal(a, b)
    # an image and its embedding are the same request; a lone image gives the bytes it gives in a batch
    z = embed_images(tiny_clip.model, from_uint8(image[None]))
    assert np.array_equal(generate_images(loaded, [7, 8], condition=loaded.condition(2, image_embeddings=z[0]),
                                          **args), b)
    alone = generate_images(loaded, [8], condition=loaded.condition(1, images=image), **args)
    assert np.array_equal(alone, b[1:])

    with pytest.raises(ValueError, match="image_dim 16 needs a CLIP"):
        checkpoint.save(tmp_path / "n", trained.model, trained.schedule)
    (tmp_path / "m" / "config.json").write_text(
        (tmp_path / "m" / "config.json").read_text().replace('"image_encoder": {', '"image_encoder_": {'))
    with pytest.raises(CheckpointError, match="takes image embeddings of width 16 but the checkpoint has no CLIP"):
        checkpoint.load(tmp_path / "m")


def test_requests_a_decoder_or_another_model_cannot_take_are_refused(trained, tiny_clip):
    image = two_images()[0]
    for kwargs, field in [(dict(images=np.zeros((8, 8, 3), np.uint8)), "image"),  # not the CLIP's input
                          (dict(images=image.astype(np.float32)), "image"),
                          (dict(images=np.stack([image] * 3)), "image"),  # 3 images for 2 outputs
                          (dict(image_embeddings=torch.zeros(E + 1)), "image_embedding"),
                          (dict(images=image, image_embeddings=torch.zeros(E)), "image"),
                          (dict(class_labels=1), "class_label"),
                          (dict(prompts="a bright top"), "prompt")]:
        with pytest.raises(SettingError) as caught:
            trained.condition(2, **kwargs)
        assert caught.value.field == field, (kwargs, caught.value)
    plain = checkpoint.LoadedModel(UNet(UNetConfig.preset("tiny")).eval(), trained.schedule, "epsilon")
    with pytest.raises(SettingError, match="takes no image") as caught:
        plain.condition(2, images=image)
    assert caught.value.field == "image"
    # no image: the unconditional decoder (zero embeddings), as no prompt is the empty prompt
    assert not trained.condition(2).image.any()


def test_slerp_stays_on_the_sphere_and_ends_exactly_at_its_ends():
    from ddpm.conditioning import slerp

    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.nn.functional.normalize(torch.randn(2, 3, E, generator=g), dim=-1)
    assert torch.equal(slerp(z0, z1, 0.0), z0) and torch.equal(slerp(z0, z1, 1.0), z1)
    for t in (0.25, 0.5, 0.9):
        z = slerp(z0, z1, t)
        assert torch.allclose(z.norm(dim=-1), torch.ones(3), atol=1e-6)
        # the angle from z0 is t of the whole angle: a constant-speed path along the great circle
        whole, part = torch.arccos((z0 * z1).sum(-1)), torch.arccos((z0 * z).sum(-1).clamp(-1, 1))
        assert torch.allclose(part, t * whole, atol=1e-5)
    per_row = slerp(z0, z1, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(per_row[0], z0[0]) and torch.equal(per_row[2], z1[2])
    assert torch.allclose(slerp(z0, z0, 0.3), z0, atol=1e-6)  # parallel: no division by sin(0)
