"""The MLflow ``python_function`` face of a registered unCLIP prior: captions in, sampled CLIP image embeddings out.

A "model from code" like :mod:`pipelines.pyfunc_clip`: :func:`pipelines.registry.log_prior` hands this file's path to
MLflow, which copies it into the model artifact with the ``ddpm`` core; nothing is pickled::

    model = mlflow.pyfunc.load_model("models:/shapes-prior/1")
    model.predict(pd.DataFrame({"text": ["a small red square"], "seed": [0]}))   # -> (N, E) float32, unit norm

Optional params: ``steps`` (DDIM, default 50) and ``guidance_scale`` (default 1). The artifact is
``ddpm.prior.save``'s folder with the CLIP it was trained on in ``clip/``, whose text tower encodes the captions.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class PriorSampler(PythonModel):
    """Loads the folder logged as the ``prior`` artifact (safetensors + JSON) and its CLIP's text tower."""

    def load_context(self, context):
        from pathlib import Path

        from ddpm import prior, text

        folder = Path(context.artifacts["prior"])
        self.prior = prior.load(folder)  # eval mode, CPU
        self.encoder = text.load(folder / "clip")

    def predict(self, context, model_input, params=None):
        from ddpm import encode_prompts
        from ddpm.generation import sample_embeddings

        params = params or {}
        texts = [str(t) for t in model_input["text"]]
        seeds = [int(s) for s in model_input["seed"]] if "seed" in model_input else list(range(len(texts)))
        condition = encode_prompts(self.encoder, texts)
        return sample_embeddings(self.prior.model, self.prior.schedule, condition, seeds,
                                 steps=int(params.get("steps", 50)),
                                 guidance_scale=float(params.get("guidance_scale", 1.0))).numpy()  # (N, E)


mlflow.models.set_model(PriorSampler())
