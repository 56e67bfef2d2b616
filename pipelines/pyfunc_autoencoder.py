"""The MLflow ``python_function`` face of a registered autoencoder: images in, latents out, through the core.

Like :mod:`pipelines.pyfunc_model`, a "model from code": :func:`pipelines.registry.log_autoencoder` hands this file's
path to MLflow, which copies it into the model artifact with the ``ddpm`` core; nothing is pickled::

    ae = mlflow.pyfunc.load_model("models:/photos-ae/1")
    latents = ae.predict(images)   # (B, H, W, C) uint8 -> (B, latent_channels, H / f, W / f) float32, scaled

The latents are what a latent DDPM trains on (``ddpm.Autoencoder.encode``: scaled posterior means).
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class AutoencoderEncoder(PythonModel):
    """Loads the folder logged as the ``autoencoder`` artifact (safetensors + JSON) and encodes images with it."""

    def load_context(self, context):
        from ddpm import autoencoder

        self.ae = autoencoder.load(context.artifacts["autoencoder"])  # eval mode, CPU

    # np.ndarray: a type hint MLflow accepts without inferring a schema (without one it warns on every load)
    def predict(self, context, model_input: np.ndarray, params=None):
        import torch

        from ddpm import from_uint8

        images = np.asarray(model_input, dtype=np.uint8)  # (B, H, W, C)
        with torch.inference_mode():
            return self.ae.encode(from_uint8(images)).numpy()  # (B, c, h, w) float32


mlflow.models.set_model(AutoencoderEncoder())
