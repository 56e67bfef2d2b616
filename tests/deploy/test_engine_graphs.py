"""The engine's network call: the fixed-shape forward on the CPU, a captured CUDA graph (kept across batches) on a
GPU. No Ray here; the GPU half runs where CUDA is present (benchmarks/engine_gpu.py runs it at full size)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint, fixed_size_forward
from deploy.engine import Job, Queued, ServedModel, network_call, run_batch


def _served(device: str) -> ServedModel:
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("tiny", num_classes=3)).eval().to(device)
    return ServedModel(checkpoint.LoadedModel(model, NoiseSchedule.linear(), "epsilon"), torch.device(device),
                       None, None, None)


def _job(seed, n=1, label=None, guidance=1.0):
    return Job(num_images=n, sampler="ddim", steps=3, eta=0.0, seed=seed, class_label=label, guidance_scale=guidance)


def _images(served, jobs, micro_batch):
    now = time.monotonic()
    return [g.images for g in run_batch(served, [Queued(j, now) for j in jobs], micro_batch)]


@torch.no_grad()
def test_cpu_network_call_is_the_fixed_size_forward():
    served = _served("cpu")
    assert network_call(served, None) is served.loaded.model
    x, t = torch.randn(5, 1, 8, 8), torch.full((5,), 10)
    assert torch.equal(network_call(served, 2)(x, t), fixed_size_forward(served.loaded.model, 2)(x, t))


def _alone_equals_batched(device):
    served = _served(device)
    target = _job(42, label=1, guidance=2.0)
    alone = _images(served, [target], 4)[0]
    mixed = _images(served, [_job(1, 3, 0, 2.0), _job(7), target, _job(9, 2, 2, 2.0)], 4)[2]
    np.testing.assert_array_equal(alone, mixed)


def test_cpu_request_alone_and_batched_give_the_same_bytes():
    _alone_equals_batched("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_gpu_request_alone_and_batched_give_the_same_bytes_and_reuse_the_graph():
    from ddpm.graphs import GraphedForward

    _alone_equals_batched("cuda")
    served = _served("cuda")
    forward = network_call(served, 4)
    assert isinstance(forward, GraphedForward) and network_call(served, 4) is forward
