"""padding_mask_crop's pixel steps (diffcore.mask_crop) equal diffusers' VaeImageProcessor's, pixel for pixel:
the crop box, the fill-resize of picture and mask, and the paste-back overlay."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffcore.mask_crop import crop, crop_region, paste_back
from diffcore.testing.images import box_mask, random_picture

CASES = [  # picture (w, h), mask box (fractions), output (w, h), pad
    ((96, 80), (0.4, 0.3, 0.6, 0.5), (32, 32), 4),
    ((96, 80), (0.0, 0.0, 0.2, 0.9), (64, 32), 0),  # a tall box for a wide output: widened, clamped at the left
    ((120, 64), (0.8, 0.1, 1.0, 0.3), (32, 48), 10),  # clamped at the right
    ((64, 100), (0.1, 0.7, 0.9, 1.0), (48, 32), 3),  # clamped at the bottom
    ((50, 50), (0.0, 0.0, 1.0, 1.0), (32, 32), 8),  # the whole picture
]


def _processors():
    from diffusers.image_processor import VaeImageProcessor

    return (VaeImageProcessor(vae_scale_factor=8),
            VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True))


@pytest.mark.parametrize("size,box,out,pad", CASES)
def test_crop_and_paste_back_equal_diffusers(size, box, out, pad):
    images, masks = _processors()
    picture, mask = random_picture(*size, seed=1), box_mask(*size, box)
    width, height = out
    coords = masks.get_crop_region(mask, width, height, pad=pad)
    assert crop_region(mask, width, height, pad) == coords
    ours_pic, ours_mask, ours_box = crop(picture, mask, width, height, pad)
    assert ours_box == coords
    want_pic = images.preprocess(picture, height, width, crops_coords=coords, resize_mode="fill")
    np.testing.assert_array_equal(np.asarray(ours_pic, dtype=np.float32) / 127.5 - 1, want_pic[0].permute(1, 2, 0).numpy())
    want_mask = masks.preprocess(mask, height, width, crops_coords=coords, resize_mode="fill")
    np.testing.assert_array_equal((np.asarray(ours_mask) / 255.0 >= 0.5), want_mask[0, 0].numpy() == 1)
    painted = random_picture(width, height, seed=2)
    np.testing.assert_array_equal(np.asarray(paste_back(mask, picture, painted, coords)),
                                  np.asarray(images.apply_overlay(mask, picture, painted, coords)))


def test_kept_pixels_are_the_picture_s():
    picture, mask = random_picture(80, 60, seed=3), box_mask(80, 60, (0.5, 0.5, 0.75, 0.75))
    out = np.asarray(paste_back(mask, picture, Image.new("RGB", (32, 32), (255, 0, 0)), crop_region(mask, 32, 32, 2)))
    keep = np.asarray(mask) == 0
    np.testing.assert_array_equal(out[keep], np.asarray(picture)[keep])
    assert (out[~keep] == (255, 0, 0)).all()
