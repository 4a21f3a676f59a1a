"""FLUX on the engine: concurrent generate() calls on one generator equal their solo runs bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffcore import DiffGenerator
from diffcore.testing.concurrency import assert_concurrent_equals_solo


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 56, 3), dtype=np.uint8))


def _requests(variant: str) -> list[dict]:
    reqs = [dict(prompt="a red circle", seed=1, height=32, width=32, num_inference_steps=2, output_type="np"),
            dict(prompt=["a blue square", "a cat"], seed=2, height=32, width=48, num_inference_steps=3,
                 guidance_scale=2.0, output_type="np"),
            dict(prompt="a dog", negative_prompt="blurry", true_cfg_scale=3.0, seed=3, height=48, width=32,
                 num_inference_steps=1, output_type="np")]
    if variant == "kontext":
        for i, r in enumerate(reqs):
            r["image"] = _image(i)
    return reqs


@pytest.mark.parametrize("variant", ["dev", "schnell", "kontext"])
def test_concurrent_generate_equals_solo(flux_folders, variant):
    gen = DiffGenerator.from_pretrained(flux_folders[variant], dtype="float32", progress=False)
    if variant == "kontext":
        gen.config.auto_resize = False  # test speed: encode the input at its own size, not at ~1 MP
    assert_concurrent_equals_solo(gen, _requests(variant))


def test_concurrent_generate_with_a_step_cache_equals_solo(flux_folders):
    gen = DiffGenerator.from_pretrained(flux_folders["dev"], dtype="float32", progress=False, cache="fbcache",
                                        cache_threshold=1.0)
    requests = [{**r, "num_inference_steps": 5} for r in _requests("dev")]
    solo = assert_concurrent_equals_solo(gen, requests)
    assert sum(r.cache_stats["skipped"] for r in solo) > 0  # the cache really skipped calls
