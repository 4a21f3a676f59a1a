"""Acceptance: a FLUX.1-Fill-dev layout checkpoint (FluxFillPipeline, 384-channel transformer input scaled down)
equals diffusers' FluxFillPipeline on tiny perturbed weights (fp32)."""
from __future__ import annotations

import pytest
import torch

from diffcore import DiffGenerator
from diffcore.errors import SamplingParamError
from diffcore.testing.images import box_mask, random_picture
from diffcore.testing.weights import assert_parity


@pytest.mark.parametrize("prompt,strength", [("a red cat", 1.0), (["a cat", "a yellow dog"], 0.8)])
def test_flux_fill_parity(flux_fill_folder, prompt, strength):
    from diffusers import FluxFillPipeline

    mask = box_mask(64, 48, (0.4, 0.15, 0.9, 0.85))
    kw = dict(prompt=prompt, image=random_picture(64, 48), height=48, width=64, strength=strength, num_inference_steps=3,
              guidance_scale=30.0, max_sequence_length=32)
    ref = FluxFillPipeline.from_pretrained(flux_fill_folder, torch_dtype=torch.float32)(
        mask_image=mask, generator=torch.Generator("cpu").manual_seed(9), output_type="np", **kw).images
    gen = DiffGenerator.from_pretrained(flux_fill_folder, dtype="float32", progress=False)
    ours = gen.generate(mask=mask, seed=9, output_type="np", **kw).output
    assert_parity(ours, ref)


def test_flux_fill_needs_a_mask(flux_fill_folder):
    gen = DiffGenerator.from_pretrained(flux_fill_folder, dtype="float32", progress=False)
    with pytest.raises(SamplingParamError, match="mask"):
        gen.generate(prompt="x", image=random_picture(32, 32), height=32, width=32, num_inference_steps=1)
