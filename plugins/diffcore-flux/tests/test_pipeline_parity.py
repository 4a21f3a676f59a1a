"""Acceptance: diffcore's FLUX pipelines equal diffusers' on the same tiny perturbed weights (fp32)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore import DiffGenerator
from diffcore.testing.weights import max_abs_diff, psnr


def _diffusers(folder, kontext=False):
    from diffusers import FluxKontextPipeline, FluxPipeline

    cls = FluxKontextPipeline if kontext else FluxPipeline
    return cls.from_pretrained(folder, torch_dtype=torch.float32)


def _compare(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff, quality = max_abs_diff(ours, ref), psnr(ours, ref)
    assert diff <= 2e-3 and quality >= 45, f"max|diff|={diff:.2e} psnr={quality:.1f}"
    return diff, quality


CASES = [
    # variant, prompts, height, width, extra
    ("dev", "a red circle on a blue background", 64, 64, {"guidance_scale": 3.5}),
    ("dev", ["a cat", "two yellow squares on a white background"], 48, 80, {"guidance_scale": 4.0}),
    ("schnell", "a cat", 64, 96, {"guidance_scale": 0.0}),
    ("schnell", ["a dog", "a red cat"], 32, 48, {"guidance_scale": 0.0}),
    ("dev", "a red circle", 48, 32, {"negative_prompt": "blurry", "true_cfg_scale": 3.0}),
    ("dev", ["a red circle", "a blue square"], 32, 64, {"negative_prompt": ["blurry", "dark"], "true_cfg_scale": 2.0}),
]


@pytest.mark.parametrize("variant,prompt,height,width,extra", CASES)
def test_flux_text_to_image_parity(flux_folders, variant, prompt, height, width, extra):
    folder = flux_folders[variant]
    steps = 3
    ref = _diffusers(folder)(prompt=prompt, height=height, width=width, num_inference_steps=steps,
                             max_sequence_length=48, generator=torch.Generator("cpu").manual_seed(7),
                             output_type="np", **extra).images
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    ours = gen.generate(prompt=prompt, height=height, width=width, num_inference_steps=steps, max_sequence_length=48,
                        seed=7, output_type="np", **extra).output
    _compare(ours, ref)


@pytest.mark.parametrize("prompt,height,width,image_size", [
    ("make it red", 32, 32, (40, 40)),
    (["make it red", "add a cat"], 48, 64, (60, 36)),
])
def test_flux_kontext_parity(flux_folders, prompt, height, width, image_size):
    folder = flux_folders["kontext"]
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (image_size[1], image_size[0], 3), dtype=np.uint8))
    ref = _diffusers(folder, kontext=True)(image=image, prompt=prompt, height=height, width=width, max_area=height * width,
                                           num_inference_steps=2, guidance_scale=2.5, max_sequence_length=32,
                                           generator=torch.Generator("cpu").manual_seed(3), output_type="np").images
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    ours = gen.generate(image=image, prompt=prompt, height=height, width=width, num_inference_steps=2, guidance_scale=2.5,
                        max_sequence_length=32, seed=3, output_type="np").output
    _compare(ours, ref)
