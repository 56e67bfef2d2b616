"""Connecting to Ray the same way in every stage."""

from __future__ import annotations

import os


def init_ray() -> None:
    """Join the cluster in ``RAY_ADDRESS``, or start a local Ray on 127.0.0.1 when it is unset; no-op if connected.

    ``address="local"`` matters: without it ``ray.init()`` silently joins whatever cluster ``ray start`` last left
    on this machine. The local instance binds to loopback (Ray would otherwise advertise the machine's own
    address) and skips the dashboard, which a one-off command does not need.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False)
