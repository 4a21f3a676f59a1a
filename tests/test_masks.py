"""Inpainting masks in diffusers' convention (white = repaint) and OpenAI's (transparent = edit) read into one
form; bad masks are typed errors naming the mask (diffcore.masks)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffcore.errors import SamplingParamError
from diffcore.masks import check_fits, from_openai, load_mask, mask_tensor

AREA = np.zeros((8, 12), dtype=bool)
AREA[2:6, 6:] = True  # the area to repaint


def _white_is_repaint():
    return Image.fromarray(np.where(AREA, 255, 0).astype(np.uint8))


def _openai_form(mode="RGBA"):
    rgba = np.full((8, 12, 4), 90, dtype=np.uint8)
    rgba[..., 3] = np.where(AREA, 0, 255)
    return Image.fromarray(rgba, "RGBA").convert(mode)


@pytest.mark.parametrize("make", [
    _white_is_repaint,
    lambda: _white_is_repaint().convert("RGB"),
    lambda: _white_is_repaint().convert("1"),
    lambda: _openai_form(),
    lambda: _openai_form("LA"),
    lambda: Image.fromarray(np.where(AREA, 255, 0).astype(np.uint8)).convert("RGBA"),  # opaque: by luminance
    lambda: AREA,  # bool array
    lambda: AREA.astype(np.float32),
    lambda: np.where(AREA, 255, 0).astype(np.uint8)[..., None],
    lambda: np.asarray(_openai_form()),  # HxWx4 array with transparency
])
def test_every_form_reads_the_same(make):
    assert np.array_equal(np.asarray(load_mask(make())) == 255, AREA)


def test_openai_form_from_a_file(tmp_path):
    path = tmp_path / "mask.png"
    _openai_form().save(path)
    assert np.array_equal(np.asarray(from_openai(str(path))) == 255, AREA)
    with pytest.raises(SamplingParamError, match="no transparency"):
        from_openai(_white_is_repaint())


@pytest.mark.parametrize("bad,match", [
    (Image.new("L", (8, 8), 0), "marks nothing"),
    (Image.new("RGBA", (8, 8), (0, 0, 0, 255)), "marks nothing"),
    (np.zeros((8, 8, 2), dtype=np.uint8), "HxW, HxWx1, HxWx3 or HxWx4"),
    (np.full((8, 8), 2.0), r"\[0, 1\]"),
    (np.full((8, 8), 7, dtype=np.int32), "bool, uint8"),
    (Image.new("CMYK", (8, 8)), "mode 'CMYK'"),
    ("/no/such/mask.png", "does not exist"),
])
def test_bad_masks_are_typed_errors(bad, match):
    with pytest.raises(SamplingParamError, match=match) as info:
        load_mask(bad)
    assert info.value.param == "mask"


def test_size_and_aspect():
    check_fits(Image.new("L", (24, 16)), Image.new("RGB", (12, 8)))  # another size, same aspect: resized
    with pytest.raises(SamplingParamError, match="another aspect ratio"):
        check_fits(Image.new("L", (12, 12)), Image.new("RGB", (12, 8)))
    m = mask_tensor(_white_is_repaint(), 16, 24)  # resized like the image, then binarised (diffusers)
    assert m.shape == (1, 1, 16, 24) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert np.array_equal(m[0, 0, ::2, ::2].numpy() == 1, AREA)
