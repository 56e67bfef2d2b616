"""Pixel helpers (ddpm/images.py): [-1, 1] to uint8 and image grids."""

import numpy as np
import torch

from ddpm import make_grid, to_uint8


def test_image_helpers():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)
    assert to_uint8(x)[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    grid = make_grid(np.full((5, 4, 4, 1), 9, np.uint8), ncols=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 1) and grid[1, 1, 0] == 9 and grid[0, 0, 0] == 0
