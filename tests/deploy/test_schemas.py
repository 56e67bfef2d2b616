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


def test_the_openapi_schema_documents_the_prompt_fields():
    from deploy.ingress import api

    schemas = api.openapi()["components"]["schemas"]
    for name in ("GenerateRequest", "InpaintRequest", "EditRequest"):
        fields = schemas[name]["properties"]
        assert "takes_prompt" in fields["prompt"]["description"] and {"type": "string", "maxLength": 1000} in fields["prompt"]["anyOf"]
        assert "guidance_scale" in fields["negative_prompt"]["description"]


def test_request_defaults():
    body = GenerateRequest()
    assert (body.num_images, body.sampler, body.steps, body.output) == (4, "ddim", None, "png")
    from pydantic import ValidationError

    from deploy.schemas import EditRequest, InpaintRequest

    edit, inpaint = EditRequest(image="x"), InpaintRequest(image="x", mask="y")
    assert (edit.mask, edit.strength, edit.resample_times) == (None, 0.8, 1)  # SDEdit's: the whole image, noised
    assert (inpaint.strength, inpaint.resample_times) == (1.0, 10)  # RePaint's: the mask's region from pure noise
    with pytest.raises(ValidationError):
        InpaintRequest(image="x")  # /inpaint needs its mask
    # the command line's defaults are the endpoint's, so a request with the defaults gives the same bytes on both
    from pipelines.cli import build_parser

    for command, body in (("edit", edit), ("inpaint", inpaint)):
        args = build_parser(only=command).parse_args([command, "--model", "m", "--image", "i", "--mask", "k",
                                                      "--out", "o.png"])
        assert (args.strength, args.resample_times, args.resample_jumps) == (
            body.strength, body.resample_times, body.resample_jumps)


# Values on both sides of every bound of the request rules, and the types JSON can carry.
SETTING_VALUES = {
    "num_images": [0, 1, 64, 65],
    "sampler": ["ddim", "ddpm", "dpm++", "euler"],
    "steps": [None, -1, 0, 1, 50, 1000, 1001],
    "eta": [0.0, 0.5, 1.0, 1.0000001, -0.1],
    "seed": [None, -1, 0, 2**32 - 1, 2**32],
    "class_label": [None, -1, 0, 2, 10**6],
    "guidance_scale": [0.0, 1.0, 3.5, -0.5],
    "resample_jumps": [1, 4, 5, 0],
    "resample_times": [1, 2, 100, 101, 0],
    "strength": [1.0, 0.5, 0.01, 0.0, -0.5, 1.5],
    # "é" is 2 bytes of UTF-8: 400 of them fit MAX_PROMPT_BYTES (1000), 501 do not, in fewer than 1000 characters
    "prompt": [None, "", "a red circle", "é" * 400, "é" * 501, "x" * 1001, "\ud800", 3],
    "negative_prompt": [None, "", "a blue square", "é" * 501, ["a"]],
}


def test_the_endpoint_and_the_command_line_accept_the_same_settings():
    """One set of rules: for every combination hypothesis draws, POST /edit's body validation (pydantic, then
    the ingress's ``_job``) accepts exactly what ``ddpm.settings.check_settings`` (the CLI's and the pyfunc model's
    rule) accepts. The ingress applies the core's rule itself, so the endpoint can only be stricter: a pydantic
    bound tighter than the core's (or a rule added to the schema alone) fails here."""
    import base64

    from fastapi import HTTPException
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from pydantic import ValidationError

    from ddpm.settings import SettingError, check_settings
    from deploy.schemas import EditRequest
    from deploy.engine import Edit
    from deploy.ingress import _job

    png = base64.b64encode(b"not decoded here").decode()

    @settings(max_examples=400, deadline=None, database=None, derandomize=True)
    @given(st.fixed_dictionaries({k: st.sampled_from(v) for k, v in SETTING_VALUES.items()}))
    def agree(values):
        try:
            check_settings(**values)
            core = None
        except SettingError as exc:
            core = exc.field
        try:
            body = EditRequest(image=png, mask=png, **values)
            _job(body, Edit(b"", b"", False, body.resample_jumps, body.resample_times, body.strength))
            http = None
        except ValidationError as exc:
            http = exc.errors()[0]["loc"][0]
        except HTTPException as exc:
            http = exc.detail[0]["loc"][1]
        assert (core is None) == (http is None), (values, core, http)

    agree()
