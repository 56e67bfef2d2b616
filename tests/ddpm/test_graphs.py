"""ddpm.graphs: the CUDA-graph forward. On the CPU it must be fixed_size_forward exactly (tested here); the capture
itself needs a GPU and runs where one is present (benchmarks/gpu.py runs the same checks at full size on the device)."""

import numpy as np
import pytest
import torch

from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint, fixed_size_forward, from_labels, generate_images
from ddpm.graphs import GraphedForward, graphed_forward

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")


@pytest.fixture(scope="module")
def unconditional():
    torch.manual_seed(1)
    return UNet(UNetConfig.preset("tiny")).eval()


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    t = torch.full((n,), 417, dtype=torch.long)
    y = torch.tensor([0, 2, -1, 1, 0, 2, -1][:n])
    return x, t, y


@torch.no_grad()
def test_cpu_fallback_is_fixed_size_forward_bit_for_bit(tiny, unconditional):
    x, t, y = _inputs(7)  # rows 3: chunks of 3, 3 and 1 (the last one padded)
    got = graphed_forward(tiny, 3)(x, t, y)
    assert not isinstance(graphed_forward(tiny, 3), GraphedForward)
    assert torch.equal(got, fixed_size_forward(tiny, 3)(x, t, y))
    assert torch.equal(graphed_forward(tiny, 3)(x, t), fixed_size_forward(tiny, 3)(x, t))  # conditional, no labels
    assert torch.equal(graphed_forward(unconditional, 3)(x, t), fixed_size_forward(unconditional, 3)(x, t))
    assert got.shape == (7, 1, 8, 8)


@torch.no_grad()
def test_cpu_fallback_pads_so_that_a_row_does_not_depend_on_its_batch(tiny):
    x, t, y = _inputs(7)
    forward = graphed_forward(tiny, 4)
    together = forward(x, t, y)
    for i in range(7):
        assert torch.equal(forward(x[i:i + 1], t[i:i + 1], y[i:i + 1]), together[i:i + 1])


def test_generate_images_with_the_graphed_forward_matches_forward_rows(tiny):
    loaded = checkpoint.LoadedModel(tiny, NoiseSchedule.linear(), "epsilon")
    seeds = [5, 6, 7, 8, 9]
    labels = from_labels([0, 1, 2, 0, 1], 5)
    graphed = generate_images(loaded, seeds, condition=labels, steps=4, guidance_scale=1.5,
                              forward=graphed_forward(tiny, 4))
    plain = generate_images(loaded, seeds, condition=labels, steps=4, guidance_scale=1.5, forward_rows=4)
    np.testing.assert_array_equal(graphed, plain)


def test_settings_are_checked(unconditional):
    with pytest.raises(ValueError, match="at least 1"):
        graphed_forward(unconditional, 0)
    bare = torch.nn.Conv2d(1, 1, 3, padding=1)  # no config to read the conditioning from
    with pytest.raises(ValueError, match="conditional"):
        graphed_forward(bare, 4)
    forward = graphed_forward(lambda_module(bare), 4, conditional=False)
    x, t, _ = _inputs(2)
    assert forward(x, t).shape == (2, 1, 8, 8)


def lambda_module(conv):
    """A config-less network with the (x, t[, y]) signature."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x, t, y=None):
            return self.conv(x)

    return Net()


# -- on a GPU: the capture itself --------------------------------------------------------------------------------
@cuda
@torch.no_grad()
def test_capture_matches_eager_and_keeps_rows_independent(tiny):
    model = UNet(tiny.config).cuda().eval()
    model.load_state_dict(tiny.state_dict())
    forward = graphed_forward(model, 4)
    assert isinstance(forward, GraphedForward)
    assert graphed_forward(model, 4) is forward  # one recording per model and settings
    x, t, y = (v.cuda() for v in _inputs(7))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        together = forward(x, t, y)
        alone = [forward(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(7)]
        eager = fixed_size_forward(model, 4)(x, t, y)
    assert forward.recordings == 1
    for i in range(7):
        assert torch.equal(alone[i], together[i:i + 1])
    torch.testing.assert_close(together.float(), eager.float(), atol=2e-2, rtol=2e-2)
    fp32 = forward(x, t, y)  # autocast off: a second recording
    assert forward.recordings == 2
    torch.testing.assert_close(fp32, fixed_size_forward(model, 4)(x, t, y), atol=1e-3, rtol=1e-3)


@cuda
def test_capture_sees_in_place_weight_updates(tiny):
    model = UNet(tiny.config).cuda().eval()
    forward = graphed_forward(model, 2)
    x, t, y = (v.cuda() for v in _inputs(2))
    before = forward(x, t, y)
    with torch.no_grad():
        model.load_state_dict(tiny.state_dict())  # copies into the same tensors
    after = forward(x, t, y)
    assert not torch.equal(before, after)
    with torch.no_grad():
        torch.testing.assert_close(after, fixed_size_forward(model, 2)(x, t, y), atol=1e-3, rtol=1e-3)
