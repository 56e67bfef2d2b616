"""The MLflow ``python_function`` face of a registered model: images from seeds, through the core.

This file is an MLflow "model from code": :func:`pipelines.registry.log_model` hands its *path* to
``mlflow.pyfunc.log_model``, MLflow copies it into the model artifact, and ``mlflow.pyfunc.load_model`` executes it
(the ``set_model`` call at the bottom names the model object). Nothing is pickled, and the package never imports
this module. The artifact also carries a copy of the ``ddpm`` core (``code_paths``), so anything with torch,
safetensors and MLflow can load it::

    model = mlflow.pyfunc.load_model("models:/digits@production")
    images = model.predict({"seeds": [0, 1, 2, 3], "sampler": "ddim", "steps": 50})   # (4, H, W, C) uint8

Input: a dict (or a one-row DataFrame) with ``seeds`` (a list of ints) or ``seed`` and ``num_images`` (seeds
``seed, seed+1, ...``), and optionally ``sampler`` (ddpm, ddim, dpm++), ``steps``, ``class_label`` and
``guidance_scale``. Image ``i`` depends only on its own seed and the settings, as in ``ddpm generate``.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class DDPMGenerator(PythonModel):
    """Loads the checkpoint folder logged as the ``checkpoint`` artifact (safetensors + JSON) and samples from it."""

    def load_context(self, context):
        from ddpm import checkpoint

        self.loaded = checkpoint.load(context.artifacts["checkpoint"])  # EMA weights, eval mode, CPU

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate the input as rows
        import torch

        from ddpm import DEFAULT_STEPS, noise_from_seeds, sample, to_uint8

        request = _as_dict(model_input)
        seeds = request.get("seeds")
        if seeds is None:
            first = int(request.get("seed", 0))
            seeds = range(first, first + int(request.get("num_images", 1)))
        seeds = [int(s) for s in seeds]
        sampler = request.get("sampler", "ddim")
        steps = int(request.get("steps") or DEFAULT_STEPS[sampler])
        label = request.get("class_label")
        loaded = self.loaded
        x_T, generators = noise_from_seeds(seeds, loaded.image_shape)  # (N, C, H, W), one generator per image
        class_labels = torch.full((len(seeds),), int(label), dtype=torch.long) if label is not None else None
        x_0 = sample(loaded.model, loaded.schedule, x_T, sampler=sampler, steps=steps,
                     prediction_type=loaded.prediction_type, class_labels=class_labels,
                     guidance_scale=float(request.get("guidance_scale", 1.0)), generator=generators)
        return to_uint8(x_0)  # (N, H, W, C) uint8


def _as_dict(model_input) -> dict:
    """A dict, a one-element list of dicts, or a one-row pandas DataFrame -> a plain dict of settings."""
    if isinstance(model_input, list) and len(model_input) == 1:
        model_input = model_input[0]
    if hasattr(model_input, "to_dict") and hasattr(model_input, "iloc"):  # pandas, without importing it here
        if len(model_input) != 1:
            raise ValueError(f"expected one request (one row), got {len(model_input)}")
        model_input = model_input.iloc[0].to_dict()
    if not isinstance(model_input, dict):
        raise ValueError(f"expected a dict of settings, got {type(model_input).__name__}")
    return {k: v for k, v in model_input.items() if v is not None}


mlflow.models.set_model(DDPMGenerator())
