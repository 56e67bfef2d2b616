"""The U-Net, the loss, EMA, the checkpoint format and the metric math."""

import functools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from ddpm import (EMA, NoiseSchedule, UNet, UNetConfig, checkpoint, count_parameters, diffusion_loss,
                  frechet_distance, frechet_distance_features, make_grid, noise_from_seeds, precision_recall,
                  sample, to_uint8)
from ddpm.losses import loss_weights
from ddpm.training import autocast_dtype, cpu_has_bf16, drop_labels, lr_at, random_flip, train_step


# -- U-Net ---------------------------------------------------------------------------------------------------------
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
                   class_labels=torch.tensor([0, 1, 2, 0]))
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


# -- loss ----------------------------------------------------------------------------------------------------------
def test_loss_of_the_optimal_predictor_is_lower_than_a_wrong_one():
    """For Gaussian data the closed-form E[eps | x_t] minimises L_simple: any other predictor scores worse."""
    from tests.ddpm.analytic import GaussianEps

    schedule = NoiseSchedule.linear()
    x0 = 0.3 + 0.5 * torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    best = GaussianEps(schedule, 0.3, 0.5)
    wrong = GaussianEps(schedule, 0.0, 1.0)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731  same t and eps for both
    assert diffusion_loss(best, schedule, x0, generator=g()) < 0.9 * diffusion_loss(wrong, schedule, x0,
                                                                                     generator=g())


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_min_snr_weighting(prediction_type):
    """The weights are min(SNR, g)/SNR (eps), min(SNR, g) (x_0) and min(SNR, g)/(SNR + 1) (v).

    For eps and v they are at most 1, so the weighted loss is smaller; for eps an enormous gamma is plain L_simple.
    For x_0 they are at most gamma. Checked term by term against the same draws of t and eps.
    """
    schedule = NoiseSchedule.linear()
    x0 = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    zero = lambda x, t, y=None: torch.zeros_like(x)  # noqa: E731
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    plain = diffusion_loss(zero, schedule, x0, prediction_type=prediction_type, generator=g())
    weighted = diffusion_loss(zero, schedule, x0, prediction_type=prediction_type, min_snr_gamma=5.0, generator=g())
    assert weighted.item() > 0
    if prediction_type == "sample":
        assert weighted.item() <= 5.0 * plain.item()
    else:
        assert weighted.item() < plain.item()
    if prediction_type == "epsilon":
        huge = diffusion_loss(zero, schedule, x0, prediction_type="epsilon", min_snr_gamma=1e12, generator=g())
        torch.testing.assert_close(huge, plain)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_importance_sampled_timesteps_estimate_the_same_loss_with_less_variance(prediction_type):
    """With t ~ w/sum(w) and each draw weighted by mean(w), the loss is unbiased for sum_t w(t) L_t / T.

    The predictor outputs t/T everywhere and the data are ones, so (x_0 target) L_t = (1 - t/T)^2 exactly; for a v
    target L_t also has eps in it, and the means are checked against each other. 64 batches of 4,096 draws each.
    """
    schedule = NoiseSchedule.linear()
    ramp = lambda x, t, y=None: (t.float() / 1000)[:, None, None, None].expand_as(x)  # noqa: E731
    x0 = torch.ones(4096, 1, 1, 1)
    weights = loss_weights(schedule, prediction_type, 5.0)
    g = torch.Generator().manual_seed(0)
    draws = {how: torch.stack([diffusion_loss(ramp, schedule, x0, prediction_type=prediction_type, min_snr_gamma=5.0,
                                              timestep_sampling=how, generator=g) for _ in range(64)])
             for how in ("uniform", "importance")}
    means = {how: d.mean().item() for how, d in draws.items()}
    if prediction_type == "sample":
        exact = (weights * (1 - torch.arange(1000) / 1000) ** 2).mean().item()
        assert means["uniform"] == pytest.approx(exact, rel=0.02)
        assert means["importance"] == pytest.approx(exact, rel=0.02)
        assert draws["importance"].std() < 0.7 * draws["uniform"].std()  # (for v, eps's own variance dominates)
    assert means["importance"] == pytest.approx(means["uniform"], rel=0.03)
    with pytest.raises(ValueError, match="timestep_sampling"):
        diffusion_loss(ramp, schedule, x0, timestep_sampling="lognormal")


