"""Ray's C++ log lines of the driver go to the session's log files, not the terminal (issue 32).

The driver's core worker writes its ERROR lines (here ``core_worker.cc``'s warning about an actor with
``max_restarts > 0`` whose constructor argument is in the object store) to file descriptor 2. The script below runs
as its own process, joins the test session's Ray through ``pipelines.ray_utils.init_ray`` and triggers that line, so
its stderr is read at the descriptor level, as a terminal would see it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CPP_LINE = "has constructor arguments in the object store and max_restarts > 0"

SCRIPT = """
import logging
import os
import sys

import numpy as np

from pipelines.ray_utils import keep_local_ray_on_loopback

keep_local_ray_on_loopback()  # what `ddpm` does before it imports ray
import ray

from pipelines.ray_utils import _session_log_dir, init_ray

init_ray()


@ray.remote(max_restarts=1, num_cpus=0)
class Holder:
    def __init__(self, array):
        self.size = array.size

    def get_size(self):
        return self.size


# 1 MB: above Ray's 100 KB inline limit, so the argument goes through the object store.
holder = Holder.remote(np.zeros(1_000_000, dtype=np.uint8))
assert ray.get(holder.get_size.remote()) == 1_000_000
print(_session_log_dir(), os.getpid(), flush=True)
logging.getLogger("ray").warning("MARK-warning of Ray's Python logger")
# Ray Data's warnings: the false "no available CPUs" alarm (pipelines.ray_utils._DROP_CPU_WARNING) and any other
data = logging.getLogger("ray.data.dataset")
data.warning("Warning: The Ray cluster currently does not have any available CPUs. MARK-cpu-warning")
data.warning("MARK-warning of Ray Data")
print("ddpm demo: error: MARK-one-line", file=sys.stderr)
raise RuntimeError("MARK-traceback")
"""


def _run(ray_local, verbose: bool) -> tuple[subprocess.CompletedProcess, Path, str]:
    """The script's outcome, its session's log folder and its process id."""
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    env.pop("DDPM_VERBOSE", None)
    if verbose:
        env["DDPM_VERBOSE"] = "1"
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert "MARK-traceback" in done.stderr, done.stderr[-3000:]  # the script got to its end
    logs, pid = done.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    return done, Path(logs), pid


def _ours_reach_the_terminal(stderr: str) -> None:
    assert "MARK-warning of Ray's Python logger" in stderr and "MARK-warning of Ray Data" in stderr
    assert "ddpm demo: error: MARK-one-line" in stderr
    assert "Traceback (most recent call last)" in stderr and "RuntimeError: MARK-traceback" in stderr


def test_ray_cpp_lines_go_to_the_session_logs_by_default(ray_local):
    done, logs, pid = _run(ray_local, verbose=False)
    assert done.returncode == 1
    assert CPP_LINE not in done.stderr and "MARK-cpu-warning" not in done.stderr, done.stderr[-3000:]
    _ours_reach_the_terminal(done.stderr)
    assert CPP_LINE in (logs / f"ddpm-driver-{pid}.err").read_text()
    assert "MARK-cpu-warning" in (logs / "ray-data" / "ray-data.log").read_text()


def test_verbose_prints_ray_cpp_lines(ray_local):
    done, _, _ = _run(ray_local, verbose=True)
    assert done.returncode == 1
    assert CPP_LINE in done.stderr and "MARK-cpu-warning" in done.stderr, done.stderr[-3000:]
    _ours_reach_the_terminal(done.stderr)
