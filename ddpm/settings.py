"""The rules for a request for images, in one place: the CLI (``ddpm generate``, ``ddpm inpaint``), the MLflow
pyfunc model and the HTTP endpoint all call these two functions, so they accept and refuse the same settings.
Whether a request is guided (two network rows per image) is :func:`ddpm.conditioning.guided`, re-exported here.

:func:`check_settings` holds what is wrong whatever the model; :func:`check_for_model` what a particular model
refuses (a class it does not have, more steps than its timesteps, a prompt without a text encoder). A refusal is a :class:`SettingError` that
names the field as the HTTP API spells it (``guidance_scale``); the CLI turns that into its flag
(``--guidance-scale``), the endpoint into a 422 with ``loc: ["body", field]``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

from .conditioning import guided
from .sampling import DEFAULT_STEPS, SAMPLERS, strength_steps

MAX_STEPS = 1000  # the longest chain a request may ask for (the schedules here have T = 1000)
MAX_SEED = 2**32 - 1  # seeds are 32-bit: image i of a request uses (seed + i) mod 2^32
MAX_RESAMPLE_TIMES = 100  # RePaint's r; the cost is about r times the steps
MAX_IMAGES = 64  # per request to a server (POST /generate, the pyfunc model); ddpm generate writes files instead
MAX_PROMPT_BYTES = 1000  # UTF-8 bytes of a prompt or negative prompt: CLIP's 77 tokens are ~300 characters of English
# The doors' defaults for edits, the same on each (ddpm edit / POST /edit, ddpm inpaint / POST /inpaint), so that a
# request with the defaults gives the same bytes on every door:
PRIOR_STEPS = 20  # DDIM steps of a whole unCLIP model's prior (its cosine to the true embedding: RESULTS, prior)
PRIOR_GUIDANCE_SCALE = 1.0  # ... and its guidance: w = 1 gave the best cosine there
EDIT_STRENGTH = 0.8  # an edit's (SDEdit's) strength; inpainting's is 1, pure noise in the mask
INPAINT_RESAMPLE_TIMES = 10  # RePaint's r for inpainting; an edit's is 1


class SettingError(ValueError):
    """A refused setting: ``field`` as the HTTP API names it, ``reason`` without the field's name."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def _int(field: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise SettingError(field, f"must be a whole number, got {value!r}")
    if value < low or (high is not None and value > high):
        raise SettingError(field, f"must be in [{low}, {high}], got {value}" if high is not None
                           else f"must be at least {low}, got {value}")


