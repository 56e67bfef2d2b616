"""Training progress lines come by time, whatever the step rate: one after the first step, then one every
``every_s`` seconds, and one at the end; a line's loss is the mean over the rows trained since the line before."""

from __future__ import annotations

import time

import torch

from pipelines.train.progress import Progress, Reporter


def test_lines_come_after_the_first_step_then_by_time_then_at_the_end(capsys):
    progress = Progress(Reporter(None, total=64, budget_s=None, every_s=0.5), world=1, device=torch.device("cpu"))
    step = dict(rows=8, images=8, lr=1e-3, elapsed_s=1.0, finished=False)

    first = progress.step(loss=4.0, seen=8, **step)
    assert first is not None and first.startswith("[train]  8/64 images") and "loss 4.0000" in first
    assert progress.step(loss=1.0, seen=16, **step) is None  # a step after the line: not due for 0.5 s
    assert progress.step(loss=3.0, seen=24, **step) is None
    time.sleep(0.6)
    timed = progress.step(loss=5.0, seen=32, **step)
    assert timed is not None and "32/64 images" in timed and "loss 3.0000" in timed  # (1 + 3 + 5) / 3
    last = progress.step(loss=2.0, seen=64, **{**step, "finished": True})
    assert last is not None and "64/64 images (100%)" in last and "loss 2.0000" in last
    assert capsys.readouterr().out.splitlines() == [first, timed, last]  # rank 0 prints each line it sends
