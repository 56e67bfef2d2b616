"""Fixtures for the reliability suite: real components, real failures, bounded waits.

The shared fixtures (``s3``, ``bucket``, ``ray_local``, ``mlflow_server``) come from ``tests/conftest.py``; this file
adds what the faults need and a healthy test does not: a small dataset every training fault trains on
(``digits_8px``) and an S3 endpoint that can be killed and brought back (``s3_endpoint``). The helpers they use, and
the tests call, are in ``tests/reliability/support.py``.
"""

from __future__ import annotations

import pytest

from .support import S3Endpoint


@pytest.fixture(scope="session")
def digits_8px(tmp_path_factory):
    """200 of scikit-learn's digits, preprocessed to 8x8x1 Parquet shards in a local folder (all nodes share it)."""
    from tests.support import start_local_ray

    from pipelines.data.digits import write_digits
    from pipelines.data.preprocess import preprocess

    start_local_ray()
    root = tmp_path_factory.mktemp("digits")
    write_digits(str(root / "raw"), limit=200)
    preprocess(str(root / "raw"), str(root / "processed"), resolution=8, channels=1)
    return str(root / "processed")


@pytest.fixture
def s3_endpoint(s3):
    """A killable S3 endpoint, started; always gone after the test."""
    endpoint = S3Endpoint()
    endpoint.start()
    yield endpoint
    endpoint.kill()
