"""Wan on the engine: concurrent generate() calls on one generator equal their solo runs bit for bit."""
from __future__ import annotations

import pytest
from wan_testlib import random_image

from diffcore import DiffGenerator
from diffcore.testing.concurrency import assert_batch_equals_solo, assert_concurrent_equals_solo
from diffcore.testing.joining import assert_join_equals_solo

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


def _batchable() -> list[dict]:
    common = dict(height=32, width=48, num_frames=5, num_inference_steps=3, output_type="np")
    return [dict(prompt="a red circle", seed=1, guidance_scale=5.0, **common),
            dict(prompt=["a blue square", "a cat running"], negative_prompt="blurry", seed=2, guidance_scale=2.0,
                 **common),
            dict(prompt="a dog", seed=3, guidance_scale=3.0, **common)]


@pytest.mark.parametrize("kind", ["t2v21", "t2v22", "i2v21"])
def test_generate_batch_equals_solo(wan_folders, kind):
    gen = DiffGenerator.from_pretrained(wan_folders[kind], dtype="float32", progress=False)
    requests = _batchable()
    if kind == "t2v22":
        requests[1]["guidance_scale_2"] = 1.5  # the low-noise expert's scale differs per row too
    if kind.startswith("i2v"):
        requests = [{**r, "image": random_image(40, 24, seed=i)} for i, r in enumerate(requests)]
    calls = assert_batch_equals_solo(gen, requests)
    assert calls["batch"] == calls["solo"][0] == 6  # 3 steps x (cond + uncond), every row in each call


@pytest.mark.parametrize("kind", ["t2v21", "i2v21"])
def test_requests_joining_a_running_batch_equal_solo(wan_folders, kind):
    """Requests that arrive mid-run join at their own step 0 (other step counts, guidance, seeds): each equals
    solo. (Two-expert Wan 2.2 chooses its expert per step: its requests run in start-only batches.)"""
    gen = DiffGenerator.from_pretrained(wan_folders[kind], dtype="float32", progress=False)
    first, *joiners = _batchable()
    first["num_inference_steps"], joiners[0]["num_inference_steps"] = 4, 2
    if kind.startswith("i2v"):
        first, *joiners = [{**r, "image": random_image(40, 24, seed=i)} for i, r in enumerate([first, *joiners])]
    counted = assert_join_equals_solo(gen, first, joiners, at=0)
    assert counted["rows"] == [1] * 2 + [4] * 4 + [2] * 2  # (cond, uncond) a step; the 2-step one left
