"""``ddpm submit`` against a real Ray Jobs API: a local head node with its dashboard on 127.0.0.1.

The CLI runs as a subprocess, exactly as a user runs it, and the jobs run the real ``ddpm`` CLI on the cluster.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from tests.support import free_port

from pipelines.errors import UserError
from pipelines.commands.submit import WORKING_DIR_EXCLUDES, build_entrypoint, build_runtime_env

REPO = Path(__file__).resolve().parents[2]


class JobsApi(NamedTuple):
    url: str
    token: str

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.url, headers={"Authorization": f"Bearer {self.token}"})


@pytest.fixture(scope="module")
def jobs_api(tmp_path_factory):
    """The Jobs API of a one-CPU Ray head that this fixture alone owns, protected by its own token.

    Why not ``ray stop``: it kills every Ray process on the machine, including the session's ``ray.init`` and
    anyone else's cluster. Instead ``ray start --block`` stays in the foreground as the parent of the node's
    processes; SIGTERM makes it shut down exactly the processes it started (GCS, dashboard, raylet and, through
    the raylet, the workers) and exit. It runs in its own session, so a final SIGKILL to that process group can
    only reach what it spawned. Every port is chosen free, and a private ``--temp-dir`` keeps its sockets and
    session files apart (a short path under /tmp: Unix socket paths are limited to 107 bytes).

    Ray 2.60 turns token authentication on by default once ``~/.ray/auth_token`` exists, which depends on what
    else ran on the machine; the head gets an explicit token instead, as a production cluster would.

    ``python`` in a job's entrypoint is the first on the cluster's PATH, as on a real node; the head is given
    this interpreter's folder first on PATH so that jobs run in the project's environment.
    """
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    token = secrets.token_hex(32)
    dashboard_port = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard_port,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    bin_dir = Path(sys.executable).parent
    command = [
        str(bin_dir / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
        "--num-cpus=1", "--object-store-memory=100000000", f"--temp-dir={temp_dir}",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
    }
    log = tmp_path_factory.mktemp("ray_head") / "ray_start.log"
    with open(log, "wb") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    api = JobsApi(f"http://127.0.0.1:{dashboard_port}", token)
    try:
        _wait_until_up(api, head, log, timeout=120)
        yield api
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of ours still alive in the group
        except ProcessLookupError:
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_until_up(api: JobsApi, head: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll the Jobs API (with the token) until it answers; on failure, show the end of ``ray start``'s log."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and head.poll() is None:
        try:
            if requests.get(f"{api.url}/api/version", headers={"Authorization": f"Bearer {api.token}"}, timeout=2).ok:
                return
        except requests.ConnectionError:  # not listening yet
            pass
        time.sleep(0.5)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise RuntimeError(f"the Ray head did not serve {api.url} within {timeout}s:\n{tail}")


def ddpm_submit(api: JobsApi | None, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``ddpm submit ARGS`` in a fresh interpreter, as a user would, holding ``api``'s token if given."""
    token = {"RAY_AUTH_TOKEN": api.token} if api else {}
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "submit", *args],
        cwd=REPO, env={**os.environ, **token, **(env or {})}, capture_output=True, text=True, timeout=120,
    )


def _job_id(stderr: str) -> str:
    return re.search(r"job (raysubmit_\w+) submitted", stderr).group(1)


@pytest.mark.slow
def test_job_succeeds_and_its_logs_come_back(jobs_api, tmp_path):
    """A real stage (``ddpm data``) runs as a job; its output streams back and its files land where it was told."""
    raw = tmp_path / "raw"
    done = ddpm_submit(jobs_api, "--address", jobs_api.url, "--",
                       "data", "digits", "--output", str(raw), "--limit", "20",
                       env={"MLFLOW_TRACKING_URI": "http://mlflow.example:5000"})
    assert done.returncode == 0, done.stderr
    assert f"wrote 20 PNG images to {raw}, one folder per class" in done.stdout   # the job's output, streamed back
    assert len(list(raw.rglob("*.png"))) == 20
    job_id = _job_id(done.stderr)
    assert done.stderr.strip().splitlines()[-1] == f"ddpm submit: {job_id} SUCCEEDED (exit code 0)"

    info = jobs_api.client().get_job_info(job_id)
    assert info.entrypoint == f"python -m pipelines.cli data digits --output {raw} --limit 20"
    assert info.runtime_env["working_dir"].startswith("gcs://")   # this checkout, uploaded
    assert info.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    assert info.runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == os.environ["AWS_ENDPOINT_URL"]
    for secret in (os.environ["AWS_SECRET_ACCESS_KEY"], jobs_api.token):   # never travel with the job
        assert secret not in repr(info)

    status = ddpm_submit(jobs_api, "--address", jobs_api.url, "status", job_id)
    assert (status.returncode, status.stdout.strip()) == (0, f"{job_id} SUCCEEDED (exit code 0)")
    logs = ddpm_submit(jobs_api, "--address", jobs_api.url, "logs", job_id)
    assert logs.returncode == 0 and "wrote 20 PNG images" in logs.stdout


@pytest.mark.slow
def test_failing_job_is_reported_and_exits_nonzero(jobs_api, tmp_path):
    missing = tmp_path / "nonexistent"
    done = ddpm_submit(jobs_api, "--address", jobs_api.url, "--",
                       "preprocess", "--input", str(missing), "--output", str(tmp_path / "out"), "--resolution", "16")
    assert done.returncode == 1
    assert f"ddpm preprocess: error: {missing}: no such folder" in done.stdout   # the job's stderr
    job_id = _job_id(done.stderr)
    assert done.stderr.strip().splitlines()[-1] == f"ddpm submit: {job_id} FAILED (exit code 1)"
    status = ddpm_submit(jobs_api, "--address", jobs_api.url, "status", job_id)
    assert (status.returncode, status.stdout.strip()) == (0, f"{job_id} FAILED (exit code 1)")


