"""``padding_mask_crop``: inpaint only the part of the picture around the mask, at full resolution.

As diffusers' ``VaeImageProcessor`` (``get_crop_region``, ``resize_mode="fill"``, ``apply_overlay``), pixel for
pixel on PIL images: the mask's bounding box, padded by ``padding_mask_crop`` pixels and widened to the
output's aspect ratio, is cut from the picture and the mask and resized to the output size; after decoding,
the painted crop is resized back into the box and the original picture is laid over it where the mask is
black, so only the masked area changes. A small mask on a large picture then gets the model's whole
resolution. The paste-back is 8-bit (PIL), as in diffusers: the result's values are multiples of 1/255.
"""
from __future__ import annotations

import numpy as np

from .errors import SamplingParamError


def crop_region(mask, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the box holding every non-black pixel of ``mask``, padded, widened to width:height."""
    m = np.asarray(mask.convert("L"))
    h, w = m.shape
    cols, rows = np.flatnonzero((m != 0).any(axis=0)), np.flatnonzero((m != 0).any(axis=1))
    if not len(cols):
        raise SamplingParamError("mask", "padding_mask_crop needs a mask with a non-black pixel")
    x1, y1 = int(max(cols[0] - pad, 0)), int(max(rows[0] - pad, 0))
    x2, y2 = int(min(cols[-1] + 1 + pad, w)), int(min(rows[-1] + 1 + pad, h))
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:  # too wide: grow the height
        y1, y2 = _widen(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), h)
    else:
        x1, x2 = _widen(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), w)
    return x1, y1, x2, y2


def _widen(lo: int, hi: int, diff: int, size: int) -> tuple[int, int]:
    """diffusers' growth of one side of the box by ``diff``, centred, shifted back inside [0, size]."""
    lo, hi = lo - diff // 2, hi + diff - diff // 2
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def resize_and_fill(image, width: int, height: int):
    """Resize to fit inside (width, height) keeping the aspect, centre it, and stretch its edge rows / columns
    into the empty margins (diffusers' ``resize_mode="fill"``). Returns an RGB image."""
    from PIL import Image

    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)), box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)), box=(fill + src_w, 0))
    return res


def _resize_and_crop(image, width: int, height: int):
    """Resize to cover (width, height) keeping the aspect, then centre-crop (diffusers' ``resize_mode="crop"``)."""
    from PIL import Image

    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return res


def crop(picture, mask, width: int, height: int, pad: int):
    """(picture crop, mask crop, box): what the model paints, at (width, height), and where it goes back."""
    box = crop_region(mask, width, height, pad)
    return resize_and_fill(picture.crop(box), width, height), \
        resize_and_fill(mask.crop(box), width, height).convert("L"), box


def paste_back(mask, picture, painted, box):
    """The painted crop (a PIL image of the output size) resized into ``box`` of the original picture, under
    the original picture wherever the mask is black (diffusers' ``apply_overlay``)."""
    from PIL import Image, ImageOps

    width, height = picture.size
    kept = Image.new("RGBa", (width, height))
    kept.paste(picture.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    kept = kept.convert("RGBA")
    x, y, x2, y2 = box
    base = Image.new("RGBA", (width, height))
    base.paste(_resize_and_crop(painted, x2 - x, y2 - y), (x, y))
    out = base.convert("RGB").convert("RGBA")
    out.alpha_composite(kept)
    return out.convert("RGB")
