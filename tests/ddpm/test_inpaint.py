"""Inpainting (RePaint) against closed forms: Gaussian priors whose conditionals are known, exact pixel keeping,
identities with plain sampling, RePaint's time walk, outpainting canvases and bad masks.

The ``ddpm inpaint`` command (and a briefly trained digits model completing right halves) is tested in
tests/pipelines/test_inpaint_command.py, ``POST /inpaint`` over HTTP in tests/deploy/test_serve.py, the playground's
Edit mode in tests/deploy/test_playground.py.
"""

import math

import numpy as np
import pytest
import torch

from tests.ddpm.analytic import GaussianEps
from ddpm import from_uint8, inpaint, noise_from_seeds, outpaint_canvas, sample, to_uint8
from ddpm.inpainting import check_pixels, repaint_walk

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


class GaussianEpsCov:
    """The optimal noise predictor for x_0 ~ N(mu, Sigma) over the D = C*H*W values of an image (full covariance).

    x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps is Gaussian with mean sqrt(ab) mu and covariance ab Sigma + (1 - ab) I,
    and Cov(eps, x_t) = sqrt(1 - ab) I, so the regression of eps on x_t is

        E[eps | x_t] = sqrt(1 - ab) (ab Sigma + (1 - ab) I)^{-1} (x_t - sqrt(ab) mu).

    With Sigma = s^2 I it is tests/analytic.py's GaussianEps.
    """

    def __init__(self, schedule, mu, cov):
        self.ab = schedule.alphas_cumprod.tolist()
        self.mu = torch.as_tensor(mu, dtype=torch.float64)  # (D,)
        # Sigma = U diag(lam) U^T, so (ab Sigma + (1 - ab) I)^{-1} = U diag(1 / (ab lam + 1 - ab)) U^T
        self.lam, self.u = torch.linalg.eigh(torch.as_tensor(cov, dtype=torch.float64))

    def __call__(self, x_t, t, y=None):
        ab = self.ab[int(t[0])]  # the samplers call the model with one timestep for the whole batch
        gain = math.sqrt(1 - ab) * (self.u / (ab * self.lam + 1 - ab)) @ self.u.T  # (D, D), symmetric
        eps = (x_t.flatten(1) - math.sqrt(ab) * self.mu.float()) @ gain.float()  # (B, D)
        return eps.reshape(x_t.shape)


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _random_case(shape, seed, mask_channels=1):
    """A uint8-exact image (B, C, H, W) in [-1, 1] and a random binary mask with something to generate."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    image = from_uint8(torch.randint(0, 256, (b, h, w, c), generator=g, dtype=torch.uint8))
    mask = (torch.rand(b, mask_channels, h, w, generator=g) < 0.5).float()
    mask[:, :, 0, 0] = 1
    return image, mask


# -- the known region ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
@pytest.mark.parametrize("jumps, times", [(1, 1), (2, 3)])
def test_known_pixels_come_back_exactly(tiny, schedule, sampler, jumps, times):
    image, mask = _random_case((2, 1, 8, 8), seed=1)
    out = inpaint(tiny, schedule, image, mask, sampler=sampler, steps=6, eta=0.5, resample_jumps=jumps,
                  resample_times=times, condition=torch.tensor([0, 2]), guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(0))
    keep = mask.expand_as(image) == 0
    assert torch.equal(out[keep], image[keep])
    assert np.array_equal(to_uint8(out)[keep.permute(0, 2, 3, 1).numpy()],
                          to_uint8(image)[keep.permute(0, 2, 3, 1).numpy()])
    assert not torch.equal(out[~keep], image[~keep])


def test_per_channel_mask_keeps_exactly_its_channels(schedule):
    """A (B, C, H, W) mask can keep one channel of a pixel and generate the others."""
    image, mask = _random_case((3, 3, 4, 4), seed=2, mask_channels=3)
    out = inpaint(GaussianEps(schedule, 0.0, 0.5), schedule, image, mask, sampler="ddim", steps=10)
    assert torch.equal(out[mask == 0], image[mask == 0])


# -- identities ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_with_nothing_known_inpainting_is_sampling(tiny, schedule, sampler):
    """An all-ones mask leaves nothing to replace: deterministic samplers give exactly ``sample``'s output from the
    same x_T (the first draw of each image's generator), conditioning and guidance included."""
    kw = dict(sampler=sampler, steps=8, condition=torch.tensor([1, 2]), guidance_scale=3.0)
    x_T, gens = noise_from_seeds([4, 5], (1, 8, 8))
    ref = sample(tiny, schedule, x_T, generator=gens, **kw)
    out = inpaint(tiny, schedule, torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8), generator=_generators([4, 5]),
                  **kw)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_per_image_seeds_are_batch_invariant(tiny, schedule):
    """Image i depends only on its own generator: every draw (x_T, known-region noise, step noise, jump noise)."""
    image, mask = _random_case((3, 1, 8, 8), seed=3)
    kw = dict(sampler="ddpm", steps=8, resample_jumps=2, resample_times=2)
    batch = inpaint(tiny, schedule, image, mask, generator=_generators([5, 6, 7]), **kw)
    alone = inpaint(tiny, schedule, image[1:2], mask[1:2], generator=_generators([6]), **kw)
    # A batch of 3 and a batch of 1 may run different convolution kernels (another summation order), so the two
    # agree to rounding amplified over the steps (7e-5 seen on an AMD EPYC); a seed mix-up differs by O(1).
    torch.testing.assert_close(batch[1:2], alone, atol=1e-4, rtol=1e-4)


