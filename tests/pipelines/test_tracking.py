"""The embedded tracking default and the training logger's behaviour when the server rejects or is unreachable."""

from __future__ import annotations

import pytest
from tests.support import free_port

from pipelines import tracking


def test_embedded_default_lives_under_ddpm_home(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "home"))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    experiment_id = tracking.ensure_experiment("embedded")
    assert tracking.ensure_experiment("embedded") == experiment_id
    location = tracking.client().get_experiment(experiment_id).artifact_location
    assert location == (tmp_path / "home" / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


@pytest.mark.parametrize("uri, shown", [
    ("https://user:secret@mlflow.example.com/x?token=abc", "https://mlflow.example.com/x"),
    ("s3://bucket/data", "s3://bucket/data"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ("relative/folder", "relative/folder"),
])
def test_redact_uri_drops_credentials(uri, shown):
    assert tracking.redact_uri(uri) == shown


def test_logger_reports_what_an_unreachable_server_never_got():
    logger = tracking.RunLogger("some-run", f"http://127.0.0.1:{free_port()}", retry_s=0.2)
    logger.log_metrics({"loss": 1.0}, step=1)
    logger.log_file(b"png", "samples/a.png")
    lost = logger.close(timeout_s=1.0)
    assert lost == ["metrics at step 1 (server unreachable)", "artifact samples/a.png (server unreachable)"]
    assert logger.close() == []


@pytest.mark.slow
def test_logger_delivers_and_reports_rejected_calls(mlflow_server):
    client = tracking.client(mlflow_server.uri)
    run = client.create_run(tracking.ensure_experiment("test-logger", mlflow_server.uri))
    logger = tracking.RunLogger(run.info.run_id, mlflow_server.uri)
    for step in range(5):
        logger.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    logger.set_tag("stage", "test")
    logger.log_file(b"\x89PNG fake", "samples/x.png")
    assert logger.close() == []
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1, 2, 3, 4]
    assert client.get_run(run.info.run_id).data.tags["stage"] == "test"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == ["samples/x.png"]

    rejected = tracking.RunLogger("0" * 32, mlflow_server.uri)  # no such run: the server answers 404
    rejected.log_metrics({"loss": 1.0}, step=0)
    [lost] = rejected.close()
    assert lost.startswith("metrics at step 0 (rejected:")
