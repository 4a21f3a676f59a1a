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



def test_padding_mask_crop_batches_by_picture_size(dev):
    """Crop requests on pictures of one size share a batch (each its own box and paste-back); another picture size,
    or no crop, runs as its own batch (the results have other sizes); every result equals its solo run."""
    big, other = random_picture(96, 80, 1), random_picture(64, 64, 2)
    reqs = [dict(prompt="a cat", image=big, mask=box_mask(96, 80, (0.5, 0.4, 0.75, 0.6)), padding_mask_crop=4,
                 strength=0.75, seed=1, **BASE),
            dict(prompt=["a dog", "a hat"], image=random_picture(96, 80, 3), mask=box_mask(96, 80, (0, 0, 0.3, 0.5)),
                 padding_mask_crop=0, strength=0.75, seed=2, **BASE),
            dict(prompt="a bird", image=other, mask=box_mask(64, 64), padding_mask_crop=2, strength=0.75, seed=3, **BASE),
            dict(prompt="a bird", image=big, mask=box_mask(96, 80), strength=0.75, seed=4, **BASE)]
    # the pasted-back pictures are 8-bit (as diffusers'): a value may round one step apart; the latents may not
    counts = assert_batch_equals_solo(dev, reqs, output_max_diff=1 / 255 + 1e-6)
    assert counts["solo"] == [3, 3, 3, 3] and counts["batch"] == 3 + 3 + 3


@pytest.mark.parametrize("kwargs,match", [
    (dict(padding_mask_crop=-1), "padding_mask_crop.*>= 0"),
    (dict(padding_mask_crop=2.5), "padding_mask_crop.*whole number"),
    (dict(padding_mask_crop=4, mask=box_mask(48, 40)), "mask must have the picture's size"),
    (dict(padding_mask_crop=4, strength=None, mask=None, image=None), "padding_mask_crop"),
])
def test_bad_padding_mask_crop(dev, kwargs, match):
    from diffcore.errors import SamplingParamError

    kw = {**dict(prompt="x", image=random_picture(96, 80), mask=box_mask(96, 80), **BASE), **kwargs}
    with pytest.raises(SamplingParamError, match=match):
        dev.generate(**{k: v for k, v in kw.items() if v is not None})