# -- the generated region against closed forms --------------------------------------------------------------------
MU, S = 0.3, 0.5
N_IND = 2000  # images of 4x4, right half generated: 16,000 i.i.d. generated values per run


# Independent pixels: the known half tells nothing about the generated half, whose values must follow the prior
# N(MU, S^2) whatever the known pixels are (here 0.9, far from MU). Tolerances as in test_sampling.py: 5 standard
# errors of the mean (S/sqrt(n) = 0.0040) and of the standard deviation (S/sqrt(2n) = 0.0028) for n = 16,000, plus a
# discretisation bias of the spread measured with this denoiser (50-step DDIM -5.8%, 20-step DPM-Solver++ -4.5%,
# 250-step DDPM with j = 10, r = 10 -5.5%: each jump and return is another pass of the discretised reverse process,
# which shrinks the spread a little; 1000-step DDPM is exact up to noise), allowed with a margin of about 1.4x.
@pytest.mark.parametrize("sampler, steps, jumps, times, std_bias", [
    ("ddpm", 1000, 1, 1, 0.0), ("ddim", 50, 1, 1, 0.08), ("dpm++", 20, 1, 1, 0.06), ("ddpm", 250, 10, 10, 0.08)])
def test_independent_prior_fills_with_the_prior(schedule, sampler, steps, jumps, times, std_bias):
    image = torch.full((N_IND, 1, 4, 4), 0.9)
    mask = torch.zeros(N_IND, 1, 4, 4)
    mask[..., 2:] = 1
    out = inpaint(GaussianEps(schedule, MU, S), schedule, image, mask, sampler=sampler, steps=steps,
                  resample_jumps=jumps, resample_times=times, generator=torch.Generator().manual_seed(0))
    generated, n = out[..., 2:], N_IND * 8
    assert generated.mean().item() == pytest.approx(MU, abs=5 * S / math.sqrt(n))
    assert generated.std().item() == pytest.approx(S, abs=5 * S / math.sqrt(2 * n) + std_bias * S)


# Correlated pixels: x_0 = (x1, x2) ~ N(mu, Sigma) with correlation RHO. Keep x1 = X1, generate x2; the exact answer
# is the conditional N(MU2 + RHO S2/S1 (X1 - MU1), S2^2 (1 - RHO^2)) = N(0.205, 0.1308^2), 0.405 above the prior mean.
MU1, MU2, S1, S2, RHO = 0.1, -0.2, 0.4, 0.3, 0.9
X1 = MU1 + 1.5 * S1
COND_MEAN, COND_STD = MU2 + RHO * S2 / S1 * (X1 - MU1), S2 * math.sqrt(1 - RHO**2)
SHIFT = COND_MEAN - MU2
N_PAIRS = 4000


