"""Acceptance: diffcore's Z-Image pipelines equal diffusers' (the oracle) on the same tiny perturbed weights, fp32.

Sizes and prompts are chosen so that captions and image tokens both need padding to a multiple of 32 (the
learned pad tokens), rows of a batch have captions of different lengths, and CFG truncation stops guidance
mid-run (base, shift 6, 4 steps: model times 0, 0.05, 0.14, 0.33; img2img, shift 3, 5 steps at strength 0.8:
0.08, 0.18, 0.33, 0.57).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore.testing.weights import max_abs_diff, psnr

SEED = 7


def _reference(folder, img2img=False):
    from diffusers import ZImageImg2ImgPipeline, ZImagePipeline

    cls = ZImageImg2ImgPipeline if img2img else ZImagePipeline
    return cls.from_pretrained(folder, dtype=torch.float32)


def _run_reference(pipe, **kw):
    kw = {k: list(v) if isinstance(v, list) else v for k, v in kw.items()}  # diffusers templates prompts in place
    return pipe(**kw, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images


def _compare(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff, quality = max_abs_diff(ours, ref), psnr(ours, ref)
    assert diff <= 2e-3 and quality >= 45, f"max|diff|={diff:.2e} psnr={quality:.1f}"


TURBO = [
    ("a red circle", 32, 48),
    (["a cat", "two yellow squares on a white background"], 64, 32),
    ("a blue square on a green background", 80, 48),  # 5 x 3 image tokens: padded to 32
]


@pytest.mark.parametrize("prompt,height,width", TURBO)
def test_turbo_parity(load, folders, prompt, height, width):
    kw = dict(prompt=prompt, height=height, width=width, num_inference_steps=3, guidance_scale=0.0)
    ref = _run_reference(_reference(folders["turbo"]), **kw)
    gen = load(folders["turbo"])
    assert type(gen.config).__name__ == "ZImageTurboConfig"
    _compare(gen.generate(**kw, seed=SEED, output_type="np").output, ref)


BASE = [
    ("a red circle", 48, 32, dict(guidance_scale=4.0)),
    ("a red circle", 48, 32, dict(guidance_scale=4.0, cfg_truncation=0.3, negative_prompt="blurry")),
    (["a cat", "two yellow squares on a white background"], 32, 64,
     dict(guidance_scale=3.0, cfg_truncation=0.1, cfg_normalization=True, negative_prompt=["dark", "a dog"])),
    ("a blue square", 64, 48, dict(guidance_scale=5.0, cfg_normalization=1.05)),
]


@pytest.mark.parametrize("prompt,height,width,extra", BASE)
def test_base_cfg_parity(load, folders, prompt, height, width, extra):
    kw = dict(prompt=prompt, height=height, width=width, num_inference_steps=4, **extra)
    ref = _run_reference(_reference(folders["base"]), **kw)
    gen = load(folders["base"])
    assert type(gen.config).__name__ == "ZImageConfig"
    _compare(gen.generate(**kw, seed=SEED, output_type="np").output, ref)


def _image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("folder,strength,extra", [("img2img", 0.6, dict(guidance_scale=0.0)),
                                                   ("img2img", 0.8, dict(guidance_scale=3.0, cfg_truncation=0.2)),
                                                   ("turbo", 0.7, {})])  # a text-to-image folder, per request
def test_img2img_parity(load, folders, folder, strength, extra):
    kw = dict(image=_image(48, 32), prompt="make it red", strength=strength, num_inference_steps=5, **extra)
    ref = _run_reference(_reference(folders[folder], img2img=True), **{"guidance_scale": 0.0, **kw})
    gen = load(folders[folder])
    _compare(gen.generate(**kw, seed=SEED, output_type="np").output, ref)
