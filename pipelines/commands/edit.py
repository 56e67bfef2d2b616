"""``ddpm edit``: redraw an image, or the white part of a mask in it, toward a new prompt or class (SDEdit).

The image is noised by the forward process to ``--strength`` of the way to pure noise and denoised with the new
condition (Meng et al. 2022), so the result keeps the image's layout and colours to a degree that falls as the
strength rises. It is ``ddpm inpaint`` with other defaults: the mask optional (the whole image), strength 0.8, no
RePaint resampling; the library call is the same (:func:`ddpm.inpaint_images` with ``strength``), and so is
``POST /edit`` for the same seed and settings.
"""

from __future__ import annotations

import argparse

from pipelines.commands import inpaint

HELP = "redraw an image (or the white part of a mask in it) toward a new prompt or class, keeping its layout (SDEdit)"
EXAMPLE = """example:
  ddpm edit --model models:/shapes-text@production --image scene.png --prompt "a small green circle" \\
      --strength 0.6 --guidance-scale 3 --out edited.png
  ddpm edit --model models:/digits@production --image three.png --class-label 8 --strength 0.5 --out eight.png
  ddpm edit --model models:/shapes-text/2 --image scene.png --mask left-half.png --prompt "a red square" \\
      --strength 0.7 --out repainted.png

--strength in (0, 1] is how far the image is noised: the edit runs that share of --steps, so 0.3 changes details
and 1 ignores the image (plain generation, or inpainting from noise with a mask).
"""

main = inpaint.main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    inpaint.add_arguments(parser, edit=True)
