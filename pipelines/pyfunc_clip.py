"""The MLflow ``python_function`` face of a registered CLIP: texts or images in, unit-norm embeddings out.

Like :mod:`pipelines.pyfunc_autoencoder`, a "model from code": :func:`pipelines.registry.log_clip` hands this file's
path to MLflow, which copies it into the model artifact with the ``ddpm`` core; nothing is pickled::

    model = mlflow.pyfunc.load_model("models:/shapes-clip/1")
    model.predict(pd.DataFrame({"text": ["a small red square"]}))   # -> (N, E) float32 text embeddings
    model.predict(images)          # (B, H, W, C) uint8 -> (B, E) float32 image embeddings

The artifact is ``ddpm.clip.save``'s folder; its ``text_encoder/`` + ``tokenizer/`` is what ``ddpm.text.load`` reads.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class ClipEmbedder(PythonModel):
    """Loads the folder logged as the ``clip`` artifact (safetensors + JSON) and embeds texts or images with it."""

    def load_context(self, context):
        from ddpm import clip

        self.clip = clip.load(context.artifacts["clip"])  # eval mode, CPU

    def predict(self, context, model_input, params=None):
        import torch

        from ddpm import from_uint8

        model, tokenizer = self.clip
        with torch.inference_mode():
            if hasattr(model_input, "columns"):  # a DataFrame with a "text" column
                texts = [str(t) for t in model_input["text"]]
                return model.encode_text(tokenizer.tokenize(texts)).numpy()  # (N, E)
            images = np.asarray(model_input, dtype=np.uint8)  # (B, H, W, C)
            return model.encode_image(from_uint8(images)).numpy()  # (B, E)


mlflow.models.set_model(ClipEmbedder())
