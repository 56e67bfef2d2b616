"""Exponential moving average of a model's parameters (never its buffers)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """shadow <- d * shadow + (1 - d) * param after every optimiser step.

    With ``warmup`` the decay ramps up as d_k = min(decay, (1 + k) / (10 + k)) at update k, so the average is not
    dominated by the random initialisation early in training. Only ``named_parameters`` are averaged: buffers (e.g.
    running statistics) belong to the live model and are never touched.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.shadow = {name: p.detach().clone().float() for name, p in model.named_parameters()}

    def current_decay(self) -> float:
        k = self.num_updates
        return min(self.decay, (1 + k) / (10 + k)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        names, params = zip(*model.named_parameters())
        # shadow + (1 - d)(p - shadow) for every parameter in one foreach kernel, not a Python loop over the
        # U-Net's ~250 tensors (benchmarks/step.py)
        torch._foreach_lerp_([self.shadow[n] for n in names], [p.detach().float() for p in params], 1 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged parameters into ``model`` (its buffers are left as they are)."""
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        if state.keys() != self.shadow.keys():
            missing, extra = self.shadow.keys() - state.keys(), state.keys() - self.shadow.keys()
            raise ValueError(f"EMA state does not match the model: missing {sorted(missing)}, extra {sorted(extra)}")
        self.shadow = {k: v.detach().clone().float() for k, v in state.items()}
        self.num_updates = num_updates
