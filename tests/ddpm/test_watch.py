"""Watching a batch and taking images out of it mid-way (``ddpm.generation.Watch``): what a cancelled request
relies on. The images that stay must come out byte for byte as without the watch, the ones that leave must stop
costing network rows from the next model call on, and the watch must see every model call, counted."""

import dataclasses

import numpy as np
import pytest
import torch

from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint, from_labels, generate_images, inpaint_images, sample
from ddpm.checkpoint import LoadedModel
from ddpm.generation import fixed_size_forward
from ddpm.sampling import noise_from_seeds
from tests.ddpm.latent_checkpoint import save_latent_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = [11, 12, 13, 14, 15, 16]
ROWS = 2  # forward rows: 6 guided images = 12 network rows = 6 calls of the network per step


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    config = dataclasses.replace(UNetConfig.preset("tiny"), num_classes=3)
    return LoadedModel(UNet(config).eval(), NoiseSchedule.linear(), "epsilon")


class CountingNetwork(torch.nn.Module):
    """The network, counting the calls it gets (each of ``ROWS`` rows under ``fixed_size_forward``)."""

    def __init__(self, network):
        super().__init__()
        self.network, self.calls = network, 0

    def forward(self, *args):
        self.calls += 1
        return self.network(*args)


def leave_at(call: int, leaving: set[int], seen: list):
    """A watch that takes the images ``leaving`` (indices into the seeds) out after model call ``call``."""

    def watch(done, calls, rows):
        seen.append((done, calls, list(rows)))
        return [row not in leaving for row in rows] if done == call else None

    return watch


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddpm", 0.0), ("dpm++", 0.0), ("ddim", 1.0)])
def test_images_that_stay_are_unchanged_and_the_ones_that_leave_stop_costing(loaded, sampler, eta):
    """DDPM and DDIM with eta draw noise per step (the generators must drop in step), DPM++ keeps a history of x_0
    (it must drop too); guidance doubles the rows. Two of six images leave after call 3 of 8."""
    condition = from_labels([0, 1, 2, 0, 1, 2], len(SEEDS))
    settings = dict(condition=condition, sampler=sampler, steps=8, eta=eta, guidance_scale=2.0)
    whole = generate_images(loaded, SEEDS, forward_rows=ROWS, **settings)

    counting = CountingNetwork(loaded.model)
    seen = []
    watched = generate_images(loaded, SEEDS, forward=fixed_size_forward(counting, ROWS),
                              watch=leave_at(3, {1, 4}, seen), **settings)
    stay = [0, 2, 3, 5]
    assert np.array_equal(watched[stay], whole[stay])  # byte for byte
    assert not watched[[1, 4]].any()  # the images that left come back all zeros
    assert [done for done, _, _ in seen] == list(range(1, 9)) and {calls for _, calls, _ in seen} == {8}
    assert seen[2][2] == list(range(6)) and seen[3][2] == stay  # the rows still sampling, as the watch saw them
    # 3 calls at 6 images x 2 (guidance) / 2 rows, then 5 calls at 4 images x 2 / 2 rows
    assert counting.calls == 3 * 6 + 5 * 4


def test_when_every_image_leaves_the_sampler_stops(loaded):
    counting = CountingNetwork(loaded.model)
    seen = []
    images = generate_images(loaded, SEEDS[:2], forward=fixed_size_forward(counting, ROWS), steps=10,
                             watch=leave_at(2, {0, 1}, seen))
    assert images.shape == (2, 8, 8, 1) and not images.any()
    assert counting.calls == 2 and len(seen) == 2


def test_inpainting_drops_rows_through_its_resampling_jumps(loaded):
    """RePaint with jumps: the watch counts every model call (``ddpm.inpainting.model_calls``), and the images that
    stay equal the run without a watch, their kept pixels too."""
    known = torch.rand(4, 1, 8, 8) * 2 - 1
    masks = torch.zeros(4, 1, 8, 8)
    masks[..., 4:] = 1
    settings = dict(sampler="ddim", steps=6, resample_jumps=2, resample_times=2, forward_rows=ROWS)
    whole = inpaint_images(loaded, SEEDS[:4], known, masks, **settings)
    seen = []
    watched = inpaint_images(loaded, SEEDS[:4], known, masks, watch=leave_at(4, {0, 3}, seen), **settings)
    assert np.array_equal(watched[[1, 2]], whole[[1, 2]]) and not watched[[0, 3]].any()
    calls = seen[0][1]
    assert calls == 6 + 1 * 2 * len(range(5, 1, -2))  # steps + (r - 1) j (jump points k = 5, 3)
    assert [done for done, _, _ in seen] == list(range(1, calls + 1))


def test_a_latent_model_decodes_only_the_images_that_stay(tmp_path):
    path, _ = save_latent_checkpoint(tmp_path / "model")
    latent = checkpoint.load(path)
    whole = generate_images(latent, SEEDS[:3], steps=4, forward_rows=ROWS)
    watched = generate_images(latent, SEEDS[:3], steps=4, forward_rows=ROWS, watch=leave_at(1, {1}, []))
    assert watched.shape == whole.shape == (3, 32, 32, 3)  # decoded images, the one that left as zeros
    assert np.array_equal(watched[[0, 2]], whole[[0, 2]]) and not watched[1].any()


def test_one_shared_generator_cannot_drop_rows(loaded):
    """With one generator for the batch, a kept row's later noise would depend on the rows that left: refused."""
    x_T = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="its own generator"):
        sample(loaded.model, loaded.schedule, x_T, sampler="ddpm", steps=3, generator=torch.Generator(),
               callback=lambda i, t, x: torch.tensor([True, False]))
    x_T, generators = noise_from_seeds([1, 2], (1, 8, 8))
    kept = sample(loaded.model, loaded.schedule, x_T, sampler="ddpm", steps=3, generator=generators,
                  callback=lambda i, t, x: torch.tensor([True, False]) if len(x) == 2 else None)
    assert kept.shape == (1, 1, 8, 8)
