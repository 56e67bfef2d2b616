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


def _run(served: ServedModel, requests: list[Queued], micro_batch: int) -> tuple[float, float, np.ndarray]:
    """One batch: (wall seconds, CPU seconds of this process, the images (clients, H, W, C) uint8 in client order)."""
    wall, cpu = time.perf_counter(), time.process_time()
    outcomes = run_batch(served, requests, micro_batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert all(isinstance(o, Generated) for o in outcomes), [o for o in outcomes if not isinstance(o, Generated)]
    assert all(o.batch == {"requests": len(requests), "images": len(requests)} for o in outcomes)
    return wall, cpu, np.concatenate([o.images for o in outcomes])


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
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds + 1):  # round 0 untimed: the warm-up
        for name in list(runs)[::1 if r % 2 == 0 else -1]:  # A B, then B A: neither goes first every time
            w, c, images = _run(served, _requests(runs[name], steps=steps, guidance=guidance, first_seed=first_seed),
                                micro_batch)
            first.setdefault(name, images)
            assert np.array_equal(images, first[name]), f"{name}: a round gave other bytes than the first"
            if r > 0:
                wall[name].append(w)
                cpu[name].append(c)
    distinct, shared = first.values()
    assert np.array_equal(distinct[0], shared[0]), "client 0 (same prompt, same seed) got other bytes"
    assert not np.array_equal(distinct[1], shared[1]), "prompt 1 and prompt 0 gave client 1 the same image"

    med, base = statistics.median, "one shared prompt"
    per_cpu_s = {name: clients / med(cpu[name]) for name in runs}  # images per CPU second
    per_s = {name: clients / med(wall[name]) for name in runs}  # images per second of wall time
    lines = [f"| batch of {clients} one-image requests | distinct strings encoded | CPU s / batch | images / CPU s | "
             "x shared | images/s (wall) | x shared |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, ps in runs.items():
        strings = len(set(ps) | {""})  # the prompts and the default negative, the empty prompt
        lines.append(f"| {name} | {strings} | {med(cpu[name]):.2f} | {per_cpu_s[name]:.2f} | "
                     f"{per_cpu_s[name] / per_cpu_s[base]:.3f} | {per_s[name]:.2f} | {per_s[name] / per_s[base]:.3f} |")
    lines.append(f"\n(DDIM-{steps}, eta 0, guidance {guidance:g} (2 U-Net rows per image-step), micro-batch "
                 f"{micro_batch}; medians of {rounds} rounds alternating the runs after one untimed round; "
                 f"client 0's bytes equal in both runs and every round: checked)")
    return lines
