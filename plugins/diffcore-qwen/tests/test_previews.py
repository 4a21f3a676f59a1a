"""Qwen-Image previews (generate(on_preview=...), the server's partial images): its packed video-VAE latents
unpack, pool and decode on the smaller grid; the result is unchanged. Qwen-Image-Layered cannot preview."""
from __future__ import annotations

import pytest

from diffcore import DiffGenerator
from diffcore.errors import SamplingParamError
from diffcore.testing.previews import assert_pooled_previews


def test_qwen_image_previews(qwen_folders):
    gen = DiffGenerator.from_pretrained(qwen_folders["t2i"], dtype="float32", progress=False)
    assert_pooled_previews(gen, prompt="a red circle", seed=1, height=64, width=128, num_inference_steps=4,
                           true_cfg_scale=2.0, negative_prompt="blurry")


def test_layered_cannot_preview(qwen_layered_folder):
    gen = DiffGenerator.from_pretrained(qwen_layered_folder, dtype="float32", progress=False)
    assert not gen.can_preview
    with pytest.raises(SamplingParamError) as info:
        gen.generate(prompt="x", on_preview=print)
    assert info.value.param == "on_preview"
