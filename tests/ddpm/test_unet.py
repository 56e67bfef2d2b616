"""The U-Net (ddpm/unet.py): the presets' sizes, zero init, patches, class conditioning, config validation."""

import pytest
import torch

from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint, count_parameters
from ddpm.training import train_step


def test_cifar10_preset_has_the_papers_parameter_count():
    n = count_parameters(UNet(UNetConfig.preset("cifar10")))
    assert n == pytest.approx(35.7e6, rel=0.01)


def test_digits_preset_size_and_shapes():
    cfg = UNetConfig.preset("digits")
    model = UNet(cfg)
    assert 1e6 <= count_parameters(model) <= 2e6
    out = model(torch.randn(3, 1, 16, 16), torch.tensor([0, 500, 999]))
    assert out.shape == (3, 1, 16, 16)


def test_zero_init_starts_every_branch_at_zero_and_still_trains():
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("tiny", zero_init=True, num_classes=3))
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    assert torch.count_nonzero(model(x, t, torch.tensor([0, 1, 2, -1]))) == 0  # the output layer starts at 0
    block = model.down[0][0]
    h = torch.randn(2, block.conv1.in_channels, 8, 8)
    torch.testing.assert_close(block(h, torch.randn(2, 4 * 16)), h, rtol=0, atol=0)  # a residual block: identity
    # The zeroed layers get gradients: the first step moves the output layer, the next reach the blocks behind it.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        train_step(model, optimizer, NoiseSchedule.linear(1000), x.clamp(-1, 1), lr=1e-3,
                   condition=torch.tensor([0, 1, 2, 0]))
    assert torch.count_nonzero(model(x, t)) > 0 and torch.count_nonzero(block(h, torch.randn(2, 64)) - h) > 0
    default = UNetConfig.preset("tiny")
    assert not default.zero_init and UNetConfig.from_dict(  # checkpoints saved before the option load as before
        {k: v for k, v in default.to_dict().items() if k != "zero_init"}) == default


def test_patch_size_runs_the_unet_on_a_coarser_grid():
    """p = 2 folds 2x2 patches into channels: same image in and out, a quarter of the FLOPs at equal width."""
    from torch.utils.flop_counter import FlopCounterMode

    flat, patched = UNetConfig.preset("digits"), UNetConfig.preset("digits", patch_size=2, attention_resolutions=(4,))
    assert patched.grid_size == 8
    old = {k: v for k, v in flat.to_dict().items() if k != "patch_size"}  # a checkpoint saved before patch_size
    assert UNetConfig.from_dict(old) == flat
    flops = []
    for cfg in (flat, patched):
        model = UNet(cfg)
        assert model.conv_in.in_channels == cfg.patch_size ** 2 and model.conv_out.out_channels == cfg.patch_size ** 2
        with FlopCounterMode(display=False) as counter:
            out = model(torch.randn(2, 1, 16, 16), torch.tensor([3, 900]))
        assert out.shape == (2, 1, 16, 16)
        flops.append(counter.get_total_flops())
    assert 0.2 < flops[1] / flops[0] < 0.3


def test_patch_model_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("tiny", patch_size=2, attention_resolutions=(2,))).eval()
    path = checkpoint.save(tmp_path / "ckpt", model, NoiseSchedule.linear(100))
    loaded = checkpoint.load(path, weights="model")
    assert loaded.model.config.patch_size == 2 and loaded.image_shape == (1, 8, 8)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 50])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t), model(x, t), rtol=0, atol=0)
    with pytest.raises(ValueError, match="patch_size 3 does not divide"):
        UNetConfig.preset("digits", patch_size=3)
    with pytest.raises(ValueError, match="grid"):
        UNetConfig.preset("digits", patch_size=8)  # a 2x2 grid cannot go down two levels


def test_class_conditioning_and_null_class():
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("tiny", num_classes=3)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([100, 100])
    a = model(x, t, torch.tensor([0, 0]))
    b = model(x, t, torch.tensor([2, 2]))
    assert not torch.allclose(a, b)  # the label changes the prediction
    torch.testing.assert_close(model(x, t, torch.tensor([-1, -1])), model(x, t, None))  # -1 == null == no label
    assert model.class_emb.num_embeddings == 4  # 3 classes + the learned null class


def test_unconditional_model_refuses_labels():
    model = UNet(UNetConfig.preset("tiny"))
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 1, 8, 8), torch.tensor([1]), torch.tensor([0]))


def test_invalid_unet_config():
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(image_size=10, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="unknown UNet preset"):
        UNetConfig.preset("imagenet")
    with pytest.raises(ValueError, match="unknown UNet config keys"):
        UNetConfig.from_dict({"image_size": 8, "width": 3})


@pytest.mark.parametrize("name, size, levels, paper", [("lsun256", 256, 6, 114e6), ("rgb64", 64, 4, None)])
def test_pixel_space_presets_up_to_256(name, size, levels, paper):
    """The paper's 256x256 model (LSUN, CelebA-HQ; appendix B: ch_mult (1, 1, 2, 2, 4, 4), attention at 16x16,
    114M parameters) and the 64x64 one. Built on the meta device: shapes and counts without the memory or FLOPs."""
    cfg = UNetConfig.preset(name)
    assert (cfg.image_size, cfg.in_channels, len(cfg.channel_mults)) == (size, 3, levels)
    with torch.device("meta"):
        model = UNet(cfg)
        out = model(torch.empty(2, 3, size, size), torch.zeros(2, dtype=torch.long))
        cifar10 = UNet(UNetConfig.preset("cifar10"))
    assert out.shape == (2, 3, size, size)
    n = count_parameters(model)
    if paper is not None:
        assert n == pytest.approx(paper, rel=0.01)  # 113,673,219
    else:  # the CIFAR-10 network, one level higher: the same weights, four times the pixels
        assert n == count_parameters(cifar10)
