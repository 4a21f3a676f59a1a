"""FLUX on the engine: concurrent generate() calls on one generator equal their solo runs bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffcore import DiffGenerator
from diffcore.testing.concurrency import assert_batch_equals_solo, assert_concurrent_equals_solo
from diffcore.testing.joining import assert_join_equals_solo


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


def _generator(flux_folders, variant: str) -> DiffGenerator:
    gen = DiffGenerator.from_pretrained(flux_folders[variant], dtype="float32", progress=False)
    if variant == "kontext":
        gen.config.auto_resize = False  # test speed: encode the input at its own size, not at ~1 MP
    return gen


@pytest.mark.parametrize("variant", ["dev", "schnell", "kontext"])
def test_concurrent_generate_equals_solo(flux_folders, variant):
    assert_concurrent_equals_solo(_generator(flux_folders, variant), _requests(variant))


def test_concurrent_generate_with_a_step_cache_equals_solo(flux_folders):
    gen = DiffGenerator.from_pretrained(flux_folders["dev"], dtype="float32", progress=False, cache="fbcache",
                                        cache_threshold=1.0)
    requests = [{**r, "num_inference_steps": 5} for r in _requests("dev")]
    solo = assert_concurrent_equals_solo(gen, requests)
    assert sum(r.cache_stats["skipped"] for r in solo) > 0  # the cache really skipped calls


def _batchable(variant: str) -> list[dict]:
    """Compatible requests (one size, one step count) with different prompts, seeds and guidance."""
    reqs = [dict(prompt="a red circle", seed=1, guidance_scale=2.0),
            dict(prompt=["a blue square on a green background", "a cat"], seed=2, guidance_scale=4.5),
            dict(prompt="a dog", seed=3, guidance_scale=3.5, max_sequence_length=32)]
    for i, r in enumerate(reqs):
        r.update(height=32, width=48, num_inference_steps=2, output_type="np")
        if variant == "kontext":
            r["image"] = _image(0)  # the same condition geometry (the batch key includes it)
    reqs[2]["max_sequence_length"] = reqs[0].get("max_sequence_length", 512 if variant != "schnell" else 256)
    return reqs


@pytest.mark.parametrize("variant", ["dev", "schnell", "kontext"])
def test_generate_batch_equals_solo(flux_folders, variant):
    gen = _generator(flux_folders, variant)
    requests = _batchable(variant)
    if variant == "kontext":  # an input of another aspect: its own condition geometry, its own group
        requests.append({**requests[0], "image": _image(1).resize((40, 40)), "seed": 8})
    calls = assert_batch_equals_solo(gen, requests)
    assert calls["solo"][0] == 2  # every row of a group in one transformer call per step
    assert calls["batch"] == (4 if variant == "kontext" else 2)


def test_generate_batch_groups_cfg_and_sizes(flux_folders):
    """True-CFG rows (different negative prompts and scales) batch together; other sizes run as their own group."""
    gen = DiffGenerator.from_pretrained(flux_folders["dev"], dtype="float32", progress=False)
    common = dict(height=32, width=32, num_inference_steps=2, output_type="np")
    requests = [dict(prompt="a red circle", negative_prompt="blurry", true_cfg_scale=2.0, seed=1, **common),
                dict(prompt="a cat", negative_prompt="ugly", true_cfg_scale=4.0, seed=2, **common),
                dict(prompt="a cat", seed=2, **common),
                dict(prompt="a dog", seed=4, **{**common, "height": 48})]
    calls = assert_batch_equals_solo(gen, requests)
    assert calls["solo"] == [4, 4, 2, 2] and calls["batch"] == 4 + 2 + 2


@pytest.mark.parametrize("variant", ["dev", "kontext"])
def test_requests_joining_a_running_batch_equal_solo(flux_folders, variant):
    """Requests that arrive mid-run join at their own step 0 (other step counts, guidance, seeds): each equals solo."""
    first, *joiners = _batchable(variant)
    first["num_inference_steps"], joiners[1]["num_inference_steps"] = 4, 3
    counted = assert_join_equals_solo(_generator(flux_folders, variant), first, joiners, at=1)
    assert counted["rows"] == [1, 1] + [4, 4] + [1]  # 2 alone, 2 with all 4 rows, the 3-step one's last alone
