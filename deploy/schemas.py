"""What the Serve application accepts, as pydantic models that reject unknown keys.

Three layers of settings, each validated where it enters:

- :class:`GenerateRequest`: the JSON body of ``POST /generate`` (strict types: ``"4"`` is not a number);
  :class:`EditRequest`, that of ``POST /edit``, adds an image, an optional mask, the edit's strength and RePaint's
  settings; :class:`InpaintRequest`, that of ``POST /inpaint``, is an edit whose mask is required;
  :class:`VariationsRequest`, that of ``POST /variations``, adds the image unCLIP's decoder varies. Their bounds
  come from ``ddpm.settings``, whose ``check_settings`` the ingress also applies: the rules of ``ddpm generate``.
- :class:`SamplerConfig`: the sampler deployment's ``user_config``. Serve hands it to ``Sampler.reconfigure`` on start
  and again whenever it changes in the Serve config, without restarting replicas; so it holds what may change while
  serving: the model URI, the batching knobs and the cost budget (a request's cost depends on the model: the
  sampler checks it).
- :class:`AppArgs`: the arguments of ``build_app`` (``args:`` in a Serve config, the flags of ``ddpm serve``). They
  also carry the deployment options (replicas, resources); a Serve config's ``deployments:`` section overrides those.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from ddpm.generation import FORWARD_ROWS
from ddpm.settings import (EDIT_STRENGTH, INPAINT_RESAMPLE_TIMES, MAX_IMAGES, MAX_PROMPT_BYTES, MAX_RESAMPLE_TIMES,
                           MAX_SEED, MAX_STEPS, PRIOR_GUIDANCE_SCALE, PRIOR_STEPS)

MAX_EDIT_BASE64 = 8 * 2**20  # characters of base64 per image or mask: 6 MiB encoded
MAX_EDIT_PIXELS = 4096 * 4096  # pixels per image or mask, checked before decoding
SamplerName = Literal["ddpm", "ddim", "dpm++"]


class GenerateRequest(BaseModel):
    """The body of ``POST /generate``; every field is optional."""

    model_config = ConfigDict(extra="forbid", strict=True)

    num_images: int = Field(4, ge=1, le=MAX_IMAGES)
    sampler: SamplerName = "ddim"
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="default: 1000 ddpm, 50 ddim, 20 dpm++")
    eta: float = Field(0.0, ge=0, le=1, allow_inf_nan=False,
                       description="DDIM noise scale in [0, 1]: 0 deterministic, 1 DDPM-like")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="image i uses (seed + i) mod 2^32; random if absent")
    class_label: int | None = Field(None, description="conditional models only; null samples the unconditional model")
    # max_length counts characters, the rule (ddpm.settings) UTF-8 bytes: a string has at most as many characters as
    # bytes, so this bound never refuses what the rule accepts; it only stops a huge string before the rule runs.
    prompt: str | None = Field(None, max_length=MAX_PROMPT_BYTES,
                               description=f"text models only (GET /v1/model: takes_prompt); at most "
                                           f"{MAX_PROMPT_BYTES} bytes of UTF-8; tokens past the encoder's context "
                                           f"are dropped and reported; null or \"\" samples the unconditional "
                                           f"model")
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_BYTES,
                                        description="what guidance pushes away from (instead of the empty prompt); "
                                                    "needs a prompt and guidance_scale != 1")
    guidance_scale: float = Field(1.0, ge=0, allow_inf_nan=False,
                                  description="classifier-free guidance weight w, with a class label or a prompt")
    prior_steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                                    description=f"whole unCLIP models only (GET /v1/model: unclip): the prior's DDIM "
                                                f"steps from the prompt to its image embedding; default {PRIOR_STEPS}")
    prior_guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False,
                                               description=f"whole unCLIP models only: the prior's classifier-free "
                                                           f"guidance weight; default {PRIOR_GUIDANCE_SCALE:g}")
    output: Literal["png", "json"] = "png"
    stream: bool = Field(False, description="answer with Server-Sent Events: progress after the sampler's steps "
                                            "(event: progress), then the JSON answer of output json (event: result)")


class EditRequest(GenerateRequest):
    """The body of ``POST /edit``: an ``image``, optionally a ``mask``, and a ``strength``, plus the settings of
    ``POST /generate``. The image (or its masked region) is noised to the plan's ``strength`` share and denoised with
    the request's condition, e.g. a new prompt (SDEdit, ``ddpm.inpaint``); each of the ``num_images`` results edits
    the same image with the next seed."""

    image: str = Field(min_length=1, max_length=MAX_EDIT_BASE64, description="base64 PNG (or JPEG, WebP, BMP, GIF)")
    mask: str | None = Field(None, min_length=1, max_length=MAX_EDIT_BASE64,
                             description="base64 PNG of the image's size: white (255) = generate, black (0) = keep; "
                                         "null: edit the whole image")
    strength: float = Field(EDIT_STRENGTH, gt=0, le=1, allow_inf_nan=False,
                            description="how far the image is noised, in (0, 1]: the edit runs that share of the "
                                        "steps; low keeps the image's layout and colours, 1 ignores them")
    resize: bool = Field(False, description="stretch image and mask to the model's size instead of rejecting")
    resample_jumps: int = Field(1, ge=1, le=MAX_STEPS, description="RePaint's jump length j")
    resample_times: int = Field(1, ge=1, le=MAX_RESAMPLE_TIMES,
                                description="RePaint's resampling count r; 1 = plain replacement; ~r x the cost")


class InpaintRequest(EditRequest):
    """The body of ``POST /inpaint``: ``POST /edit`` with a ``mask`` required, the masked region started from pure
    noise (``strength`` 1) and RePaint's resampling on by default; the kept pixels come back exactly. With a
    ``prompt`` (a text model), the masked region is repainted to that description."""

    mask: str = Field(min_length=1, max_length=MAX_EDIT_BASE64,
                      description="base64 PNG of the image's size: white (255) = generate, black (0) = keep")
    strength: float = Field(1.0, gt=0, le=1, allow_inf_nan=False,
                            description="below 1 the masked region starts from the noised image (SDEdit)")
    resample_times: int = Field(INPAINT_RESAMPLE_TIMES, ge=1, le=MAX_RESAMPLE_TIMES,
                                description="RePaint's resampling count r; 1 = plain replacement; ~r x the cost")


class VariationsRequest(GenerateRequest):
    """The body of ``POST /variations``: an ``image`` and the settings of ``POST /generate``. unCLIP's decoder draws
    ``num_images`` new images from the image's CLIP embedding, one per seed (a decoder that reads captions also takes
    a ``prompt``)."""

    image: str = Field(min_length=1, max_length=MAX_EDIT_BASE64, description="base64 PNG (or JPEG, WebP, BMP, GIF) "
                                                                             "of the size the model's CLIP reads")
    resize: bool = Field(False, description="stretch the image to the CLIP's size instead of rejecting another size")
    toward: str | None = Field(None, min_length=1, max_length=MAX_EDIT_BASE64,
                               description="a second image: interpolate between the two images' CLIP embeddings "
                                           "(slerp, unCLIP's interpolations) and vary the result")
    mix: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                              description="with toward: how far from image (0) to toward (1) along the slerp; "
                                          "default 0.5")

    @model_validator(mode="after")
    def _mix_needs_toward(self):
        if self.mix is not None and self.toward is None:
            raise ValueError("mix interpolates toward a second image: send toward as well")
        return self


class SamplerConfig(BaseModel):
    """The sampler deployment's ``user_config``: what can change on running replicas."""

    model_config = ConfigDict(extra="forbid")

    model_uri: str = Field(min_length=1, description="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint folder")
    tracking_uri: str | None = None
    poll_interval_s: float = Field(30.0, ge=0, description="how often to look up the alias's version; 0: never")
    batching: bool = True
    max_cost: int = Field(20_000, ge=1, description="the largest cost of one request in U-Net rows: num_images x "
                                                     "model calls (x 2 when guided), plus a latent model's decoder")
    max_batch_images: int = Field(64, ge=MAX_IMAGES, description="images per batch, across requests")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits to fill up")
    micro_batch: int | None = Field(
        FORWARD_ROWS, ge=1, description="rows per forward pass (padded; ddpm.FORWARD_ROWS, what ddpm generate uses); "
                                         "null: the batch's own size, only without batching")

    @model_validator(mode="after")
    def _seeds_must_reproduce(self):
        # Without a fixed forward-pass size, CPU and GPU kernels pick different algorithms for different batch
        # sizes, so an image would depend (in its last bits) on which requests shared its batch.
        if self.batching and self.micro_batch is None:
            raise ValueError("batching needs a micro_batch: it is what keeps an image independent of its batch-mates")
        return self


class AppArgs(SamplerConfig):
    """The arguments of ``deploy.serve_app:build_app``: the sampler's settings, the HTTP front's, and the
    sampler deployment's replicas and resources."""

    # the HTTP front
    api_key: SecretStr | None = Field(None, description="default: $DDPM_API_KEY; unset: no authentication")
    # the sampler deployment
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0, description="the window Serve averages ongoing requests over")
    max_ongoing_requests: int = Field(64, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _replica_range(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self

    def sampler_config(self) -> SamplerConfig:
        return SamplerConfig(**self.model_dump(include=set(SamplerConfig.model_fields)))
