"""Latent models in the core: a checkpoint carries its autoencoder, and the one generation path decodes.

A U-Net on 4x8x8 latents with the ``tiny`` autoencoder (f = 4) behind it makes 3x32x32 images; random weights are
enough, since what is tested is the plumbing: shapes, that decoding is the autoencoder's own, seed independence, and
that inpainting keeps the known pixels exactly. The autoencoder's scaling factor is measured as training measures it
(tests/ddpm/latent_checkpoint.py), so its latents leave [-1, 1] as a trained one's do.
"""

import json

import numpy as np
import pytest
import torch

from ddpm import checkpoint, from_uint8, generate_images, inpaint_images, sample, to_uint8
from ddpm.generation import noise_from_seeds
from tests.ddpm.latent_checkpoint import latent_extent, random_pixels, save_latent_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def latent_model(tmp_path_factory):
    return save_latent_checkpoint(tmp_path_factory.mktemp("latent") / "model")


def test_a_latent_checkpoint_carries_its_autoencoder_and_says_where_it_came_from(latent_model):
    path, ae = latent_model
    config = json.loads((path / "config.json").read_text())
    assert config["image_shape"] == [4, 8, 8]  # what the U-Net runs on
    assert config["autoencoder"] == {"folder": "autoencoder", "image_shape": [3, 32, 32],
                                     "source": {"uri": "models:/photos-ae/3", "name": "photos-ae", "version": "3"}}
    loaded = checkpoint.load(path)
    assert loaded.sample_shape == (4, 8, 8) and loaded.image_shape == (3, 32, 32)
    assert loaded.autoencoder.config.scaling_factor == ae.config.scaling_factor != 1.0  # measured, and kept
    for name, tensor in ae.state_dict().items():
        assert torch.equal(loaded.autoencoder.state_dict()[name], tensor), name


def test_a_latent_checkpoint_without_its_autoencoder_is_refused(latent_model, tmp_path):
    import shutil

    path, _ = latent_model
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "autoencoder" / "model.safetensors").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors"):
        checkpoint.load(broken)


def test_generate_images_decodes_the_sampled_latents(latent_model):
    path, _ = latent_model
    loaded = checkpoint.load(path)
    images = generate_images(loaded, [3, 4], sampler="ddim", steps=4, forward_rows=None)  # (2, 32, 32, 3)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8

    # by hand: the same latents through the sampler, then the autoencoder's own decode
    x_T, generators = noise_from_seeds([3, 4], (4, 8, 8), torch.device("cpu"))
    with torch.inference_mode():
        z_0 = sample(loaded.model, loaded.schedule, x_T, sampler="ddim", steps=4, generator=generators)
        expected = to_uint8(loaded.autoencoder.decode(z_0))
    np.testing.assert_array_equal(images, expected)
    assert images.std() > 0


def test_a_latent_image_depends_on_its_seed_alone(latent_model):
    loaded = checkpoint.load(latent_model[0])
    together = generate_images(loaded, [7, 8, 9], sampler="ddim", steps=3)
    alone = generate_images(loaded, [8], sampler="ddim", steps=3)
    np.testing.assert_array_equal(together[1], alone[0])


def test_inpainting_a_latent_model_keeps_the_known_pixels_exactly(latent_model):
    """The known image's latents leave [-1, 1] (as a trained autoencoder's do); before the range check moved to the
    pixels, RePaint applied it to them and every latent inpainting failed with "image must be in [-1, 1]"."""
    loaded = checkpoint.load(latent_model[0])
    known_u8 = random_pixels(2, seed=1)  # (2, 32, 32, 3)
    assert latent_extent(loaded.autoencoder, known_u8) > 1.5
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 10:22, 5:14] = 1  # not aligned to the latents' 4x4 cells
    out = inpaint_images(loaded, [0, 1], from_uint8(known_u8), mask, sampler="ddim", steps=3)
    keep = ~mask[:, 0].bool().numpy()  # (2, 32, 32)
    np.testing.assert_array_equal(out[keep], known_u8[keep])
    generated = mask[:, 0].bool().numpy()
    assert (out[generated] != known_u8[generated]).mean() > 0.5  # the hole is the model's, not the input's
    with pytest.raises(ValueError, match="empty"):
        inpaint_images(loaded, [0], from_uint8(known_u8[:1]), torch.zeros(1, 1, 32, 32), steps=2)
    with pytest.raises(ValueError, match=r"image must be in \[-1, 1\], got values in \[0, 255\]"):  # pixels are
        inpaint_images(loaded, [0], torch.from_numpy(known_u8[:1]).permute(0, 3, 1, 2).float(), mask[:1], steps=2)
