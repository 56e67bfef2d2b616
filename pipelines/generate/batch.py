"""Batch generation on Ray Data: seeds -> sampler actors -> shards, resumable, the same pixels as every other path.

``ddpm generate --output FOLDER_OR_PREFIX`` runs :func:`generate_to`: the job (:mod:`pipelines.generate.job`) on
the model (:mod:`pipelines.generate.model_source`), sampled by the sampler actors
(:mod:`pipelines.generate.sampler_actor`), written and committed shard by shard (:mod:`pipelines.generate.shards`).

The work, and where it runs::

    driver  resolve the model, check the settings against it, list OUTPUT: which shards are committed already
    Ray     one row per missing shard -> map_batches(ShardSampler, ActorPoolStrategy): each actor loads the model
            once (from the object store, so workers need no access to the registry or the driver's disk), then per
            shard calls ddpm.generate_images on the shard's seeds and hands the images to the sink
    driver  progress (images/s) from the rows coming back; at the end, the manifest from the shards' commit files

Output layout: ``OUTPUT/job.json`` (what is being made: model, sampler settings, seeds, labels, shard size, format)
beside the images, the shards' commit files and the manifest that :mod:`pipelines.generate.shards` describes.

Resuming: a shard is committed when its ``shards/`` file exists (each object is written whole: a PUT, or a rename
on a local disk), so a rerun with the same arguments lists OUTPUT once and generates only the shards without one;
an image file left by a shard that died before its commit is simply written again. A rerun whose job.json differs
(another model version, sampler setting, seed range, shard size, format or device type) is refused rather than
mixing two jobs' images. One run at a time per OUTPUT. A Parquet output's manifest is also a dataset manifest
(``pipelines.data.dataset``), so the images can be the ``--data`` of ``ddpm train`` or ``ddpm evaluate``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from pipelines import storage
from pipelines.data.dataset import check_output
from pipelines.errors import UserError
from pipelines.generate.job import FORMATS, Labels, Plan, Sampling, check_job
from pipelines.generate.model_source import ModelSource
from pipelines.generate.progress import ProgressLine
from pipelines.generate.prompts import Prompts
from pipelines.generate.sampler_actor import run_shards
from pipelines.generate.shards import MANIFEST, ShardWriter, build_manifest, committed_shards

JOB = "job.json"
KIND, JOB_VERSION = "ddpm-generated", 1


def generate_to(output: str, source: ModelSource, plan: Plan, sampling: Sampling, labels: Labels, *,
                fmt: str = "png", num_actors: int | None = None, cpus_per_actor: float = 1, use_gpu: bool = False,
                endpoint_url: str | None = None, progress: bool = True,
                log: Callable[[str], None] = print, prompts: Prompts | None = None) -> dict:
    """Generate ``plan``'s images into ``output`` (a folder or an ``s3://`` prefix); returns the manifest.
    ``prompts``: a text model's, one for all or a file's (``Plan.per_prompt`` images each).

    Resumes: shards committed by an earlier run with the same job are kept, the rest are generated (module
    docstring). ``progress``: print a line on stderr every few seconds (images done, this run's images/s, time left).
    """
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if plan.num_images < 1 or plan.shard_images < 1:
        raise UserError("--num-images and --shard-size must be at least 1")
    sampling = sampling.resolved()
    prompts = prompts or Prompts.none()
    if (prompts.kind == "file") != bool(plan.per_prompt) or plan.per_prompt * len(prompts) not in (0, plan.num_images):
        raise ValueError(f"a plan of {plan.per_prompt} images per prompt for {len(prompts)} {prompts.kind} prompts "
                         f"cannot make {plan.num_images} images")
    check_job(source, sampling, labels, fmt, prompts)
    endpoint_url = storage.resolve_endpoint(endpoint_url)  # resolved once here, so every actor uses the same one
    job = describe_job(source, plan, sampling, labels, fmt, use_gpu, prompts)

    # 1. What is there: the first request, so a missing bucket or an unreachable store fails before any work.
    if "://" not in output and Path(output).is_file():
        raise UserError(f"--output {output}: is a file; give a folder, an s3:// prefix, or a .png/.npz file name")
    listing = {e.key for e in storage.list_files(output, endpoint_url)}
    check_output(output, KIND, "ddpm generate", inputs={"--model": str(source.path)}, endpoint_url=endpoint_url)
    if JOB in listing:
        _check_same_job(output, storage.read_json(storage.join(output, JOB), endpoint_url), job)
    else:
        storage.write_json(storage.join(output, JOB), job, endpoint_url)
    committed = committed_shards(listing, plan, fmt)
    missing = [j for j in range(plan.num_shards) if j not in committed]
    already = sum(len(plan.rows(j)) for j in committed)

    # 2. The missing shards, on sampler actors.
    if missing:
        if MANIFEST in listing:  # the output is changing: no manifest vouches for it until the end
            _delete_file(storage.join(output, MANIFEST), endpoint_url)
        for key in sorted(listing):  # leftovers of a local write that died between its temporary file and rename
            if ".tmp-" in key.rsplit("/", 1)[-1]:
                _delete_file(storage.join(output, key), endpoint_url)
        for j in missing:  # a commit whose images went missing vouches for nothing: the actor must not skip it
            if f"shards/shard-{j:06d}.json" in listing:
                _delete_file(storage.join(output, "shards", f"shard-{j:06d}.json"), endpoint_url)
        if "://" not in output:
            _warn_if_local_on_many_nodes(output, log)
        log(f"[generate] {len(committed)} of {plan.num_shards} shards already in {output}; generating "
            f"{plan.num_images - already:,} images in {len(missing)} shards")
        done, started, new = [already], time.monotonic(), [0]
        line = ProgressLine(plan.num_images, already=already) if progress else None

        def on_row(row: dict) -> None:
            done[0] += int(row["count"])
            new[0] += int(row["new"])
            if line is not None:
                line(done[0])

        sink = ShardWriter(output, fmt, endpoint_url, source.image_shape, plan, prompts)
        actors = run_shards(source, plan, sampling, labels, sink, missing, num_actors=num_actors,
                            cpus_per_actor=cpus_per_actor, use_gpu=use_gpu, on_row=on_row, errors_name=output,
                            prompts=prompts)
        seconds = time.monotonic() - started
        log(f"[generate] {new[0]:,} images in {seconds:.1f} s with {actors} actor(s): "
            f"{new[0] / max(seconds, 1e-9):.1f} images/s")
    elif MANIFEST in listing:
        log(f"[generate] {output} is complete already ({plan.num_images:,} images)")
        return storage.read_json(storage.join(output, MANIFEST), endpoint_url)

    # 3. Commit: the manifest, from the shards' own commit files.
    manifest = build_manifest(output, job, plan, fmt, source, labels, endpoint_url)
    storage.write_json(storage.join(output, MANIFEST), manifest, endpoint_url)
    return manifest


def _warn_if_local_on_many_nodes(output: str, log: Callable[[str], None]) -> None:
    import ray

    from pipelines.ray_utils import init_ray

    init_ray()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes > 1:
        log(f"[generate] warning: --output {output} is a local path and the cluster has {nodes} nodes: each actor "
            f"writes to its own node's disk, so unless the path is a shared filesystem, use an s3:// prefix")


def _delete_file(uri: str, endpoint_url: str | None) -> None:
    fs, path = storage.filesystem_for(uri, endpoint_url)
    with storage.user_errors(uri, endpoint_url):
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass


def describe_job(source: ModelSource, plan: Plan, sampling: Sampling, labels: Labels, fmt: str,
                 use_gpu: bool, prompts: Prompts | None = None) -> dict:
    """job.json: everything the images depend on (the device type too: GPU kernels and bf16 give other bits)."""
    job = {"kind": KIND, "version": JOB_VERSION, "model": source.identity(), "sampling": sampling.describe(),
           "seeds": plan.describe(), "labels": labels.describe(), "format": fmt, "shard_images": plan.shard_images,
           "image_shape": list(source.image_shape), "device": "cuda" if use_gpu else "cpu"}
    if prompts is not None and prompts.kind != "none":  # absent otherwise: jobs written before prompts still resume
        job["prompts"] = prompts.describe()
    return job


def _check_same_job(output: str, existing: dict, job: dict) -> None:
    if existing.get("kind") != KIND:
        raise UserError(f"{output}: holds other files ({JOB} is not a ddpm generate job); choose another --output")
    def compared(d: dict) -> dict:  # the same version reached by another URI (an alias, a path) is the same model
        return d | {"model": {k: v for k, v in (d.get("model") or {}).items() if k != "uri"}}

    existing, job = compared(existing), compared(job)
    differs = [key for key in sorted(set(existing) | set(job)) if existing.get(key) != job.get(key)]
    if differs:
        first = differs[0]
        raise UserError(f"{output}: holds images of another job ({', '.join(differs)} differ, e.g. {first}: "
                        f"{json.dumps(existing.get(first), sort_keys=True)} there, "
                        f"{json.dumps(job.get(first), sort_keys=True)} now); rerun with the same arguments to "
                        f"resume, or choose another --output")
