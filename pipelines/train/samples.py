"""Sample grids for watching a model learn: fixed seeds, one row per class, through the core's one seeds -> images
path (:func:`ddpm.generate_images`), so grids from different points of training show the same noise."""

from __future__ import annotations

import numpy as np

from ddpm import from_labels, generate_images, make_grid
from ddpm.checkpoint import LoadedModel


def sample_grid(loaded: LoadedModel, *, rows: int, columns: int, steps: int, first_seed: int = 0) -> np.ndarray:
    """A (rows*(H+1)+1, columns*(W+1)+1, C) uint8 grid of DDIM samples; image i comes from seed first_seed + i.

    A class-conditional model draws row r as class r (``rows`` should then be at most its number of classes).
    """
    seeds = [first_seed + i for i in range(rows * columns)]
    labels = np.arange(rows).repeat(columns) if loaded.config.num_classes else None  # (rows * columns,)
    images = generate_images(loaded, seeds, condition=from_labels(labels, len(seeds)), sampler="ddim",
                             steps=steps)  # (N, H, W, C)
    return make_grid(images, ncols=columns)
