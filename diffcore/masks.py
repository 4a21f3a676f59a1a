"""Inpainting masks in either convention, read into one: a greyscale image where white = repaint.

* diffusers' convention: a black-and-white image (any mode); white pixels are repainted, black kept
  (luminance, binarised at 0.5 after resizing, as ``VaeImageProcessor(do_binarize=True)`` does).
* OpenAI's ``images.edit`` convention: a PNG with an alpha channel whose fully transparent pixels
  (alpha = 0) mark the area to edit.

A mask with an alpha channel that has at least one fully transparent pixel is read in OpenAI's form;
any other mask by its luminance. The mask is resized to the output size like the image (as diffusers
does), so it may have another size than the image, but not another aspect ratio (it would not line
up). A mask that marks nothing is refused; an all-white one repaints the whole picture (img2img).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import SamplingParamError

_MODES = {"1", "L", "P", "RGB", "RGBA", "LA", "PA", "La", "RGBa"}


def _open(item):
    from PIL import Image, UnidentifiedImageError

    from .stages.input_validation import _check_pixels

    path = Path(item)
    if not path.is_file():
        raise SamplingParamError("mask", f"file {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            _check_pixels(img.size, "mask", path)
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SamplingParamError("mask", f"{str(path)!r} is not a readable image ({exc})") from None


def _from_array(item):
    from PIL import Image

    arr = np.asarray(item.detach().cpu() if hasattr(item, "detach") else item)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise SamplingParamError("mask", f"expected an HxW, HxWx1, HxWx3 or HxWx4 array, got shape {tuple(arr.shape)}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise SamplingParamError("mask", "float mask arrays must be finite and in [0, 1] (1 = repaint)")
        arr = (arr * 255).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise SamplingParamError("mask", f"mask arrays must be bool, uint8 (255 = repaint) or float (1 = repaint), "
                                         f"got {arr.dtype}")
    return Image.fromarray(arr)


def load_mask(item):
    """A PIL ``"L"`` image, white (255) = repaint, from a path, a PIL image or an array in either convention."""
    img = _open(item) if isinstance(item, (str, Path)) else item if hasattr(item, "convert") else _from_array(item)
    if img.mode not in _MODES:
        raise SamplingParamError("mask", f"mode {img.mode!r} is not supported; pass a black-and-white image "
                                         "(white = repaint) or a PNG with transparency (transparent = repaint)")
    if min(img.size) < 1:
        raise SamplingParamError("mask", "the mask is empty")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if "A" in img.getbands() or "a" in img.getbands():
        alpha = np.asarray(img.getchannel("A" if "A" in img.getbands() else "a"))
        if (alpha == 0).any():  # OpenAI's form
            from PIL import Image

            return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8))
    mask = img.convert("L")
    if np.asarray(mask).max() < 128:
        raise SamplingParamError("mask", "the mask marks nothing to repaint: it is all black (and has no transparent "
                                         "pixel); white (or, in OpenAI's form, transparent) pixels mark the area to edit")
    return mask


def from_openai(item):
    """OpenAI's form only (the edits route): a PNG whose fully transparent pixels mark the area to edit."""
    img = _open(item) if isinstance(item, (str, Path)) else item
    if not ("A" in img.getbands() or (img.mode == "P" and "transparency" in img.info)):
        raise SamplingParamError("mask", f"an OpenAI edit mask is a PNG with an alpha channel whose transparent pixels "
                                         f"mark the area to edit; this one has mode {img.mode!r} and no transparency")
    return load_mask(img)


def check_fits(mask, image) -> None:
    """The mask must line up with the image: the same aspect ratio (within 1%), any size."""
    (mw, mh), (iw, ih) = mask.size, image.size
    if abs(mw / mh - iw / ih) > 0.01 * (iw / ih):
        raise SamplingParamError("mask", f"the mask is {mw}x{mh} but the image is {iw}x{ih}: another aspect ratio, so "
                                         "it would not line up; pass a mask of the image's size")


def mask_tensor(mask, height: int, width: int) -> torch.Tensor:
    """(1, 1, height, width) float32 in {0, 1}: resized (Lanczos) and binarised at 0.5, as diffusers' mask processor."""
    from .image_processing import resize

    arr = np.asarray(resize(mask, height, width)).astype(np.float32) / 255.0
    m = torch.from_numpy(arr)[None, None]
    return (m >= 0.5).to(torch.float32)
