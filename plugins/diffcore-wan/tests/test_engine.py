"""Wan on the engine: concurrent generate() calls on one generator equal their solo runs bit for bit."""
from __future__ import annotations

import pytest
from wan_testlib import random_image

from diffcore import DiffGenerator
from diffcore.testing.concurrency import assert_concurrent_equals_solo

REQUESTS = [dict(prompt="a red circle", seed=1, height=32, width=32, num_frames=5, num_inference_steps=2,
                 output_type="np"),
            dict(prompt=["a blue square", "a cat"], seed=2, height=32, width=48, num_frames=1, num_inference_steps=3,
                 guidance_scale=1.0, output_type="np"),
            dict(prompt="a dog", negative_prompt="blurry", guidance_scale=4.0, seed=3, height=48, width=32,
                 num_frames=5, num_inference_steps=2, output_type="latent")]


@pytest.mark.parametrize("kind,cache", [("t2v21", None), ("t2v22", None), ("t2v21", "fbcache")])
def test_concurrent_generate_equals_solo(wan_folders, kind, cache):
    gen = DiffGenerator.from_pretrained(wan_folders[kind], dtype="float32", progress=False, cache=cache,
                                        cache_threshold=0.3)
    assert_concurrent_equals_solo(gen, REQUESTS)


def test_concurrent_image_to_video_equals_solo(wan_folders):
    gen = DiffGenerator.from_pretrained(wan_folders["i2v21"], dtype="float32", progress=False)
    requests = [{**r, "image": random_image(40, 24, seed=i)} for i, r in enumerate(REQUESTS)]
    assert_concurrent_equals_solo(gen, requests)
