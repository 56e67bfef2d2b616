"""The serving engine with a text model at 32 clients: 32 distinct prompts against one shared prompt, alternated.

32 clients each keep one request of one image in flight (closed loop). The Sampler deployment's runner merges what
queued while the last batch ran (``deploy.batching``, up to 64 images), so in the steady state every batch holds the
32 requests: a round here is one ``deploy.engine.run_batch`` of 32 jobs, without Ray or HTTP (no PNG encoding).
Client i sends seed ``first_seed + i`` and, in the distinct run, prompt i; in the shared run, prompt 0. The engine
encodes each distinct string of a batch once (prompts and the empty negative prompt: 33 strings against 2), and the
U-Net rows are the same in both runs, so the ratio isolates what distinct prompts cost.

Checked while measuring: client 0 (prompt 0, its seed) gets the same bytes in both runs and in every round (an image
depends on its prompt and seed, never on its batch-mates), and every round of a run repeats its first round's bytes.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from ddpm import checkpoint
from ddpm.generation import FORWARD_ROWS
from deploy.engine import Generated, Job, Queued, ServedModel, run_batch


def _requests(prompts: list[str], *, steps: int, guidance: float, first_seed: int) -> list[Queued]:
    """One request of one image per client: DDIM-``steps`` (eta 0), client i's seed and prompt."""
    now = time.monotonic()
    return [Queued(Job(1, "ddim", steps, 0.0, first_seed + i, None, guidance, prompt=p), now)
            for i, p in enumerate(prompts)]


def _run(served: ServedModel, requests: list[Queued], micro_batch: int) -> tuple[float, np.ndarray]:
    """One batch: (seconds, the images (clients, H, W, C) uint8 in client order)."""
    start = time.perf_counter()
    outcomes = run_batch(served, requests, micro_batch)
    seconds = time.perf_counter() - start
    assert all(isinstance(o, Generated) for o in outcomes), [o for o in outcomes if not isinstance(o, Generated)]
    assert all(o.batch == {"requests": len(requests), "images": len(requests)} for o in outcomes)
    return seconds, np.concatenate([o.images for o in outcomes])


def engine_table(loaded: checkpoint.LoadedModel, prompts: list[str], *, steps: int, guidance: float, rounds: int,
                 micro_batch: int = FORWARD_ROWS, first_seed: int = 1000) -> list[str]:
    """The markdown table of the two runs (median images/s over ``rounds`` alternating rounds, after one untimed
    round each), one client per prompt in ``prompts`` (distinct strings)."""
    if len(set(prompts)) != len(prompts):
        raise ValueError("the distinct run needs distinct prompts")
    served = ServedModel(loaded, torch.device("cpu"), "shapes-text (random weights)", None, None)
    clients = len(prompts)
    runs = {f"{clients} distinct prompts": prompts, "one shared prompt": [prompts[0]] * clients}
    first: dict[str, np.ndarray] = {}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for timed in [False] + [True] * rounds:
        for name, ps in runs.items():
            s, images = _run(served, _requests(ps, steps=steps, guidance=guidance, first_seed=first_seed),
                             micro_batch)
            if name not in first:
                first[name] = images
            assert np.array_equal(images, first[name]), f"{name}: a round gave other bytes than the first"
            if timed:
                seconds[name].append(s)
    distinct, shared = first.values()
    assert np.array_equal(distinct[0], shared[0]), "client 0 (same prompt, same seed) got other bytes"
    assert not np.array_equal(distinct[1], shared[1]), "prompt 1 and prompt 0 gave client 1 the same image"

    rates = {name: [clients / s for s in ss] for name, ss in seconds.items()}
    medians = {name: statistics.median(r) for name, r in rates.items()}
    base = medians["one shared prompt"]
    lines = [f"| batch of {clients} one-image requests | distinct strings encoded | median s / batch | images/s | "
             "range | x shared |", "|---|---:|---:|---:|---:|---:|"]
    for name, ps in runs.items():
        strings = len(set(ps) | {""})  # the prompts and the default negative, the empty prompt
        r = rates[name]
        lines.append(f"| {name} | {strings} | {statistics.median(seconds[name]):.2f} | {medians[name]:.2f} | "
                     f"{min(r):.2f}-{max(r):.2f} | {medians[name] / base:.3f} |")
    lines.append(f"\n(DDIM-{steps}, eta 0, guidance {guidance:g} (2 U-Net rows per image-step), micro-batch "
                 f"{micro_batch}, {rounds} alternating rounds after one untimed round each; client 0's bytes equal in "
                 f"both runs and every round: checked)")
    return lines
