"""Step caches on Qwen-Image: the transformer implements the block-cache protocol, so
``cache="fbcache"`` / ``"teacache"`` reproduce the uncached run at threshold 0 and skip calls when allowed."""
from __future__ import annotations

import numpy as np
import pytest

from diffcore import DiffGenerator
from diffcore.testing.step_cache import generate_with_step_cache

STEPS = 4
PARAMS = dict(prompt="a red circle on a blue background", negative_prompt="blurry", true_cfg_scale=4.0,
              height=32, width=32, num_inference_steps=STEPS, seed=5, output_type="latent")


@pytest.fixture(scope="module")
def folder(qwen_folders):
    return qwen_folders["t2i"]


@pytest.fixture(scope="module")
def uncached(folder):
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    return gen.generate(**PARAMS).latents.numpy()


def _cached(folder, policy: str, threshold: float):
    return generate_with_step_cache(folder, policy, threshold, PARAMS, lambda m: m.transformer_blocks[-1])


@pytest.mark.parametrize("policy", ["fbcache", "teacache"])
def test_threshold_zero_equals_uncached_exactly(folder, uncached, policy):
    out, stats, body_runs = _cached(folder, policy, 0.0)
    assert stats == {"computed": 2 * STEPS, "skipped": 0}  # true CFG: two calls per step
    assert body_runs == 2 * STEPS
    assert np.array_equal(out, uncached)


def test_fbcache_skips_at_a_large_threshold(folder, uncached):
    out, stats, body_runs = _cached(folder, "fbcache", 1e6)
    assert stats == {"computed": 2, "skipped": 2 * (STEPS - 1)}  # only each CFG branch's first call runs fully
    assert body_runs == 2
    assert np.isfinite(out).all() and not np.array_equal(out, uncached)