def test_training_helpers():
    assert lr_at(0, base_lr=1.0, warmup_steps=10, total_steps=100) == pytest.approx(0.1)
    assert lr_at(50, base_lr=1.0, warmup_steps=10, total_steps=100) == 1.0
    assert lr_at(100, base_lr=1.0, warmup_steps=10, total_steps=100, decay="cosine") == pytest.approx(0.0)
    # With a time budget the cosine follows whichever of steps and time is further along.
    timed = functools.partial(lr_at, base_lr=1.0, warmup_steps=10, total_steps=100, decay="cosine")
    assert timed(55, time_spent=0.1) == pytest.approx(0.5)  # steps ahead: half-way through the decay
    assert timed(20, time_spent=0.5) == pytest.approx(0.5)  # time ahead
    assert timed(20, time_spent=1.2) == 0.0
    assert timed(5, time_spent=0.5) == pytest.approx(0.3)  # 0.6 of the warm-up, times the decay
    x = torch.arange(8.0).reshape(1, 1, 1, 8).repeat(64, 1, 1, 1)
    flipped = random_flip(x, torch.Generator().manual_seed(0))
    n_flipped = int((flipped[:, 0, 0, 0] == 7).sum())
    assert 16 < n_flipped < 48 and torch.equal(flipped.sort(-1).values, x)
    y = drop_labels(torch.zeros(1000, dtype=torch.long), 0.1, torch.Generator().manual_seed(0))
    assert 60 < int((y == -1).sum()) < 140


def test_autocast_precision_choice_and_a_bf16_step_on_the_cpu():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "fp32") is None and autocast_dtype(cpu, "bf16") is torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.bfloat16  # no GPU needed to decide
    assert autocast_dtype(cpu, "auto") is (torch.bfloat16 if cpu_has_bf16() else None)
    assert cpu_has_bf16() or not torch.cpu._is_amx_tile_supported()  # an AMX CPU always counts
    with pytest.raises(ValueError, match="precision must be auto, fp32 or bf16"):
        autocast_dtype(cpu, "fp16")
    # A bf16 step trains the fp32 weights: the loss is fp32, the gradients and the updated weights stay fp32.
    torch.manual_seed(0)
    net = UNet(UNetConfig.preset("tiny"))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in net.parameters()]
    loss, grad_norm = train_step(net, optimizer, NoiseSchedule.linear(1000), torch.rand(8, 1, 8, 8) * 2 - 1, lr=1e-3,
                                 autocast_dtype=torch.bfloat16)
    assert np.isfinite(loss) and grad_norm > 0
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))


# -- EMA -----------------------------------------------------------------------------------------------------------
def test_ema_averages_parameters_and_never_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.5, warmup=False)
    assert set(ema.state_dict()) == {n for n, _ in model.named_parameters()}  # no running_mean/var
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(7.0)
    before = {n: p.clone() for n, p in model.named_parameters()}
    ema.update(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[n], before[n] - 0.5)  # 0.5 old + 0.5 new
    ema.copy_to(model)
    assert torch.equal(model[1].running_mean, torch.full((2,), 7.0))  # buffers untouched


def test_ema_warmup_ramps_decay():
    ema = EMA(nn.Linear(1, 1), decay=0.9999, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.9999


# -- checkpoint ----------------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("tiny", num_classes=2))
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    schedule = NoiseSchedule.cosine(100)
    path = checkpoint.save(tmp_path / "ckpt", model, schedule, ema_state=ema.state_dict(),
                           prediction_type="v_prediction", class_names=["a", "b"], metadata={"run": "r1"})
    return path, model, ema, schedule


def test_checkpoint_round_trip_gives_identical_outputs(saved):
    path, model, ema, schedule = saved
    loaded_raw = checkpoint.load(path, weights="model")
    loaded = checkpoint.load(path)
    assert loaded.prediction_type == "v_prediction" and loaded.class_names == ["a", "b"]
    assert loaded.metadata == {"run": "r1"} and loaded.image_shape == (1, 8, 8)
    torch.testing.assert_close(loaded.schedule.betas, schedule.betas)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 50])
    with torch.no_grad():
        torch.testing.assert_close(loaded_raw.model(x, t), model.eval()(x, t), rtol=0, atol=0)
        ema.copy_to(model)
        torch.testing.assert_close(loaded.model(x, t), model(x, t), rtol=0, atol=0)
        x_T, g = noise_from_seeds([1], (1, 8, 8))
        x_T2, g2 = noise_from_seeds([1], (1, 8, 8))
        a = sample(model, schedule, x_T, sampler="ddpm", steps=10, generator=g, prediction_type="v_prediction")
        b = sample(loaded.model, loaded.schedule, x_T2, sampler="ddpm", steps=10, generator=g2,
                   prediction_type="v_prediction")
    assert torch.equal(a, b)