def _fill_pairs(schedule, **kw):
    model = GaussianEpsCov(schedule, [MU1, MU2], [[S1**2, RHO * S1 * S2], [RHO * S1 * S2, S2**2]])
    image = torch.tensor([X1, 0.0]).reshape(1, 1, 1, 2).repeat(N_PAIRS, 1, 1, 1)  # (N, 1, 1, 2)
    mask = torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2).repeat(N_PAIRS, 1, 1, 1)  # generate x2
    out = inpaint(model, schedule, image, mask, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(out[..., 0], image[..., 0])
    return out[..., 1].flatten()  # (N,)


# Plain replacement (r = 1) lets the known pixel steer x2 only through each step's prediction, and leaves x2 pulled
# toward the prior mean MU2 (measured: 22% of SHIFT for 250-step DDPM, 39% for 50-step DDIM). Resampling re-generates
# x2 while already in step with x1; it does not reach the exact conditional in finitely many passes (measured
# residual: 5.8% of SHIFT for DDPM-250 with RePaint's j = 10, r = 10; 10% for DDIM-50 with j = 1, r = 10).
# Tolerances: 5 standard errors of the mean (0.13/sqrt(4000) = 0.0021) plus the residual with a margin of about 1.4x;
# for the spread, 5 standard errors of the standard deviation (0.0015) plus the measured error (+0.9%, -3.9%) x 1.5.
@pytest.mark.parametrize("sampler, steps, jumps, times, residual, std_err", [
    ("ddpm", 250, 10, 10, 0.08, 0.015), ("ddim", 50, 1, 10, 0.15, 0.06)])
def test_resampling_recovers_the_conditional_of_a_correlated_prior(schedule, sampler, steps, jumps, times, residual,
                                                                    std_err):
    plain = _fill_pairs(schedule, sampler=sampler, steps=steps)
    repaint = _fill_pairs(schedule, sampler=sampler, steps=steps, resample_jumps=jumps, resample_times=times)
    plain_bias, repaint_bias = COND_MEAN - plain.mean().item(), COND_MEAN - repaint.mean().item()
    # replacement alone is biased toward the prior mean ...
    assert plain_bias > 0.15 * SHIFT
    # ... resampling moves the mean toward the conditional one, and the spread toward the conditional spread
    assert abs(repaint_bias) < plain_bias / 2.5
    assert abs(repaint.std().item() - COND_STD) < abs(plain.std().item() - COND_STD)
    # ... to within the tolerance derived above
    se = COND_STD / math.sqrt(N_PAIRS)
    assert repaint.mean().item() == pytest.approx(COND_MEAN, abs=5 * se + residual * SHIFT)
    assert repaint.std().item() == pytest.approx(COND_STD, abs=5 * se / math.sqrt(2) + std_err * COND_STD)


# -- RePaint's time walk ------------------------------------------------------------------------------------------
def _repaint_reference(t_T, jump_length, jump_n_sample):
    """RePaint's own ``get_schedule_jump`` (its first jump settings only), in its indices: t_T - 1 .. 0, then -1.

    It goes forward one level at a time; the composition of those steps is the one jump q(x_{t+j} | x_t).
    """
    jumps = {j: jump_n_sample - 1 for j in range(0, t_T - jump_length, jump_length)}
    t, ts = t_T, []
    while t >= 1:
        t = t - 1
        ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] = jumps[t] - 1
            for _ in range(jump_length):
                t = t + 1
                ts.append(t)
    return ts + [-1]


