"""Work reused across denoising steps: the per-request ContextCache (cross-attention K/V of the text) and
the step caches (fbcache, teacache) through the block-cache protocol, on the tiny t2v checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcore import DiffGenerator
from diffcore.testing.step_cache import generate_with_step_cache
from diffcore.testing.weights import perturb_, psnr
from diffcore_wan.transformer import ContextCache, WanTransformer3DModel

STEPS = 8
PARAMS = dict(prompt="a red circle", negative_prompt="blurry", guidance_scale=5.0, num_frames=5, height=32, width=32,
              num_inference_steps=STEPS, seed=3, output_type="latent")
TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=24, freq_dim=16, ffn_dim=32, num_layers=2)


def _model(seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return perturb_(WanTransformer3DModel.from_config(TINY).eval(), seed)


def test_context_cache_projects_the_context_once_per_model_and_changes_nothing():
    experts = [_model(0), _model(1)]  # like Wan 2.2 A14B: two models share one request's kwargs
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, 7, TINY["text_dim"], generator=g)
    steps = [(torch.randn(1, 4, 3, 6, 10, generator=g), torch.tensor([t])) for t in (900.0, 500.0, 100.0)]
    text_calls = []
    for m in experts:
        m.condition_embedder.text_embedder.register_forward_hook(lambda *a: text_calls.append(1))
    cache = ContextCache()
    with torch.inference_mode():
        for m in experts:
            for x, t in steps:
                kw = dict(hidden_states=x, timestep=t, encoder_hidden_states=context)
                assert torch.equal(m(**kw, context_cache=cache), m(**kw))
    assert len(text_calls) == 2 * len(steps) + 2  # uncached: every call; cached: once per expert


@pytest.fixture(scope="module")
def folder(wan_folders):
    return wan_folders["t2v21"]


@pytest.fixture(scope="module")
def uncached(folder):
    return DiffGenerator.from_pretrained(folder, dtype="float32", progress=False).generate(**PARAMS).latents.numpy()


def _cached(folder, policy: str, threshold: float):
    return generate_with_step_cache(folder, policy, threshold, PARAMS, lambda m: m.blocks[-1])


@pytest.mark.parametrize("policy", ["fbcache", "teacache"])
def test_threshold_zero_equals_uncached_exactly(folder, uncached, policy):
    out, stats, body_runs = _cached(folder, policy, 0.0)
    assert stats == {"computed": 2 * STEPS, "skipped": 0}  # CFG: two calls per step
    assert body_runs == 2 * STEPS
    assert np.array_equal(out, uncached)


@pytest.mark.parametrize("policy", ["fbcache", "teacache"])
def test_large_threshold_skips_calls_and_stays_close(folder, uncached, policy):
    out, stats, body_runs = _cached(folder, policy, 1.0)
    assert stats["computed"] + stats["skipped"] == 2 * STEPS
    assert stats["skipped"] >= STEPS, stats  # 12-14 of 16 here
    assert body_runs == stats["computed"]  # skipped calls really did not run the remaining blocks
    quality = psnr(out, uncached, data_range=float(uncached.max() - uncached.min()))
    assert 30 <= quality < 100, f"{policy}: PSNR {quality:.1f} dB with {stats}"  # ~50 dB here
