"""FID's feature extractor: Inception-v3 pool features (2048-d) from a TorchScript file the user provides.

The file is loaded on the driver (to fail early, in one line) and, as bytes, on Ray actors that may not see the
driver's disk (:class:`pipelines.evaluate.features.ExtractorSpec`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.errors import UserError

if TYPE_CHECKING:
    import numpy as np

INCEPTION_SIZE = 299  # the network's input side: images are resized to 299x299


class InceptionFeatures:
    """FID's extractor: Inception-v3 2048-d pool features from a TorchScript file given by the user.

    torchvision (which builds Inception-v3) is not used, so the network comes as a TorchScript archive, such as
    the ``pt_inception-2015-12-05`` file of NVIDIA's StyleGAN2-ADA metrics (a port of the TensorFlow graph that
    defined FID). ``torch.jit.load`` runs TorchScript, a restricted language interpreted by PyTorch, not pickled
    Python objects; still, load only files from a source you trust. The contract: (N, 3, 299, 299) float images
    with values in [0, 255] -> (N, 2048); a module whose ``forward`` has a ``return_features`` argument (NVIDIA's)
    is called with ``return_features=True``. Images are quantised uint8 first, grey is repeated to RGB, and the
    resize to 299x299 is bilinear.
    """

    def __init__(self, path: str | Path, device: str = "cpu"):
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"--inception-weights {path}: no such file (FID needs a TorchScript Inception-v3, "
                            f"e.g. pt_inception-2015-12-05.pt)")
        self._load(path.read_bytes(), f"--inception-weights {path}", device)

    @classmethod
    def from_bytes(cls, data: bytes, device: str = "cpu") -> "InceptionFeatures":
        """The same extractor from the file's bytes: how Ray actors, which may not see the driver's disk, get it."""
        self = cls.__new__(cls)
        self._load(data, "inception weights", device)
        return self

    def _load(self, data: bytes, name: str, device) -> None:
        import hashlib
        import io

        import torch

        self.key = "inception-" + hashlib.sha256(data).hexdigest()[:16]  # names the extractor in a cache key
        self.device = torch.device(device)
        try:
            self.module = torch.jit.load(io.BytesIO(data), map_location=self.device).eval()
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"{name}: not a TorchScript file "
                            f"({(str(exc).strip().splitlines() or ['unreadable'])[0]})") from None
        arguments = [a.name for a in self.module.forward.schema.arguments]
        self.kwargs = {"return_features": True} if "return_features" in arguments else {}

    def __call__(self, images: "np.ndarray", batch_size: int = 64) -> "np.ndarray":
        import numpy as np
        import torch
        import torch.nn.functional as F

        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(self.device)
                x = x.permute(0, 3, 1, 2).float()  # (B, C, H, W), 0..255
                x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
                x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
                features = self.module(x, **self.kwargs)
                if features.dim() != 2 or features.shape[0] != x.shape[0]:
                    raise UserError(f"--inception-weights: the module returned shape {tuple(features.shape)}, "
                                    f"expected ({x.shape[0]}, 2048)")
                out.append(features.double().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 2048))
