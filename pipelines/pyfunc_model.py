"""The MLflow ``python_function`` face of a registered model: images from seeds, through the core.

This file is an MLflow "model from code": :func:`pipelines.registry.log_model` hands its *path* to
``mlflow.pyfunc.log_model``, MLflow copies it into the model artifact, and ``mlflow.pyfunc.load_model`` executes it
(the ``set_model`` call at the bottom names the model object). Nothing is pickled, and the package never imports
this module. The artifact also carries a copy of the ``ddpm`` core (``code_paths``), so anything with torch,
safetensors, pydantic and MLflow can load it::

    model = mlflow.pyfunc.load_model("models:/digits@production")
    images = model.predict([{"seeds": [0, 1, 2, 3], "sampler": "ddim", "steps": 50}])   # (4, H, W, C) uint8

Each request names its images by ``seeds`` (a list of ints) or by ``seed`` and ``num_images`` (seeds ``seed,
seed+1, ...``, mod 2^32). Image ``i`` depends only on its own seed and the settings, through the core's one
path ``ddpm.generate_images``: the same pixels as ``ddpm generate`` and ``POST /generate``. The answer is the
images of all requests, in order, stacked into one (N, H, W, C) uint8 array.

A text model takes ``prompt`` (and ``negative_prompt``): ``[{"prompt": "a red circle", "seed": 3,
"guidance_scale": 3}]``; no prompt (or "") is unconditional. What tokenizing a prompt lost (tokens past the
context, words the tokenizer never saw) is raised as a :class:`PromptWarning` (``warnings.warn``), worded by
``ddpm.conditioning.describe`` as the CLI prints it. A whole unCLIP model (``ddpm unclip``) takes a prompt the same
way and also ``prior_steps`` and ``prior_guidance_scale``, its prior's settings.

Every request passes the rules of the other doors first (``ddpm.settings``: ``check_settings``, with at most
``MAX_IMAGES`` images per request, then ``check_for_model``), so a bad one raises the same ``SettingError`` message
that ``ddpm generate`` prints and ``POST /generate`` answers, before any image is made.
"""

from __future__ import annotations

import warnings

import mlflow
from mlflow.pyfunc import PythonModel
from pydantic import BaseModel


class PredictRequest(BaseModel):
    """One request; MLflow checks incoming dicts against these fields (the type hint of ``predict`` below)."""

    seeds: list[int] | None = None
    seed: int = 0
    num_images: int = 1
    sampler: str = "ddim"  # ddpm, ddim or dpm++ (MLflow's schemas have no Literal; sample() checks it)
    steps: int | None = None  # None: the sampler's default (1000, 50, 20)
    class_label: int | None = None
    guidance_scale: float = 1.0
    prompt: str | None = None  # a text model's; None or "": unconditional
    negative_prompt: str | None = None  # what guidance steers the prompt away from (needs guidance_scale != 1)
    prior_steps: int | None = None  # a whole unCLIP model's prior: DDIM steps (None: ddpm.settings.PRIOR_STEPS)
    prior_guidance_scale: float | None = None  # ... and its guidance (None: ddpm.settings.PRIOR_GUIDANCE_SCALE)


class PromptWarning(UserWarning):
    """A prompt was cut at the text encoder's context, or holds words its tokenizer never saw."""


class DDPMGenerator(PythonModel):
    """Loads the checkpoint folder logged as the ``checkpoint`` artifact (safetensors + JSON) and samples from it."""

    def load_context(self, context):
        from ddpm import checkpoint

        self.loaded = checkpoint.load(context.artifacts["checkpoint"])  # EMA weights, eval mode, CPU

    def predict(self, context, model_input: list[PredictRequest], params=None):
        import numpy as np

        for request in model_input:  # all refused before any is sampled
            self._check(request)
        return np.concatenate([self._generate(request) for request in model_input])

    def _check(self, request: PredictRequest) -> None:
        """The rules of every door (``ddpm.settings``); raises ``SettingError`` naming the field."""
        from ddpm.settings import check_settings

        num_images = len(request.seeds) if request.seeds is not None else request.num_images
        prior = dict(prior_steps=request.prior_steps, prior_guidance_scale=request.prior_guidance_scale)
        check_settings(sampler=request.sampler, steps=request.steps, seed=request.seed,
                       class_label=request.class_label, guidance_scale=request.guidance_scale, num_images=num_images,
                       prompt=request.prompt, negative_prompt=request.negative_prompt, **prior)
        for seed in request.seeds or []:
            check_settings(seed=seed)
        self.loaded.check_request(steps=request.steps, class_label=request.class_label, prompt=request.prompt,
                                  negative_prompt=request.negative_prompt, **prior)

    def _warn(self, request: PredictRequest) -> None:
        """What tokenizing the request's prompts lost, one PromptWarning each."""
        from ddpm.conditioning import describe

        encoder = self.loaded.prompt_encoder
        named = [(f, p) for f, p in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)) if p]
        if encoder is None or not named:
            return
        for (field, _), report in zip(named, encoder.report([p for _, p in named])):
            said = describe(report, encoder.context_length)
            if said:
                warnings.warn(f"{field}: {said}", PromptWarning, stacklevel=3)

    def _generate(self, request: PredictRequest):
        from ddpm import generate_images, image_seeds

        self._warn(request)
        seeds = request.seeds if request.seeds is not None else image_seeds(request.seed, request.num_images)
        condition = self.loaded.condition(len(seeds), class_labels=request.class_label, prompts=request.prompt,
                                          negative_prompts=request.negative_prompt)
        return generate_images(self.loaded, seeds, condition=condition, sampler=request.sampler,
                               steps=request.steps, guidance_scale=request.guidance_scale,
                               prior_steps=request.prior_steps,
                               prior_guidance_scale=request.prior_guidance_scale)  # (N, H, W, C) uint8


mlflow.models.set_model(DDPMGenerator())
