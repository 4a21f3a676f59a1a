"""Acceptance: image-to-image, inpainting and edit-inpainting on loaded Qwen-Image / Qwen-Image-Edit checkpoints
equal diffusers' QwenImageImg2ImgPipeline / QwenImageInpaintPipeline / QwenImageEditInpaintPipeline (fp32)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffcore import DiffGenerator
from diffcore.testing.images import box_mask, random_picture
from diffcore.testing.weights import assert_parity


@pytest.fixture(scope="module")
def t2i(qwen_folders):
    return DiffGenerator.from_pretrained(qwen_folders["t2i"], dtype="float32", progress=False)


@pytest.mark.parametrize("strength,extra", [(0.5, {"true_cfg_scale": 1.0}),
                                            (0.8, {"negative_prompt": "blurry", "true_cfg_scale": 3.0})])
def test_qwen_img2img_parity(qwen_folders, t2i, strength, extra):
    from diffusers import QwenImageImg2ImgPipeline

    kw = dict(prompt=["a red cat", "two squares"], image=random_picture(40, 72), strength=strength, height=64, width=32,
              num_inference_steps=4, **extra)
    ref = QwenImageImg2ImgPipeline.from_pretrained(qwen_folders["t2i"], dtype=torch.float32)(
        generator=torch.Generator("cpu").manual_seed(4), output_type="np", **kw).images
    assert_parity(t2i.generate(seed=4, output_type="np", **kw).output, ref)


def test_qwen_inpaint_parity(qwen_folders, t2i):
    from diffusers import QwenImageInpaintPipeline

    kw = dict(prompt="a yellow square", image=random_picture(64, 64, 1), strength=0.75, height=64, width=64,
              num_inference_steps=4, negative_prompt=" ", true_cfg_scale=2.0)
    ref = QwenImageInpaintPipeline.from_pretrained(qwen_folders["t2i"], dtype=torch.float32)(
        mask_image=box_mask(64, 64), generator=torch.Generator("cpu").manual_seed(6), output_type="np", **kw).images
    assert_parity(t2i.generate(mask=box_mask(64, 64), seed=6, output_type="np", **kw).output, ref)


def test_qwen_edit_inpaint_parity(qwen_folders, make_vl_processor):
    from diffusers import QwenImageEditInpaintPipeline
    from transformers import AutoImageProcessor, AutoTokenizer

    folder = qwen_folders["edit"]
    proc_dir = str(Path(folder) / "processor")
    processor = make_vl_processor(AutoTokenizer.from_pretrained(proc_dir), AutoImageProcessor.from_pretrained(proc_dir))
    image, mask = random_picture(48, 40, 2), box_mask(48, 40)
    kw = dict(prompt="make the square red", image=image, num_inference_steps=2, negative_prompt=" ", true_cfg_scale=2.0)
    ref = QwenImageEditInpaintPipeline.from_pretrained(folder, processor=processor, dtype=torch.float32)(
        mask_image=mask, strength=0.9, generator=torch.Generator("cpu").manual_seed(1), output_type="np", **kw).images
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    assert_parity(gen.generate(mask=mask, strength=0.9, seed=1, output_type="np", **kw).output, ref)


def test_qwen_tasks_batch_equals_solo(t2i):
    """Inpaints with different masks and prompt lengths (true CFG) share a batch; img2img runs as its own; each == solo."""
    from diffcore.testing.concurrency import assert_batch_equals_solo

    base = dict(height=32, width=32, num_inference_steps=3, negative_prompt=" ", true_cfg_scale=2.0, output_type="np")
    requests = [dict(prompt="a cat", image=random_picture(32, 32, 1), mask=box_mask(32, 32), strength=0.7, seed=1, **base),
                dict(prompt="two yellow squares on a white background", image=random_picture(40, 40, 2),
                     mask=box_mask(40, 40, (0, 0, 0.5, 1)), strength=0.7, seed=2, **base),
                dict(prompt="a dog", image=random_picture(32, 32, 3), strength=0.7, seed=3, **base)]
    counts = assert_batch_equals_solo(t2i, requests)
    assert counts["batch"] == sum(counts["solo"]) - counts["solo"][0]  # the two inpaints share their calls


def test_qwen_inpaint_padding_mask_crop_parity(qwen_folders, t2i, monkeypatch):
    """diffusers' padding_mask_crop: the box around the mask painted at 64x32, pasted back into the 100x72 picture."""
    from diffusers import QwenImageInpaintPipeline

    from diffcore.testing.images import assert_mask_crop_parity

    image, mask = random_picture(100, 72, seed=2), box_mask(100, 72, (0.6, 0.2, 0.8, 0.5))
    kw = dict(prompt="a yellow square", image=image, strength=0.9, height=64, width=32, num_inference_steps=4,
              negative_prompt=" ", true_cfg_scale=2.0, padding_mask_crop=6)
    pipe = QwenImageInpaintPipeline.from_pretrained(qwen_folders["t2i"], dtype=torch.float32)
    assert_mask_crop_parity(monkeypatch, t2i, pipe, dict(kw, mask=mask, seed=5),
                            dict(kw, mask_image=mask, generator=torch.Generator("cpu").manual_seed(5)), (100, 72))
