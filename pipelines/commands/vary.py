"""``ddpm vary``: variations of an image from unCLIP's decoder (Ramesh et al. 2022, section 3.1).

The image goes through the CLIP the decoder pins (its image tower, ``ddpm.conditioning.embed_images``) and its
embedding conditions every output, each from its own seed: image ``i`` from seed ``(K + i) mod 2^32``, through the
core's one generation path, as ``ddpm generate`` (whose flags these are, with ``--image``) and ``POST /variations``
give it. A decoder that reads captions too takes ``--prompt``. ``--toward FILE --mix T``: the embedding is the slerp
(``ddpm.conditioning.slerp``) of the two images' embeddings at T, unCLIP's interpolation between two images.
"""

from __future__ import annotations

import argparse

from pipelines.commands import generate

HELP = "variations of an image from unCLIP's decoder: its CLIP image embedding, new seeds"
EXAMPLE = """example:
  ddpm vary --model models:/shapes-decoder@production --image scene.png --num-images 8 --guidance-scale 3 \
      --out variations.png
  ddpm vary --model .ddpm/runs/shapes-decoder/checkpoint_000000025600/model --image photo.jpg --resize \
      --num-images 16 --seed 100 --out variations.npz
  ddpm vary --model models:/shapes-decoder/1 --image a.png --toward b.png --mix 0.25 --seed 0 --out between.png

--toward FILE --mix T varies the slerp of the two images' CLIP embeddings instead (unCLIP's interpolations): the same
--seed at T = 0, 0.25, ..., 1 gives a path from one image to the other. The image must have the size and channels of the decoder's CLIP (--resize stretches it). --out ending in .png writes
one grid, .npz the array `images`, uint8 (N, H, W, C).
"""

main = generate.main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    generate.add_arguments(parser, vary=True)
