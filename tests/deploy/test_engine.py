"""The engine without Ray: a fixed forward size makes an image independent of its batch, and the sampler's runner
merges the batches that queued while it ran.

``MergingRunner`` lives in ``deploy.serve_app`` (importing it imports ``ray.serve``), but it is plain asyncio: these
tests start no Ray. Serve itself, over real HTTP, is tested in test_serve.py.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from ddpm import NoiseSchedule, UNet, UNetConfig, fixed_size_forward, noise_from_seeds, sample


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_fixed_size_forward_makes_an_image_independent_of_its_batch(guidance_scale):
    """At a fixed forward size, an image's float output is bit-identical alone and among 18 other images.

    The plain model is not: on this machine's CPU the same image differs by about 2e-4 after four DDIM steps.
    """
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("tiny", num_classes=3)).eval()
    schedule = NoiseSchedule.linear(num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    forward = fixed_size_forward(model, 8)

    def run(seeds, labels):
        x_T, generators = noise_from_seeds(seeds, (1, 8, 8))
        return sample(forward, schedule, x_T, sampler="ddim", steps=4, class_labels=torch.tensor(labels),
                      guidance_scale=guidance_scale, generator=generators)

    alone = run([6], [1])
    among_others = run([1, 2, 5, 6, 7, *range(100, 114)], [0, 0, 0, 1, 2, *[1] * 14])[3:4]
    assert torch.equal(alone, among_others)


def test_merging_runner_merges_the_batches_that_waited_while_it_ran():
    """A run starts as soon as the last one ends, with every batch that queued meanwhile, up to max_images."""
    from deploy.engine import Job, Queued
    from deploy.serve_app import MergingRunner

    def batch(seed: int, num_images: int) -> list[Queued]:
        return [Queued(Job(num_images, "ddim", 2, 0.0, seed, None, 1.0), 0.0)]

    runs, release_first = [], asyncio.Event()

    async def run(items: list[Queued]) -> list[int]:
        runs.append([item.job.seed for item in items])
        if len(runs) == 1:
            await release_first.wait()
        return [item.job.seed for item in items]

    async def scenario():
        runner = MergingRunner(run, max_images=8)
        first = asyncio.create_task(runner.submit(batch(0, 1)))
        await asyncio.sleep(0.01)  # the first run is under way
        later = [asyncio.create_task(runner.submit(batch(seed, 3))) for seed in (1, 2, 3, 4)]
        await asyncio.sleep(0.01)
        later[1].cancel()  # a client went away while its batch waited
        release_first.set()
        return await asyncio.gather(first, later[0], later[2], later[3])

    results = asyncio.run(scenario())
    assert runs == [[0], [1, 3], [4]]  # 1 + 2 (cancelled) fill 6 of 8 images, batch 3 would make 9: it waits
    assert results == [[0], [1], [3], [4]]
