"""Qwen-Image on the engine: concurrent generate() calls on one generator equal their solo runs bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffcore import DiffGenerator
from diffcore.testing.concurrency import assert_batch_equals_solo, assert_concurrent_equals_solo
from diffcore.testing.joining import assert_join_equals_solo

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


def _batchable() -> list[dict]:
    """Compatible requests: one size and step count; prompts of different lengths, seeds and CFG scales."""
    common = dict(height=32, width=64, num_inference_steps=2, output_type="np")
    return [dict(prompt="a red circle", seed=1, true_cfg_scale=4.0, **common),
            dict(prompt=["a blue square on a green background with a tree", "a cat"], seed=2, true_cfg_scale=2.5,
                 negative_prompt=["blurry", "dark and ugly"], **common),
            dict(prompt="a dog", seed=3, true_cfg_scale=6.0, negative_prompt="low quality", **common)]


def test_generate_batch_equals_solo(qwen_folders):
    gen = DiffGenerator.from_pretrained(qwen_folders["t2i"], dtype="float32", progress=False)
    calls = assert_batch_equals_solo(gen, _batchable())
    assert calls["batch"] == calls["solo"][0] == 4  # 2 steps x (cond + uncond), every row in each call


def test_generate_batch_edit_equals_solo(qwen_folders):
    gen = DiffGenerator.from_pretrained(qwen_folders["edit"], dtype="float32", progress=False)
    gen.config.vae_area = 64 * 64  # test speed: encode the input at ~64x64, not at ~1 MP
    requests = [{**r, "image": _image(i)} for i, r in enumerate(_batchable())]  # same aspect: one geometry
    requests.append({**requests[0], "image": _image(7).resize((30, 60)), "seed": 11})  # another grid: alone
    calls = assert_batch_equals_solo(gen, requests)
    assert calls["batch"] == 4 + 4


def test_requests_joining_a_running_batch_equal_solo(qwen_folders):
    """True-CFG requests (negative prompts of other lengths) that arrive mid-run join at their own step 0: each
    equals solo."""
    gen = DiffGenerator.from_pretrained(qwen_folders["t2i"], dtype="float32", progress=False)
    first, *joiners = _batchable()
    first["num_inference_steps"], joiners[1]["num_inference_steps"] = 4, 3
    counted = assert_join_equals_solo(gen, first, joiners, at=1)
    # (cond, uncond) a step: 2 steps alone, 2 with all 4 rows, the 3-step one's last alone
    assert counted["rows"] == [1] * 4 + [4] * 4 + [1] * 2
