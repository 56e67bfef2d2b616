"""The engine without Ray: a fixed forward size makes an image independent of its batch, a request costs the U-Net
rows it runs, and the sampler's runner (``deploy.batching``, plain asyncio) merges the batches that queued while it
ran. Serve itself, over real HTTP, is tested in test_serve.py.
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
        return sample(forward, schedule, x_T, sampler="ddim", steps=4, condition=torch.tensor(labels),
                      guidance_scale=guidance_scale, generator=generators)

    alone = run([6], [1])
    among_others = run([1, 2, 5, 6, 7, *range(100, 114)], [0, 0, 0, 1, 2, *[1] * 14])[3:4]
    assert torch.equal(alone, among_others)


def test_merging_runner_merges_the_batches_that_waited_while_it_ran():
    """A run starts as soon as the last one ends, with every batch that queued meanwhile, up to max_images."""
    from deploy.engine import Job, Queued
    from deploy.batching import MergingRunner

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


def tiny_served(num_classes: int = 3, latent: bool = False):
    from ddpm import Autoencoder, AutoencoderConfig, checkpoint
    from deploy.engine import ServedModel

    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("tiny", num_classes=num_classes, in_channels=4 if latent else 1)).eval()
    autoencoder = Autoencoder(AutoencoderConfig.preset("tiny")).eval() if latent else None
    loaded = checkpoint.LoadedModel(model, NoiseSchedule.linear(), "epsilon", autoencoder=autoencoder)
    return ServedModel(loaded, torch.device("cpu"), None, None, None)


def test_a_guided_request_costs_two_rows_per_image_and_step():
    """Classifier-free guidance runs the conditional and the null row: 4 images x 10 steps x 2 = 80 rows. The
    budget used to count 40, so a guided request could run twice what the server allows."""
    from deploy.engine import Edit, Job, check

    served = tiny_served()
    plain, guided = Job(4, "ddim", 10, 0.0, 0, 1, 1.0), Job(4, "ddim", 10, 0.0, 0, 1, 3.0)
    assert (served.cost(plain), served.cost(guided)) == (40, 80)
    assert check(plain, served, max_cost=40) is None
    refused = check(guided, served, max_cost=79)
    assert refused.field == "steps" and "x 2 rows for guidance" in refused.message
    assert "= 80 U-Net rows exceeds this server's budget of 79" in refused.message
    repaint = Job(2, "ddim", 10, 0.0, 0, 1, 3.0, Edit(b"", b"", resample_jumps=1, resample_times=3))
    assert served.cost(repaint) == 2 * (10 + 2 * 9) * 2  # RePaint's re-denoising, guided
    assert check(repaint, served, max_cost=111).field == "resample_times"


def test_a_latent_models_request_counts_its_decoder():
    """A latent model decodes every image (and encodes an edit's image) at the pixels' resolution: counted in U-Net
    rows from their FLOPs (the tiny f = 4 decoder is several rows of the tiny U-Net at 8x8 latents)."""
    from torch.utils.flop_counter import FlopCounterMode

    from deploy.engine import Edit, Job, check

    served = tiny_served(num_classes=0, latent=True)
    ae = served.loaded.autoencoder
    z, x = torch.zeros(1, 4, 8, 8), torch.zeros(1, 3, 32, 32)
    counts = []
    for fn, arg in [(lambda z: served.loaded.model(z, torch.zeros(1, dtype=torch.long)), z), (ae.decode, z),
                    (ae.encode, x)]:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn(arg)
        counts.append(counter.get_total_flops())
    decode, encode = -(-counts[1] // counts[0]), -(-counts[2] // counts[0])  # rounded up
    assert served.codec_rows == {"decode": decode, "encode": encode, "prior": 0} and decode > 1 and encode > 1
    job = Job(4, "ddim", 10, 0.0, 0, None, 1.0)
    assert served.cost(job) == 4 * (10 + decode)
    assert served.cost(Job(4, "ddim", 10, 0.0, 0, None, 1.0, Edit(b"", b""))) == 4 * (10 + decode + encode)
    refused = check(job, served, max_cost=4 * 10)  # enough for the steps alone
    assert refused.field == "steps" and f"+ {decode} to decode the latents" in refused.message
    assert tiny_served(latent=False).codec_rows == {"decode": 0, "encode": 0, "prior": 0}


def test_a_cancelled_request_leaves_the_batch_and_its_batch_mates_bytes_do_not_change():
    """Three requests share a batch. One is cancelled by its client after model call 3 of 10 (the flag its Control
    carries, as the Sampler sets it): its rows leave at the next call, the image-steps it saved are counted, and the
    other two come out byte for byte as without it; the one cancelled while it queued never runs. Progress reaches
    each request after each model call, and once more when its images are finished."""
    from deploy.engine import Cancelled, Control, Generated, Job, Queued, run_batch

    served = tiny_served()
    jobs = [Job(2, "ddim", 10, 0.0, 5, 1, 2.0), Job(3, "ddim", 10, 0.0, 7, 2, 2.0), Job(1, "ddim", 10, 0.0, 9, 0, 2.0)]
    whole = run_batch(served, [Queued(job, 0.0) for job in jobs], 4)

    events: dict[int, list] = {0: [], 1: [], 2: []}
    controls = [Control(lambda *e, k=k: events[k].append(e)) for k in range(3)]
    controls[1].progress = lambda *e: (events[1].append(e), e[0] == 3 and controls[1].cancelled.set())
    queued = Queued(Job(4, "ddim", 10, 0.0, 11, 1, 2.0), 0.0)
    assert queued.control.cancel()  # no run had it: the caller counts what it saved
    calls = []
    hook = served.loaded.model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    outcomes = run_batch(served, [Queued(job, 0.0, c) for job, c in zip(jobs, controls)] + [queued], 4)
    hook.remove()
    # 6 guided images = 12 rows = 3 calls of 4 rows per step for steps 1-4 (the flag set at step 3 is read at step
    # 4), then 3 images = 6 rows = 2 calls for steps 5-10: the cancelled rows really left the forward passes
    assert len(calls) == 4 * 3 + 6 * 2

    assert isinstance(outcomes[1], Cancelled) and outcomes[1].image_steps_saved == 3 * (10 - 4)
    assert outcomes[3] == Cancelled(4 * 10, ran=False)
    assert not controls[1].cancel()  # a run had it, and reported what it saved
    for k in (0, 2):
        assert isinstance(outcomes[k], Generated) and outcomes[k].images.tobytes() == whole[k].images.tobytes()
        assert events[k] == [(i, 10, 0) for i in range(1, 11)] + [(10, 10, jobs[k].num_images)]
    assert events[1] == [(i, 10, 0) for i in range(1, 4)]
    assert outcomes[0].batch == {"requests": 3, "images": 6}  # the queued-and-cancelled one never joined it


def test_an_edit_costs_its_share_of_the_steps_and_runs_the_core_edit():
    """An edit of strength s runs round(s x steps) model calls (``ddpm.strength_steps``), so it costs and reports
    that many, and its resampling counts over them; edits of different strengths never share a core call; a job
    without a mask is the core's edit of the whole image, byte for byte, alone or beside another request."""
    from ddpm import encode_png, from_uint8, inpaint_images
    from deploy.engine import Edit, Generated, Job, Queued, check, run_batch

    served = tiny_served()
    pixels = (torch.rand(8, 8, 1, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    half = Job(4, "ddim", 10, 0.0, 3, 1, 1.0, Edit(encode_png(pixels), None, strength=0.5))
    assert half.model_calls() == 5 and served.cost(half) == 4 * 5
    resampled = Job(1, "ddim", 10, 0.0, 3, 1, 1.0, Edit(b"", None, resample_jumps=2, resample_times=3, strength=0.5))
    assert resampled.model_calls() == 5 + 2 * 2 * 2  # jump points 4 and 2 of the 5 steps, 2 more passes of 2 steps
    refused = check(resampled, served, max_cost=12)
    assert refused.field == "resample_times" and "13 model calls (steps plus RePaint's resampling)" in refused.message
    whole = Job(2, "ddim", 10, 0.0, 9, 2, 1.0, Edit(encode_png(pixels), None, strength=1.0))
    assert half.batch_key() != whole.batch_key()

    [alone] = run_batch(served, [Queued(half, 0.0)], 16)
    both = run_batch(served, [Queued(half, 0.0), Queued(whole, 0.0)], 16)
    assert isinstance(alone, Generated) and all(isinstance(o, Generated) for o in both)
    core = inpaint_images(served.loaded, half.seeds(), from_uint8(pixels[None]).expand(4, -1, -1, -1), None,
                          condition=torch.tensor([1] * 4), steps=10, strength=0.5, forward_rows=16)
    assert alone.images.tobytes() == both[0].images.tobytes() == core.tobytes()
