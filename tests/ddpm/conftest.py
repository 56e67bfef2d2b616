"""Fixtures the core's test modules share (test_sampling.py, test_inpaint.py)."""

import pytest
import torch

from ddpm import NoiseSchedule, UNet, UNetConfig


@pytest.fixture(scope="module")
def schedule():
    """The DDPM paper's linear schedule: 1,000 steps, beta from 1e-4 to 0.02."""
    return NoiseSchedule.linear()


@pytest.fixture(scope="module")
def tiny():
    """A class-conditional (3 classes) tiny U-Net for 8x8x1 images, random weights from seed 0, in eval mode."""
    torch.manual_seed(0)
    return UNet(UNetConfig.preset("tiny", num_classes=3)).eval()
