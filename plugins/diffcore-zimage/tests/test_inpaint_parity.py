"""Acceptance: inpainting on a loaded Z-Image / Z-Image-Turbo folder equals diffusers' ZImageInpaintPipeline on the
same tiny weights (fp32), with the default strength (1.0) and a lower one."""
from __future__ import annotations

import pytest
import torch

from diffcore.testing.images import box_mask, random_picture
from diffcore.testing.weights import assert_parity


@pytest.mark.parametrize("folder,extra", [("turbo", {}), ("turbo", {"strength": 0.7}),
                                          ("base", {"guidance_scale": 3.0, "strength": 0.8})])
def test_inpaint_parity(load, folders, folder, extra):
    from diffusers import ZImageInpaintPipeline

    kw = dict(prompt="a yellow square", image=random_picture(48, 32, 1), height=32, width=48, num_inference_steps=4,
              **extra)
    mask = box_mask(48, 32)
    ref = ZImageInpaintPipeline.from_pretrained(folders[folder], dtype=torch.float32)
    want = ref(mask_image=mask, generator=torch.Generator("cpu").manual_seed(7), output_type="np",
               **{"guidance_scale": 0.0, **kw}).images
    gen = load(folders[folder])
    assert gen.pipeline.compositions["inpaint"].default_strength == 1.0
    assert_parity(gen.generate(mask=mask, seed=7, output_type="np", **kw).output, want)
