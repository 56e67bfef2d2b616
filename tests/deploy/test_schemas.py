"""The Serve application's schemas: the serve config against Ray's own ``ServeDeploySchema``, ``AppArgs`` and the
request defaults. Invalid request bodies are tested over HTTP in test_serve.py (they must be 422s naming the field).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deploy.schemas import AppArgs, GenerateRequest, SamplerConfig

ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "deploy.serve_app:build_app"
    AppArgs(**app.args)  # the builder accepts the arguments
    assert {d.name for d in app.deployments} == {"Ingress", "Sampler"}, "overrides name real deployments"
    for deployment in app.deployments:
        if isinstance(deployment.user_config, dict):
            SamplerConfig(**deployment.user_config)
    assert schema.http_options.host == "127.0.0.1"


@pytest.mark.parametrize("args, complaint", [
    ({"model_uri": "m", "min_replicas": 3, "max_replicas": 2}, "min_replicas"),
    ({"model_uri": "m", "batching": True, "micro_batch": None}, "micro_batch"),
    ({"model_uri": "m", "max_batch_images": 8}, "max_batch_images"),
    ({"model_uri": "m", "replicas": 2}, "replicas"),
    ({}, "model_uri"),
])
def test_bad_app_args_are_rejected_by_name(args, complaint):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=complaint):
        AppArgs(**args)


def test_request_defaults():
    body = GenerateRequest()
    assert (body.num_images, body.sampler, body.steps, body.output) == (4, "ddim", None, "png")
