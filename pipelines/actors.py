"""Ray Data actor pools, whatever the actors do: how many, a model's files through the object store, one-line errors.

Three jobs run a model on a pool of Ray Data actors: batch generation (sampler actors, ``pipelines.generate``),
``ddpm encode`` (encoder actors, ``pipelines.data.encode``) and evaluation at scale (feature actors,
``pipelines.evaluate.features``). They share what is here:

    the pool       :func:`actor_count` (a fixed number of CPUs per actor) or :func:`cpu_split` (the actors share
                   the cluster's CPUs), checked against the cluster before anything runs
    the model      :func:`folder_payload` reads a model folder's files on the driver; :func:`put_payload` puts them
                   in the object store once; in the actor :func:`get_payload` and :func:`unpacked` give them back
                   as a scratch folder, so workers need neither the registry nor the driver's disk
    the actor      :func:`setup_torch`: its torch threads, and on a GPU the kernels that do not vary run to run
    the run        :func:`map_actors`: items -> actors -> the rows they return, a failure as one line
                   (:func:`user_error_in`)
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pipelines import storage
from pipelines.errors import UserError


def add_actor_arguments(group, what: str = "sampler actors") -> None:
    """The flags that size a pool of :func:`actor_count`, shared by ``ddpm generate`` and ``ddpm evaluate``."""
    group.add_argument("--num-actors", type=int, default=None, metavar="A",
                       help=f"{what} (default: one per GPU with --use-gpu, else one per --cpus-per-actor CPUs of "
                            f"the cluster)")
    group.add_argument("--use-gpu", action="store_true", help="one GPU per actor (bf16, CUDA graphs)")
    group.add_argument("--cpus-per-actor", type=int, default=1, metavar="C",
                       help="CPUs (and PyTorch threads) per actor (default: 1)")


# ---------------------------------------------------------------------------------------------------------------
# The pool


def _gpus(use_gpu: bool, num_actors: int | None, verb: str) -> int:
    """The cluster's GPUs, when the actors take one each; refuses a request the cluster cannot hold."""
    import ray

    if num_actors is not None and num_actors < 1:
        raise UserError(f"--num-actors must be at least 1, got {num_actors}")
    if not use_gpu:
        return 0
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 1:
        raise UserError(f"--use-gpu: the Ray cluster has no GPU; leave --use-gpu out to {verb} on CPUs")
    if num_actors is not None and num_actors > gpus:
        raise UserError(f"--num-actors {num_actors}: the Ray cluster has {gpus} GPU(s), one per actor")
    return gpus


def actor_count(num_actors: int | None, use_gpu: bool, cpus_per_actor: float, items: int,
                verb: str = "sample") -> int:
    """Actors of ``cpus_per_actor`` CPUs each: ``num_actors``, or one per GPU of the cluster (``use_gpu``), or one
    per ``cpus_per_actor`` CPUs; never more than there are ``items`` to work on."""
    import ray

    gpus = _gpus(use_gpu, num_actors, verb)
    if num_actors is not None:
        return max(1, min(num_actors, items))
    if use_gpu:
        return max(1, min(gpus, items))
    return max(1, min(int(ray.cluster_resources().get("CPU", 1) // cpus_per_actor), items))


def cpu_split(num_actors: int | None, use_gpu: bool, cpus_per_actor: int, verb: str) -> tuple[int, int]:
    """(actors, CPUs per actor) when the actors share the cluster's CPUs: GPU, one actor per GPU (or
    ``num_actors``) of one CPU; CPU, ``num_actors`` (default one per ``cpus_per_actor`` CPUs) splitting the
    cluster's CPUs, never more per actor than one node holds. An actor's torch threads are its CPUs."""
    import ray

    gpus = _gpus(use_gpu, num_actors, verb)
    if use_gpu:
        return (num_actors or gpus), 1
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if num_actors is not None and num_actors > cpus:
        raise UserError(f"--num-actors {num_actors}: the Ray cluster has {cpus} CPU(s), at least one per actor")
    node_cpus = max([int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [cpus])
    actors = num_actors or max(1, cpus // cpus_per_actor)
    return actors, max(1, min(cpus // actors, max(1, node_cpus)))


# ---------------------------------------------------------------------------------------------------------------
# A model's files, from the driver to the actors


def folder_payload(path: str | Path) -> dict[str, bytes]:
    """A model folder's files by relative name (subfolders included): what actors load the model from."""
    path = Path(path)
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def put_payload(payload: dict[str, bytes]) -> list:
    """The payload in Ray's object store, once for every actor. Wrapped in a list: Ray resolves an object
    reference passed as an argument itself, a nested one is left to :func:`get_payload` in the actor."""
    import ray

    return [ray.put(payload)]


def get_payload(wrapped: list) -> dict[str, bytes]:
    """The payload :func:`put_payload` stored (or a plain one, in a single process)."""
    import ray

    payload = wrapped[0]
    return ray.get(payload) if isinstance(payload, ray.ObjectRef) else payload


@contextlib.contextmanager
def unpacked(payload: dict[str, bytes], prefix: str = "ddpm-model-") -> Iterator[Path]:
    """The payload written out as a scratch folder, deleted on exit (load the model inside the ``with``)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        for name, data in payload.items():
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        yield Path(tmp)


def setup_torch(threads: int, use_gpu: bool):
    """The actor's torch device, with ``threads`` CPU threads. On a GPU, what the endpoint's replicas do
    (``deploy.engine.pick_device``): kernels that do not vary run to run."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--use-gpu: this actor was given a GPU but PyTorch sees none (CUDA build?)")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return torch.device("cuda")


# ---------------------------------------------------------------------------------------------------------------
# The run


def map_actors(items: list[dict], actor: type, *, actors: int, cpus_per_actor: float, use_gpu: bool,
               kwargs: dict[str, Any], errors_name: str = "") -> Iterator[dict]:
    """Ray Data: one row per item -> ``actor`` (a callable class, ``actors`` of them, each built once with
    ``kwargs``, one item per call) -> the rows it returns, as they come back to the driver.

    Memory stays bounded at any number of items: rows flow through Ray Data's streaming executor. A failure is
    re-raised as the one-line error it means (:func:`user_error_in`).
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pipelines.ray_utils import init_ray

    init_ray()
    DataContext.get_current().enable_progress_bars = False  # each job prints its own progress line
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4096))
    ds = ds.map_batches(actor, batch_size=1, compute=ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
                        num_gpus=1 if use_gpu else 0, fn_constructor_kwargs=kwargs)
    try:
        yield from ds.iter_rows()
    except Exception as exc:
        error = user_error_in(exc, errors_name)
        if error is exc:
            raise
        raise error from exc


def user_error_in(exc: BaseException, name: str) -> BaseException:
    """The one-line error a failed Ray Data run means: a UserError raised in an actor, a store error it quotes, or
    the exception itself."""
    seen, current = set(), exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, UserError):
            return current
        cause = getattr(current, "cause", None)
        current = current.__cause__ or (cause if isinstance(cause, BaseException) else None) or current.__context__
    text = str(exc)
    if "UserError: " in text:  # raised in an actor and re-raised here as a wrapper quoting it
        return UserError(text.split("UserError: ", 1)[1].strip().splitlines()[0])
    reason = storage.explain(text)
    if reason is not None:
        return UserError(f"{name}: {reason}" if name else reason)
    return exc