def test_truncated_weights_are_refused(saved):
    path = saved[0]
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load(path)


def test_config_with_wrong_shape_is_refused(saved):
    path = saved[0]
    config = json.loads((path / "config.json").read_text())
    config["unet"]["base_channels"] = 32
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(checkpoint.CheckpointError, match="do not match"):
        checkpoint.load(path)


def test_missing_or_foreign_folder_is_refused(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no config.json"):
        checkpoint.load(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "pytorch-pickle"}')
    with pytest.raises(checkpoint.CheckpointError, match="unsupported checkpoint format"):
        checkpoint.load(tmp_path)


def test_loading_never_unpickles(saved):
    """A pickle planted next to the weights is never opened: loading reads only config.json and safetensors."""
    path = saved[0]
    (path / "model.pt").write_bytes(b"\x80\x04cos\nsystem\nq\x00X\x05\x00\x00\x00exit 1q\x01\x85q\x02Rq\x03.")
    checkpoint.load(path)  # would raise or run `exit 1` if anything unpickled model.pt


# -- metrics -------------------------------------------------------------------------------------------------------
def test_frechet_distance_closed_form_and_self():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(2000, 8))
    assert frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-8)
    # N(m1, a^2 I) vs N(m2, b^2 I) in d dims: |m1 - m2|^2 + d (a - b)^2
    d, a, b = 8, 1.0, 2.0
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    assert frechet_distance(mu1, a**2 * np.eye(d), mu2, b**2 * np.eye(d)) == pytest.approx(
        d * 0.25 + d * (a - b) ** 2)
    # Non-commuting covariances: compare against the definition through an explicit matrix square root.
    s1 = np.cov(rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4)), rowvar=False)
    s2 = np.cov(rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4)), rowvar=False)
    w, v = np.linalg.eig(s1 @ s2)
    tr_sqrt = np.sqrt(w.astype(complex)).real.sum()
    assert frechet_distance(np.zeros(4), s1, np.zeros(4), s2) == pytest.approx(
        np.trace(s1) + np.trace(s2) - 2 * tr_sqrt, rel=1e-6)


def test_precision_recall_on_toy_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(500, 2))
    same = rng.normal(size=(500, 2))
    far = rng.normal(size=(500, 2)) + 10
    collapsed = rng.normal(size=(500, 2)) * 0.05  # all fakes near the mode: precise, poor recall
    p, r = precision_recall(real, same)
    assert p > 0.9 and r > 0.9
    assert precision_recall(real, far) == (0.0, 0.0)
    p, r = precision_recall(real, collapsed)
    assert p > 0.95 and r < 0.2


def test_image_helpers():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)
    assert to_uint8(x)[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    grid = make_grid(np.full((5, 4, 4, 1), 9, np.uint8), ncols=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 1) and grid[1, 1, 0] == 9 and grid[0, 0, 0] == 0


# -- layering ------------------------------------------------------------------------------------------------------
def test_core_imports_no_platform_modules():
    code = ("import sys, ddpm, ddpm.checkpoint, ddpm.sampling, ddpm.metrics, ddpm.training\n"
            "bad = [m for m in ('ray', 'mlflow', 'boto3', 'botocore', 'pyarrow', 'fastapi', 'starlette') "
            "if m in sys.modules]\nprint(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"ddpm imported {out}"
