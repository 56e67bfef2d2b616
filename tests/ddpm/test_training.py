"""One training step and its schedules (ddpm/training.py): learning rate, flips, label dropout, bf16 autocast."""

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm import NoiseSchedule, UNet, UNetConfig
from ddpm.training import autocast_dtype, drop_labels, lr_at, random_flip, train_step


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


# The bf16 instructions oneDNN runs matmuls and convolutions on, as the kernel names them in /proc/cpuinfo: AMX (Intel
# Sapphire Rapids and later) and AVX512-BF16 (Intel Cooper Lake, AMD Zen 4 and later).
BF16_FLAGS = {"amx_tile", "amx_bf16", "avx512_bf16"}


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags as the kernel reports them, or None where /proc/cpuinfo has none (not Linux on x86)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((set(line.partition(":")[2].split()) for line in lines if line.startswith("flags")), None)


def test_autocast_precision_choice_and_a_bf16_step_on_the_cpu():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "fp32") is None and autocast_dtype(cpu, "bf16") is torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.bfloat16  # no GPU needed to decide
    with pytest.raises(ValueError, match="precision must be auto, fp32 or bf16"):
        autocast_dtype(cpu, "fp16")
    # "auto" on the CPU: bf16 exactly when the CPU has bf16 instructions, by the kernel's account (an AMX CPU always
    # counts), and only where PyTorch has oneDNN to run bf16 matmuls on them.
    auto = autocast_dtype(cpu, "auto")
    assert auto in (None, torch.bfloat16)
    flags = cpu_flags()
    if flags is not None:
        assert (auto is torch.bfloat16) == bool(flags & BF16_FLAGS), sorted(flags & BF16_FLAGS)
    if auto is torch.bfloat16:
        assert torch.backends.mkldnn.is_available()
    # Under bf16 autocast a matmul runs in bf16 (8 mantissa bits: relative error about 2^-8 per product).
    x, w = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.autocast(device_type="cpu", dtype=autocast_dtype(cpu, "bf16")):
        product = x @ w
    assert product.dtype == torch.bfloat16
    torch.testing.assert_close(product.float(), x @ w, atol=0.1, rtol=0.05)
    # A bf16 step trains the fp32 weights: the loss is fp32, the gradients and the updated weights stay fp32; and a
    # step at whatever "auto" chose trains too.
    for dtype in (torch.bfloat16, auto):
        torch.manual_seed(0)
        net = UNet(UNetConfig.preset("tiny"))
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        before = [p.detach().clone() for p in net.parameters()]
        loss, grad_norm = train_step(net, optimizer, NoiseSchedule.linear(1000), torch.rand(8, 1, 8, 8) * 2 - 1,
                                     lr=1e-3, autocast_dtype=dtype)
        assert np.isfinite(loss) and grad_norm > 0
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters())
        assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))
