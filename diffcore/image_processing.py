"""Image pre-processing shared by pipelines, numerically equal to diffusers' VaeImageProcessor for PIL input."""
from __future__ import annotations


import numpy as np
import torch

_RESAMPLE = {"lanczos": "LANCZOS", "bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST"}


def resize(image, height: int, width: int, resample: str = "lanczos"):
    """Resize a PIL image to (height, width)."""
    from PIL import Image

    return image.resize((width, height), resample=getattr(Image.Resampling, _RESAMPLE[resample]))


def to_tensor(images: list, normalize: bool = True) -> torch.Tensor:
    """PIL RGB images of one size -> float32 (B, 3, H, W), in [-1, 1] when ``normalize``."""
    arr = np.stack([np.array(im).astype(np.float32) / 255.0 for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    return 2.0 * x - 1.0 if normalize else x
