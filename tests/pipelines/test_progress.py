"""Readable progress and the DDP gradient layout: the training progress line, its delivery from a Ray actor to the
driver's output, the ingest watcher, and ``ddp.match_grad_layout`` under a real (one-process) DDP over gloo."""

from __future__ import annotations

import io
import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pipelines.train.ddp import match_grad_layout
from pipelines.train.progress import clock, format_line, time_left
from tests.support import free_port


def test_the_progress_line_reads_like_a_sentence():
    line = format_line(seen=38_400, total=150_000, rate=472.4, loss=0.04123, lr=9.1e-4, elapsed_s=81, budget_s=300)
    assert line == ("[train]  38,400/150,000 images ( 26%)  472 img/s  loss 0.0412  lr 9.1e-04  1:21 elapsed, "
                    "3:39 left (time budget)")
    # the image count ends the run first: the time left follows the rate
    assert time_left(seen=900, total=1000, rate=50.0, elapsed_s=10, budget_s=300) == (2.0, "image count")
    assert time_left(seen=0, total=1000, rate=0.0, elapsed_s=0, budget_s=None)[0] == float("inf")
    assert "? left" in format_line(seen=0, total=10, rate=0.0, loss=1.0, lr=0.0, elapsed_s=0, budget_s=None)
    assert (clock(75), clock(3725)) == ("1:15", "1:02:05")


@pytest.mark.slow
def test_rank_zero_lines_reach_the_driver_through_ray(ray_local):
    """A Ray task plays rank 0: its lines arrive in the driver's output, in order, and none after the block ends.

    The driver polls slower than the task reports and drains once more after it: the final line's wait is what
    makes every line land, however late the actor starts on a busy machine."""
    from pipelines.train.progress import Reporter, printing

    @ray_local.remote(num_cpus=0)
    def rank0(sink):
        reporter = Reporter(sink, total=100, budget_s=None, every_s=0.0, run="t")
        for seen in (25, 50, 100):
            reporter.export(seen=seen, rate=10.0, loss=0.5, lr=1e-3, elapsed_s=seen / 10)
            reporter.report(seen=seen, rate=10.0, loss=0.5, lr=1e-3, elapsed_s=seen / 10, final=seen == 100)
        return True

    out = io.StringIO()
    with printing(out, poll_s=5.0) as sink:
        assert ray_local.get(rank0.remote(sink), timeout=60)
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["25/100", "50/100", "100/100"]
    assert lines[-1].endswith("0:00 left (image count)")


def test_the_ingest_watcher_reports_objects_and_rate(tmp_path):
    """Shards appear while the watcher polls: lines count the objects they hold; the last line has the total."""
    from pipelines.data.preprocess import _ShardWatcher

    lines: list[str] = []
    with _ShardWatcher(str(tmp_path), None, total=100, per_task=30, report=lines.append, every_s=0.0, poll_s=0.05):
        for i in range(2):
            (tmp_path / f"part-{i}.parquet").write_bytes(b"x")
            time.sleep(0.3)
    assert any(line.startswith("[ingest]  60/100 objects") for line in lines), lines
    assert lines[-1].startswith("[ingest] 100/100 objects (100%)") and " in " in lines[-1]


class _ChannelsLastGrad(torch.autograd.Function):
    """A 1x1 convolution as a matmul, y = x @ w[:, :, 0, 0].T, whose weight gradient comes back with channels-last
    strides (I, 1, I, I) while the weight is contiguous (I, 1, 1, 1): what oneDNN does under bf16 autocast. The
    strides differ only in size-1 dimensions, so autograd keeps them, and DDP's bucket view does not match."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w[:, :, 0, 0].t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        out, inp = w.shape[:2]
        grad_w = (g.t() @ x).contiguous().as_strided((out, inp, 1, 1), (inp, 1, inp, inp))
        return g @ w[:, :, 0, 0], grad_w


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4, 1, 1))
        self.b = nn.Parameter(torch.zeros(8))

    def forward(self, x):
        return _ChannelsLastGrad.apply(x, self.w) + self.b


def test_match_grad_layout_makes_ddp_take_gradients_in_place():
    net = _Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(16, 4)
    rng = torch.get_rng_state()

    def probe():
        net(torch.randn(3, 4)).square().mean().backward()  # draws random numbers: they must be given back

    assert match_grad_layout(net, probe) == ["w"]
    assert net.w.stride() == (4, 1, 4, 4) and net.w.grad is None  # the gradient's layout; no gradient left behind
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the same values
    assert torch.equal(torch.get_rng_state(), rng)
    assert match_grad_layout(net, probe) == []  # nothing left to change

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(net)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(x).square().mean().backward()
        assert not [w for w in caught if "Grad strides do not match" in str(w.message)]
        assert net.w.grad.stride() == net.w.stride()
    finally:
        dist.destroy_process_group()
