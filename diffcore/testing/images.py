"""Test pictures and masks for image-to-image / inpainting tests (numpy + PIL, seeded)."""
from __future__ import annotations

import numpy as np


def random_picture(width: int, height: int, seed: int = 0):
    """A PIL RGB picture of uniform random pixels."""
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def random_rgba(width: int, height: int, seed: int = 0):
    """A PIL RGBA picture of random pixels: opaque on the left half, random alpha on the right."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (height, width, 4), dtype=np.uint8)
    arr[..., 3] = np.where(np.arange(width)[None, :] < width // 2, 255, rng.integers(0, 255, (height, width)))
    return Image.fromarray(arr, "RGBA")


def box_mask(width: int, height: int, box: tuple[float, float, float, float] = (0.25, 0.25, 1.0, 0.75)):
    """A diffusers-convention mask ("L", white = repaint) of a box given as fractions (left, top, right, bottom)."""
    from PIL import Image

    arr = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = box
    arr[int(top * height): int(bottom * height), int(left * width): int(right * width)] = 255
    return Image.fromarray(arr)


def assert_mask_crop_parity(monkeypatch, gen, pipe, ours_kwargs: dict, theirs_kwargs: dict, size: tuple) -> None:
    """``padding_mask_crop`` parity with a diffusers inpaint pipeline: the painted crop before the paste-back
    within the parity bound (both sides' floats, caught on the way), and the 8-bit pasted-back pictures equal
    but for single 8-bit steps where the two crops' floats round differently (at most 0.1% of the values)."""
    from diffcore.stages.image_to_image import MaskOverlayStage
    from diffcore.testing.weights import assert_parity

    crops = {}
    postprocess = pipe.image_processor.postprocess

    def theirs(image, *args, **kwargs):
        crops["theirs"] = (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        return postprocess(image, *args, **kwargs)

    overlay = MaskOverlayStage.forward

    def ours(self, req):
        crops["ours"] = req.output.float().cpu().numpy()
        return overlay(self, req)

    monkeypatch.setattr(pipe.image_processor, "postprocess", theirs)
    monkeypatch.setattr(MaskOverlayStage, "forward", ours)
    want = np.stack([np.asarray(im) for im in pipe(**theirs_kwargs).images]).astype(np.int16)
    got = gen.generate(**ours_kwargs)
    assert_parity(crops["ours"], crops["theirs"])
    w, h = size
    assert got.output.shape == (len(want), h, w, 3) and [im.size for im in got.images] == [(w, h)] * len(want)
    steps = np.abs(np.stack([np.asarray(im) for im in got.images]).astype(np.int16) - want)
    assert steps.max() <= 1 and (steps > 0).mean() < 1e-3, (steps.max(), (steps > 0).mean())
    np.testing.assert_allclose(got.output * 255, np.stack([np.asarray(im) for im in got.images]), atol=1e-3)
