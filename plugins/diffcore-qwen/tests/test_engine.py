"""Qwen-Image on the engine: concurrent generate() calls on one generator equal their solo runs bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffcore import DiffGenerator
from diffcore.testing.concurrency import assert_concurrent_equals_solo

REQUESTS = [dict(prompt="a red circle", seed=1, height=32, width=32, num_inference_steps=2, output_type="np"),
            dict(prompt=["a blue square on a green background", "a cat"], seed=2, height=32, width=64,
                 num_inference_steps=3, true_cfg_scale=2.0, output_type="np"),
            dict(prompt="a dog", negative_prompt="blurry", true_cfg_scale=1.0, seed=3, height=64, width=32,
                 num_inference_steps=2, output_type="np")]


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 60, 3), dtype=np.uint8))


@pytest.mark.parametrize("cache", [None, "fbcache"])
def test_concurrent_generate_equals_solo(qwen_folders, cache):
    gen = DiffGenerator.from_pretrained(qwen_folders["t2i"], dtype="float32", progress=False, cache=cache,
                                        cache_threshold=0.3)
    assert_concurrent_equals_solo(gen, REQUESTS)


def test_concurrent_edit_equals_solo(qwen_folders):
    gen = DiffGenerator.from_pretrained(qwen_folders["edit"], dtype="float32", progress=False)
    gen.config.vae_area = 64 * 64  # test speed: encode the input at ~64x64, not at ~1 MP
    requests = [{**r, "image": _image(i)} for i, r in enumerate(REQUESTS)]
    assert_concurrent_equals_solo(gen, requests)