@pytest.mark.slow
def test_no_wait_then_status_logs_and_stop(jobs_api):
    """--no-wait prints only the id; RAY_ADDRESS is honoured, and --address wins over it."""
    submitted = ddpm_submit(jobs_api, "--no-wait", "--", "--help", env={"RAY_ADDRESS": jobs_api.url})
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert re.fullmatch(r"raysubmit_\w+", job_id)

    client, deadline = jobs_api.client(), time.monotonic() + 60
    while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    status = ddpm_submit(jobs_api, "--address", jobs_api.url, "status", job_id,
                         env={"RAY_ADDRESS": "http://127.0.0.1:1"})
    assert status.stdout.strip() == f"{job_id} SUCCEEDED (exit code 0)", status.stderr
    assert "commands:" in ddpm_submit(jobs_api, "--address", jobs_api.url, "logs", job_id).stdout
    stop = ddpm_submit(jobs_api, "--address", jobs_api.url, "stop", job_id)
    assert (stop.returncode, stop.stdout.strip()) == (0, f"{job_id} was not running")


@pytest.mark.slow
@pytest.mark.parametrize("action", ["status", "logs", "stop"])
def test_unknown_job_is_one_line(jobs_api, action):
    done = ddpm_submit(jobs_api, "--address", jobs_api.url, action, "raysubmit_doesnotexist")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "does not exist" in done.stderr, done.stderr


@pytest.mark.slow
def test_missing_token_is_one_line(jobs_api, tmp_path):
    """Without the cluster's token (none in the environment, none in ~/.ray) the refusal is one clear line."""
    done = ddpm_submit(None, "--address", jobs_api.url, "status", "raysubmit_x",
                       env={"HOME": str(tmp_path), "RAY_AUTH_TOKEN": ""})
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "wants its token" in done.stderr, done.stderr


@pytest.mark.parametrize("how", ["flag", "RAY_ADDRESS"])
def test_unreachable_address_is_one_line(how):
    url = f"http://127.0.0.1:{free_port()}"
    args, env = (["--address", url], {}) if how == "flag" else ([], {"RAY_ADDRESS": url})
    done = ddpm_submit(None, *args, "--", "submit", "--help", env=env)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"ddpm submit: error: cannot reach the Ray Jobs API at {url}")


# ---------------------------------------------------------------------------------------------------------------
# What goes into the job, checked without a cluster


@pytest.mark.parametrize("command, message", [
    (["frobnicate"], "'frobnicate' is not a ddpm command"),
    (["train", "--config", "configs/digits.yaml"], "the following arguments are required: --data, --storage, --name"),
    (["generate", "--model", "m", "--out", "x.png", "--steps", "many"], "argument --steps: invalid int value"),
])
def test_a_command_that_cannot_run_is_refused_before_anything_is_sent(command, message):
    """No cluster is reachable at this address: a refusal that names the command's own error proves the check ran
    before any connection was tried."""
    done = ddpm_submit(None, "--address", f"http://127.0.0.1:{free_port()}", "--", *command)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def test_entrypoint_quotes_every_argument():
    args = ["preprocess", "--input", "s3://bucket/raw images/", "--set", "train.lr=1e-3; rm -rf /"]
    entrypoint = build_entrypoint(args)
    assert shlex.split(entrypoint) == ["python", "-m", "pipelines.cli", *args]


@pytest.mark.parametrize("flag", ["--aws-secret-access-key=abc", "--secret-key", "--mlflow-password", "--hf_token"])
def test_secret_flags_never_reach_the_entrypoint(flag):
    with pytest.raises(UserError, match="refusing"):
        build_entrypoint(["preprocess", flag, "value"])


def test_runtime_env_ships_the_project_without_local_state_or_secrets():
    environ = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AKIA-not-forwarded",
        "AWS_SECRET_ACCESS_KEY": "not-forwarded",
        "RAY_ADDRESS": "http://not-forwarded:8265",
    }
    runtime_env = build_runtime_env(REPO, ["diffusers==0.30.0"], environ)
    assert runtime_env["working_dir"] == str(REPO)
    assert {".venv/", ".git/", ".ddpm/", "mlruns/", "__pycache__/"} <= set(WORKING_DIR_EXCLUDES)
    assert runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_REGION": "eu-west-1"}
    assert runtime_env["pip"] == ["diffusers==0.30.0"]


def test_uri_with_a_password_is_refused():
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI holds a password"):
        build_runtime_env(REPO, [], {"MLFLOW_TRACKING_URI": "https://user:hunter2@mlflow.example"})


@pytest.mark.parametrize("argv", [
    ["train", "--data", "d", "--config", "c.yaml", "--storage", "s", "--name", "n"],  # fails inside main()
    ["evaluate", "--model", "m", "--data", "d"],  # fails while its module loads
])
def test_a_python_without_the_dependencies_fails_in_one_line_with_the_remedies(argv):
    """What a job sent to a ``ray start`` outside the venv runs: a Python without the project's packages (here the
    venv's own with ``-S``: no site-packages). One line names the missing module, the Python and the remedies."""
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-S", "-m", "pipelines.cli", *argv], capture_output=True, text=True,
                          cwd=repo, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"ddpm {argv[0]}: error: {sys.executable} has no module '"), lines[0]
    assert "cluster image" in lines[0] and "ddpm submit --pip" in lines[0] and "Traceback" not in done.stderr
