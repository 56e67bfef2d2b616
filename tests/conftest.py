"""Shared fixtures: real components on 127.0.0.1, small sizes.

- ``s3``: an S3 endpoint served by moto's ``ThreadedMotoServer`` (what Ray's own test suite uses).
- ``ray_local``: a local Ray on 127.0.0.1 with 2 CPUs, started once and reused.
- ``ray_two_nodes``: a ``ray.cluster_utils.Cluster`` with a head and one worker node, for the multi-node path.
- ``mlflow_server``: a real ``mlflow server`` subprocess with a SQLite backend (it also serves the registry).

The AWS variables are set when pytest starts, before any Ray process exists, so Ray workers inherit the endpoint
and the (fake) credentials exactly as they would inherit a real cluster's environment.
"""

from __future__ import annotations

import os
import tempfile

import pytest

from tests.support import S3_PORT, MlflowServer, start_local_ray


def pytest_configure(config):
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
        AWS_ACCESS_KEY_ID="testing-key-id",
        AWS_SECRET_ACCESS_KEY="testing-secret-key",
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DEDUP_LOGS="0",
        MLFLOW_ENABLE_ASYNC_LOGGING="false",
        # MLflow 3's server otherwise starts a job runner with a dozen huey consumers: CPU the tests need.
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        GIT_PYTHON_REFRESH="quiet",
    )
    # Registry caches and embedded stores go to a scratch folder, never to the checkout's .ddpm/.
    os.environ["DDPM_HOME"] = tempfile.mkdtemp(prefix="ddpm-home-")
    # Tests never touch the user's embedded MLflow store: each test that needs tracking gets a server or a tmp dir.
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def s3():
    """Start moto's S3 server on 127.0.0.1 and return a boto3 client for it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    yield client
    server.stop()


@pytest.fixture
def bucket(s3, request):
    """A fresh, empty bucket for one test; its name comes from the test's name."""
    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:50].strip("-")
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def ray_local():
    """A local single-node Ray on 127.0.0.1 (started on first use, shared by later tests)."""
    yield start_local_ray()


@pytest.fixture
def ray_two_nodes():
    """A head node and a worker node on this machine (1 CPU each); shut down after the test."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module whose tensors are tiny (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    A second thread only adds synchronisation: measured 0.7 s vs 44 s of CPU for a RePaint run of
    tests/ddpm/test_inpaint.py on a busy 2-core machine. It also makes seeded float results repeat exactly.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ddpm_home(tmp_path_factory):
    """A DDPM_HOME of the module's own (``pytestmark = pytest.mark.usefixtures("ddpm_home")``): the evaluation's
    caches (the FD-cls classifier, the alignment reader) start empty, are trained once, then read by later tests."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("ddpm-home")
        mp.setenv("DDPM_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()

