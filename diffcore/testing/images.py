"""Test pictures and masks for image-to-image / inpainting tests (numpy + PIL, seeded)."""
from __future__ import annotations

import numpy as np


def random_picture(width: int, height: int, seed: int = 0):
    """A PIL RGB picture of uniform random pixels."""
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def box_mask(width: int, height: int, box: tuple[float, float, float, float] = (0.25, 0.25, 1.0, 0.75)):
    """A diffusers-convention mask ("L", white = repaint) of a box given as fractions (left, top, right, bottom)."""
    from PIL import Image

    arr = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = box
    arr[int(top * height): int(bottom * height), int(left * width): int(right * width)] = 255
    return Image.fromarray(arr)
