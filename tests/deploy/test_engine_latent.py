"""The engine (deploy/engine.py, no Ray) inpainting a latent model: what ``POST /inpaint`` runs on a replica.

The model's autoencoder has its scaling factor measured as training measures it (tests/ddpm/latent_checkpoint.py),
so the known image's latents leave [-1, 1]. RePaint used to apply the pixels' range check to them: ``run_batch``
raised ValueError and the endpoint answered 500 for every inpainting request on a trained latent model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm import checkpoint, encode_png, from_uint8, inpaint_images
from deploy.engine import Edit, Generated, Job, Queued, ServedModel, run_batch
from tests.ddpm.latent_checkpoint import latent_extent, random_pixels, save_latent_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_run_batch_inpaints_a_latent_model_as_the_core_does(tmp_path):
    path, ae = save_latent_checkpoint(tmp_path / "latent")
    served = ServedModel(checkpoint.load(path), torch.device("cpu"), "photos-latent", "1", None)
    pixels = random_pixels(1, seed=1)[0]  # (32, 32, 3) uint8
    assert latent_extent(ae, pixels[None]) > 1.5  # what made the old code fail
    generate = np.zeros((32, 32), dtype=bool)
    generate[4:28, 16:] = True
    edit = Edit(encode_png(pixels), encode_png((generate * 255).astype(np.uint8)[..., None]))
    job = Job(num_images=2, sampler="ddim", steps=3, eta=0.0, seed=5, class_label=None, guidance_scale=1.0,
              edit=edit)
    sampled = Job(num_images=1, sampler="ddim", steps=3, eta=0.0, seed=9, class_label=None, guidance_scale=1.0)

    outcomes = run_batch(served, [Queued(job, 0.0), Queued(sampled, 0.0)], micro_batch=16)

    assert all(isinstance(o, Generated) for o in outcomes), outcomes
    images = outcomes[0].images  # (2, 32, 32, 3) uint8
    assert images.shape == (2, 32, 32, 3) and outcomes[0].seeds == [5, 6]
    assert (images[:, ~generate] == pixels[~generate]).all()  # the kept pixels, bit for bit
    assert not np.array_equal(images[0], images[1])  # two seeds, two fillings
    # the same bytes as the core's one path at the same rows (what `ddpm inpaint` returns for that seed)
    known = from_uint8(pixels[None]).expand(2, -1, -1, -1)
    mask = torch.as_tensor(generate, dtype=torch.float32)[None, None].expand(2, -1, -1, -1)
    expected = inpaint_images(served.loaded, [5, 6], known, mask, sampler="ddim", steps=3, forward_rows=16)
    np.testing.assert_array_equal(images, expected)
    assert outcomes[1].images.shape == (1, 32, 32, 3)
