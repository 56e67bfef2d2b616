"""Whether the cluster can hold the worker group, checked before anything is created.

Ray Train asks for its workers' resources and, when they never come, retries the group every minute for ever. Two
cases are told apart here, before the MLflow run is opened:

- **The cluster cannot hold the group at all** (no set of nodes has room for N workers of that size): on a local Ray
  nothing will ever add a node, so this fails at once; on a cluster joined through ``RAY_ADDRESS`` an autoscaler
  may add nodes, so it waits up to ``wait_s`` first.
- **The cluster could, but others hold the resources now** (a Serve endpoint, another job): it waits up to
  ``wait_s`` for them to be released, then fails with one line that names what holds them.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass

from pipelines.errors import UserError

LOCAL_WAIT_S = 30.0     # a local Ray: held resources may be released soon; capacity never grows
CLUSTER_WAIT_S = 600.0  # a joined cluster: time for an autoscaler to start a node


@dataclass(frozen=True)
class Workers:
    """How many training workers: a fixed ``N``, or an elastic range ``MIN-MAX`` (Ray Train starts with what the
    cluster holds, at least MIN, restarts smaller when a node goes and grows back, up to MAX, when one comes)."""

    min: int
    max: int

    @classmethod
    def parse(cls, value, what: str = "--num-workers") -> "Workers":
        """``2``, ``"2"`` or ``"1-4"``; a UserError that names ``what`` for anything else."""
        if isinstance(value, Workers):
            return value
        text = str(value).strip()
        match = None if isinstance(value, bool) else re.fullmatch(r"(-?\d+)(?:\s*-\s*(\d+))?", text)
        if match is None:
            raise UserError(f"{what} must be N or MIN-MAX (e.g. 4 or 1-4), got {value!r}")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) else low
        if low < 1:
            raise UserError(f"{what} must be at least 1, got {text}")
        if high < low:
            raise UserError(f"{what}: MIN must be at most MAX, got {text}")
        return cls(low, high)

    @property
    def elastic(self) -> bool:
        return self.max > self.min

    def scaling(self):
        """``ScalingConfig(num_workers=...)``: an int, or Ray Train's elastic (min, max) tuple."""
        return (self.min, self.max) if self.elastic else self.min

    def __str__(self) -> str:
        return f"{self.min}-{self.max}" if self.elastic else str(self.min)


def default_wait_s() -> float:
    return CLUSTER_WAIT_S if os.environ.get("RAY_ADDRESS") else LOCAL_WAIT_S


def _describe(resources: dict) -> str:
    """``2 CPU + 1 GPU``: the resources a training worker asks for, of a node's or a free pool's."""
    return " + ".join(f"{resources[k]:g} {k}" for k in ("CPU", "GPU") if resources.get(k)) or "no CPU"


def workers_that_fit(bundle: dict, nodes: list[dict]) -> int:
    """How many workers of ``bundle`` (e.g. {"CPU": 2, "GPU": 1}) the nodes' resources hold, a worker per node."""
    total = 0
    for node in nodes:
        per_key = [math.floor(node.get(key, 0) / need + 1e-9) for key, need in bundle.items() if need > 0]
        total += min(per_key) if per_key else 0
    return total


def _holders() -> str:
    """The live actors of this cluster by class, e.g. ``ServeReplica:ddpm:Sampler, CpuHolder``; "" when unknown.

    Read from the GCS's actor table (``ray._private.state``), which works without the dashboard that the public
    state API needs; the table does not say what each actor reserved, so this names the candidates.
    """
    try:
        from ray._private.state import actors

        live = [a.get("ActorClassName", "?") for a in actors().values() if a.get("State") == "ALIVE"]
    except Exception:  # a private API: the message stays useful without it
        return ""
    counts = {name: live.count(name) for name in sorted(set(live))}
    return ", ".join(f"{name} x{n}" if n > 1 else name for name, n in counts.items())


def check_workers_fit(num_workers: int, bundle: dict, *, wait_s: float | None = None, poll_s: float = 2.0) -> None:
    """Return once ``num_workers`` workers of ``bundle`` fit in the resources free now; else wait up to ``wait_s``
    (default: :func:`default_wait_s`) and raise a UserError that says what was asked, what exists and what holds it."""
    import ray  # here, not at the top: Workers is part of config validation, which must not load Ray

    wait_s = default_wait_s() if wait_s is None else wait_s
    asked = f"{num_workers} training worker(s) of {_describe(bundle)}"
    deadline = time.monotonic() + wait_s
    while True:
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        capacity = workers_that_fit(bundle, nodes)
        free = workers_that_fit(bundle, [ray.available_resources()])
        if free >= num_workers:
            return
        local = not os.environ.get("RAY_ADDRESS")
        if capacity < num_workers and local:
            raise UserError(f"the cluster cannot hold {asked}: its nodes have "
                            f"{'; '.join(_describe(n) for n in nodes)}; lower --num-workers or --cpus-per-worker")
        if time.monotonic() >= deadline:
            if capacity < num_workers:
                raise UserError(f"no room for {asked} after waiting {wait_s:g} s: the nodes have "
                                f"{'; '.join(_describe(n) for n in nodes)} and no node was added")
            holders = _holders()
            raise UserError(f"{asked} did not get their resources within {wait_s:g} s: "
                            f"{_describe(ray.available_resources()) or 'nothing'} is free"
                            + (f", held by the live actors {holders}" if holders else ""))
        time.sleep(poll_s)