def test_repaint_walk():
    assert repaint_walk(5) == [0, 1, 2, 3, 4, 5]  # r = 1: plain replacement
    # j = 1, r = 2 is Algorithm 1 with U = 2: every level but the last is denoised twice
    assert repaint_walk(4, 1, 2) == [0, 1, 0, 1, 2, 1, 2, 3, 2, 3, 4]
    for n, j, r in [(250, 10, 10), (50, 1, 10), (50, 10, 10), (37, 4, 3), (20, 19, 2), (20, 25, 3)]:
        walk = repaint_walk(n, j, r)
        moves = np.diff(walk)
        assert walk[0] == 0 and walk[-1] == n and set(moves) <= {1, -j}
        ref = [n - 1 - t for t in _repaint_reference(n, j, r)]  # position k <-> RePaint's t = n - 1 - k
        ref = [k for i, k in enumerate(ref) if not 0 < i < len(ref) - 1 or not ref[i - 1] > k > ref[i + 1]]
        assert walk == ref  # the same walk, each forward run of single levels drawn as one jump
    walk = repaint_walk(250, 10, 10)
    assert sum(np.diff(walk) == 1) == 250 + 9 * 10 * 24  # model calls: 24 jump points (k = 249, 239, ..., 19)
    with pytest.raises(ValueError, match="resample"):
        repaint_walk(10, 0, 2)


# -- outpainting --------------------------------------------------------------------------------------------------
def test_outpaint_canvas(schedule):
    image, _ = _random_case((2, 1, 4, 4), seed=4)
    canvas, mask = outpaint_canvas(image, 8, offset=(1, 3))
    assert canvas.shape == (2, 1, 8, 8) and mask.shape == (2, 1, 8, 8)
    assert torch.equal(canvas[..., 1:5, 3:7], image)
    assert mask[..., 1:5, 3:7].sum() == 0 and mask.sum() == 2 * (64 - 16)
    out = inpaint(GaussianEps(schedule, 0.0, 0.5), schedule, canvas, mask, sampler="ddim", steps=10)
    assert torch.equal(out[..., 1:5, 3:7], image)
    assert outpaint_canvas(image, (6, 10), (2, 6))[0].shape == (2, 1, 6, 10)
    with pytest.raises(ValueError, match="does not fit"):
        outpaint_canvas(image, 8, offset=(5, 0))
    with pytest.raises(ValueError, match="does not fit"):
        outpaint_canvas(image, 8, offset=(0, -1))


# -- bad input ----------------------------------------------------------------------------------------------------
def test_bad_masks_and_settings_are_rejected(tiny, schedule):
    image, mask = _random_case((2, 3, 4, 4), seed=5)
    model = GaussianEps(schedule, 0.0, 0.5)
    run = lambda img, m, **kw: inpaint(model, schedule, img, m, **{"steps": 4, **kw})  # noqa: E731
    for bad in (mask[:, :, :, :3], mask[:1], torch.ones(2, 2, 4, 4), mask[:, 0]):
        with pytest.raises(ValueError, match=r"mask must have shape \(2, 1, 4, 4\) or \(2, 3, 4, 4\)"):
            run(image, bad)
    with pytest.raises(ValueError, match="binary"):
        run(image, mask * 0.5)
    with pytest.raises(ValueError, match="binary"):
        run(image, mask * 255)  # a 0/255 mask read from a file must be scaled to 0/1
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="mask of image 1 is empty"):
        run(image, empty)
    with pytest.raises(ValueError, match=r"image must be in \[-1, 1\], got values in \[0, 25"):
        check_pixels(image * 127.5 + 127.5)  # the pixels' check, which ddpm.inpaint_images applies
    # RePaint itself runs in the model's space: a latent model's unit-std latents leave [-1, 1] and are kept exactly
    latents = image * 2.5
    assert torch.equal(run(latents, mask)[mask.expand_as(image) == 0], latents[mask.expand_as(image) == 0])
    with pytest.raises(ValueError, match="resample_jumps"):
        run(image, mask, resample_jumps=4, resample_times=2)
    with pytest.raises(ValueError, match="resample"):
        run(image, mask, resample_times=0)
    with pytest.raises(ValueError, match="sampler"):
        run(image, mask, sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        run(image, mask, steps=1001)
