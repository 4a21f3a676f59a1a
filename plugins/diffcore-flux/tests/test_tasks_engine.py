"""Image-to-image and inpainting on the engine: generate_batch (mixed tasks, strengths and masks) and
concurrent generate() equal solo runs; LoRA per request on an inpaint equals diffusers' FluxInpaintPipeline
with the adapter set."""
from __future__ import annotations

import pytest
import torch

from diffcore import DiffGenerator
from diffcore.testing.concurrency import assert_batch_equals_solo, assert_concurrent_equals_solo
from diffcore.testing.images import box_mask, random_picture
from diffcore.testing.lora import diffusers_with_loras, save_peft_lora
from diffcore.testing.weights import assert_parity

BASE = dict(height=32, width=32, num_inference_steps=4, output_type="np")


def _requests():
    pic = random_picture(40, 40, 1)
    return [
        dict(prompt="a cat", image=pic, mask=box_mask(40, 40), strength=0.75, seed=1, **BASE),
        dict(prompt=["a dog", "a red square"], image=random_picture(32, 32, 2), mask=box_mask(32, 32, (0, 0, 0.5, 1)),
             strength=0.75, seed=2, guidance_scale=5.0, **BASE),  # same strength, another mask: one batch
        dict(prompt="a bird", image=pic, strength=0.75, seed=3, **BASE),  # img2img: its own composition
        dict(prompt="a bird", image=pic, strength=0.5, seed=4, **BASE),  # another schedule: its own batch
        dict(prompt="a bird", seed=5, **BASE),  # text-to-image
    ]


@pytest.fixture(scope="module")
def dev(flux_folders):
    return DiffGenerator.from_pretrained(flux_folders["dev"], dtype="float32", progress=False)


def test_batch_equals_solo(dev):
    counts = assert_batch_equals_solo(dev, _requests())
    # 4 steps at strength 0.75 -> 3 steps; the two inpaints share them, each other request runs its own
    assert counts["solo"] == [3, 3, 3, 2, 4] and counts["batch"] == 3 + 3 + 2 + 4


def test_concurrent_equals_solo(dev):
    assert_concurrent_equals_solo(dev, _requests()[:4])


def test_lora_per_request_on_inpaint(flux_folders, tmp_path):
    from diffusers import FluxInpaintPipeline, FluxPipeline, FluxTransformer2DModel

    path = save_peft_lora(FluxPipeline, FluxTransformer2DModel, flux_folders["dev"], tmp_path / "a",
                          ["to_q", "to_k", "to_v", "proj_out"], rank=4, alpha=8, seed=1)
    gen = DiffGenerator.from_pretrained(flux_folders["dev"], dtype="float32", progress=False)
    gen.load_lora(path.parent, name="a")
    kw = dict(prompt="a yellow square", image=random_picture(32, 32, 5), strength=0.8, height=32, width=32,
              num_inference_steps=3, guidance_scale=3.5, max_sequence_length=32)
    mask = box_mask(32, 32)
    ref = diffusers_with_loras(FluxInpaintPipeline.from_pretrained(flux_folders["dev"], torch_dtype=torch.float32),
                               {"a": (path, 0.7)})
    want = ref(mask_image=mask, generator=torch.Generator("cpu").manual_seed(2), output_type="np", **kw).images
    assert_parity(gen.generate(mask=mask, seed=2, output_type="np", loras={"a": 0.7}, **kw).output, want)
    with_lora = dict(mask=mask, seed=2, output_type="np", loras={"a": 0.7}, **kw)
    assert_batch_equals_solo(gen, [with_lora, {**with_lora, "loras": None, "seed": 3}])  # rows with and without

