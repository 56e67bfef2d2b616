"""The exponential moving average of the weights (ddpm/ema.py)."""

import pytest
import torch
from torch import nn

from ddpm import EMA


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
