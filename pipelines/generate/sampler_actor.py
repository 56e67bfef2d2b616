"""Sampler actors: a pool of Ray Data actors that each load the model once, then turn shard numbers into images
and hand them to a sink (:mod:`pipelines.generate.shards`).

``ddpm generate --output`` runs :func:`run_shards` with a :class:`~pipelines.generate.shards.ShardWriter`;
``ddpm evaluate`` at scale with a sink that turns each shard into feature statistics instead. Every actor samples
through the core's one path with the endpoint's network call (``ddpm.graphs.graphed_forward`` of ``forward_rows``
rows: a CUDA graph on a GPU, ``ddpm.fixed_size_forward`` on the CPU), so image i is, bit for bit, what
``POST /generate`` and single-process ``ddpm generate`` return for seed K+i with the same settings and rows,
whichever actor made it and whatever else shared its shard.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from pipelines.actors import actor_count, get_payload, map_actors, put_payload, setup_torch
from pipelines.generate.job import Labels, Plan, Sampling
from pipelines.generate.model_source import ModelSource, load_model
from pipelines.generate.prompts import Prompts
from pipelines.generate.shards import Sink


class ShardSampler:
    """Ray Data callable class: loads the model once per actor, then maps shard numbers to the sink's summaries."""

    def __init__(self, payload, plan: Plan, sampling: Sampling, labels: Labels, sink: Sink, threads: int,
                 use_gpu: bool, weights: str = "ema", prompts: Prompts | None = None):
        from ddpm.graphs import graphed_forward

        self.device = setup_torch(threads, use_gpu)
        self.loaded = load_model(get_payload(payload), self.device, weights)
        self.forward = graphed_forward(self.loaded.model, sampling.forward_rows)  # the endpoint's network call
        self.plan, self.sampling, self.labels, self.sink = plan, sampling, labels, sink
        self.prompts = prompts or Prompts.none()
        self.sink.setup(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [self.shard(int(j)) for j in batch["shard"]]
        # bytes as objects: a NumPy bytes dtype would drop trailing zero bytes of packed arrays
        return {key: np.array([row[key] for row in out], dtype=object if isinstance(out[0][key], bytes) else None)
                for key in out[0]}

    def shard(self, shard: int) -> dict:
        from ddpm import generate_images

        done = self.sink.committed(shard)
        if done is not None:
            return done | {"seconds": 0.0}
        rows = self.plan.rows(shard)
        seeds = self.plan.seeds(rows)
        labels = self.labels.at(rows.start, rows.stop)
        start = time.perf_counter()
        s = self.sampling
        # the shard's rows' Condition: class labels, or prompts (each distinct one encoded once, batch-invariant)
        prompts, negatives = self.prompts.at(self.plan.prompt_indices(rows))
        condition = self.loaded.condition(len(seeds), class_labels=labels, prompts=prompts,
                                          negative_prompts=negatives)
        images = generate_images(self.loaded, seeds, condition=condition, sampler=s.sampler, steps=s.steps, eta=s.eta,
                                 guidance_scale=s.guidance_scale, forward=self.forward, batch_size=len(seeds),
                                 prior_steps=s.prior_steps, prior_guidance_scale=s.prior_guidance_scale)
        seconds = time.perf_counter() - start
        return self.sink.put(shard, rows, seeds, labels, images) | {"seconds": seconds}


# ---------------------------------------------------------------------------------------------------------------
# Running it


def run_shards(source: ModelSource, plan: Plan, sampling: Sampling, labels: Labels, sink: Sink, shards: list[int], *,
               num_actors: int | None = None, cpus_per_actor: float = 1, use_gpu: bool = False,
               on_row: Callable[[dict], None] = lambda row: None, weights: str = "ema",
               errors_name: str = "", prompts: Prompts | None = None) -> int:
    """Map sampler actors over ``shards``; ``on_row`` gets each shard's summary on the driver as it comes back.

    Returns the number of actors used. Memory stays bounded at any N: shards flow through Ray Data's streaming
    executor and only their summaries reach the driver.
    """
    from pipelines.ray_utils import init_ray

    if not shards:
        return 0
    init_ray()
    actors = actor_count(num_actors, use_gpu, cpus_per_actor, len(shards))
    kwargs = dict(payload=put_payload(source.payload()), plan=plan, sampling=sampling, labels=labels, sink=sink,
                  threads=max(1, int(cpus_per_actor)), use_gpu=use_gpu, weights=weights, prompts=prompts)
    for row in map_actors([{"shard": j} for j in shards], ShardSampler, actors=actors, cpus_per_actor=cpus_per_actor,
                          use_gpu=use_gpu, kwargs=kwargs, errors_name=errors_name):
        on_row(row)
    return actors