def _float(field: str, value, low: float, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise SettingError(field, f"must be a finite number, got {value!r}")
    if value < low or (high is not None and value > high):
        raise SettingError(field, f"must be in [{low:g}, {high:g}], got {value:g}" if high is not None
                           else f"must be at least {low:g}, got {value:g}")


def _prompt(field: str, value) -> None:
    if not isinstance(value, str):
        raise SettingError(field, f"must be a string, got {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate, which JSON's "\ud800" can carry: no tokenizer takes it
        raise SettingError(field, "must be valid Unicode text (it has a lone surrogate)") from None
    if size > MAX_PROMPT_BYTES:
        raise SettingError(field, f"must be at most {MAX_PROMPT_BYTES} bytes (UTF-8), got {size}")


def check_settings(*, sampler: str = "ddim", steps: int | None = None, eta: float = 0.0, seed: int | None = 0,
                   class_label: int | None = None, guidance_scale: float = 1.0, resample_jumps: int | None = None,
                   resample_times: int | None = None, num_images: int | None = None, prompt: str | None = None,
                   negative_prompt: str | None = None, strength: float | None = None,
                   image: object | None = None, prior_steps: int | None = None,
                   prior_guidance_scale: float | None = None) -> None:
    """Refuse (SettingError) what no model accepts. ``steps`` None is the sampler's default (only None: 0 is an
    error); ``seed`` None means "draw one"; the resample settings and an edit's ``strength`` in (0, 1] are checked
    when given (inpainting, edits);
    ``num_images`` when given is a server's request (at most ``MAX_IMAGES``: ``ddpm generate`` has its own limits).
    ``prompt`` None or "" is unconditional; a non-empty ``negative_prompt`` needs a non-empty prompt and guidance
    (w != 1), since only the guided prediction neg + w (cond - neg) reads it. ``image`` (anything but None): an
    image to vary is given, a condition that guidance applies to (unCLIP's decoder). ``prior_steps`` and
    ``prior_guidance_scale``, a whole unCLIP model's prior's DDIM steps and guidance, are checked when given."""
    if num_images is not None:
        _int("num_images", num_images, 1, MAX_IMAGES)
    if sampler not in SAMPLERS:
        raise SettingError("sampler", f"must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if steps is not None:
        _int("steps", steps, 1, MAX_STEPS)
    _float("eta", eta, 0.0, 1.0)
    if seed is not None:
        _int("seed", seed, 0, MAX_SEED)
    if class_label is not None:
        _int("class_label", class_label, 0)
    for field, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if value is not None:
            _prompt(field, value)
    if class_label is not None and prompt:
        raise SettingError("prompt", "send a class label or a prompt, not both")
    if negative_prompt and not prompt:
        raise SettingError("negative_prompt", "needs a prompt (guidance pushes the prompt away from it)")
    _float("guidance_scale", guidance_scale, 0.0)
    # what guided() reads: a label, an image or a prompt
    condition = class_label if class_label is not None else image if image is not None else prompt
    if guidance_scale != 1.0 and not guided(condition, guidance_scale):  # a scale that would guide nothing
        raise SettingError("guidance_scale", "applies only with a class label, a non-empty prompt or an image "
                                             "(classifier-free guidance mixes the conditional and unconditional "
                                             "predictions)")
    if negative_prompt and guidance_scale == 1.0:
        raise SettingError("negative_prompt", "applies only with guidance: set guidance_scale != 1 (at w = 1 the "
                                              "prediction is the prompt's alone)")
    if prior_steps is not None:
        _int("prior_steps", prior_steps, 1, MAX_STEPS)
    if prior_guidance_scale is not None:
        _float("prior_guidance_scale", prior_guidance_scale, 0.0)
    if resample_jumps is not None:
        _int("resample_jumps", resample_jumps, 1, MAX_STEPS)
    if resample_times is not None:
        _int("resample_times", resample_times, 1, MAX_RESAMPLE_TIMES)
    if strength is not None:
        _float("strength", strength, -math.inf)  # a finite number
        if not 0 < strength <= 1:  # 0 would leave the image as it is
            raise SettingError("strength", f"must be in (0, 1], got {strength:g}")
    if resample_jumps is not None and resample_times is not None and resample_times > 1:
        n = steps if steps is not None else DEFAULT_STEPS[sampler]
        n = n if strength is None else strength_steps(n, strength)  # the steps an edit runs
        if not resample_jumps < n:  # a jump goes back j listed steps: there must be j steps below the first one
            ran = "steps - 1" if strength is None or strength == 1 else "the steps the edit runs - 1"
            raise SettingError("resample_jumps", f"must be in [1, {ran}] = [1, {n - 1}] to resample (or use "
                                                 f"resample_times 1); got {resample_jumps}")


def check_for_model(*, steps: int | None, class_label: int | None, num_classes: int, num_timesteps: int,
                    prompt: str | None = None, negative_prompt: str | None = None, takes_text: bool = False,
                    image: object | None = None, takes_image: bool = False, prior_steps: int | None = None,
                    prior_guidance_scale: float | None = None, prior_timesteps: int | None = None) -> None:
    """Refuse what this model cannot do: more steps than its T, a prompt when it has no text encoder
    (``takes_text`` False), an image to condition on when it has no CLIP (``takes_image`` False: not unCLIP's
    decoder), a class label when it is a text or image model, a class it does not have, any class when it is
    unconditional, prior settings when it has no prior (``prior_timesteps`` None: not a whole unCLIP model) or more
    prior steps than the prior's T."""
    if steps is not None and steps > num_timesteps:
        raise SettingError("steps", f"must be at most {num_timesteps}, this model's number of timesteps; got {steps}")
    for field, value in (("prior_steps", prior_steps), ("prior_guidance_scale", prior_guidance_scale)):
        if value is not None and prior_timesteps is None:
            raise SettingError(field, "this model has no prior (only a whole unCLIP model, prior + decoder, has)")
    if prior_steps is not None and prior_steps > prior_timesteps:
        raise SettingError("prior_steps", f"must be at most {prior_timesteps}, the prior's number of timesteps; got "
                           f"{prior_steps}")
    if image is not None and not takes_image:
        raise SettingError("image", "this model takes no image to condition on; variations need unCLIP's decoder "
                           "(a model trained with train.image_encoder)")
    if takes_image and class_label is not None:
        raise SettingError("class_label", "this model is conditioned on an image embedding: send an image instead")
    if not takes_text:
        for field, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if value is not None:
                raise SettingError(field, "this model takes no prompt; it has no text encoder"
                                   + (" (it takes a class label)" if num_classes else ""))
    elif class_label is not None:
        raise SettingError("class_label", "this model is conditioned on text: send a prompt instead")
    if class_label is None:
        return
    if num_classes == 0:
        raise SettingError("class_label", "this model is unconditional: leave the class label out")
    if not 0 <= class_label < num_classes:
        raise SettingError("class_label", f"unknown class {class_label}; this model has classes 0..{num_classes - 1}")
