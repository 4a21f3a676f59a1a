"""Step caches (diffcore.cache): exact when they never skip, skipping when allowed, close when skipping;
and the other engine speed option, EngineArgs(compile=True).

Runs a tiny FLUX-architecture checkpoint written with diffcore's own classes (no diffusers needed).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch


from diffcore import DiffGenerator
from diffcore.cache import FirstBlockCache, TeaCache, supports_step_cache
from diffcore.testing.weights import psnr

STEPS = 12
PARAMS = dict(prompt="a red circle on a blue background", height=32, width=32, num_inference_steps=STEPS,
              guidance_scale=3.5, max_sequence_length=16, seed=3, output_type="latent")


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    from diffcore_flux.testing import write_tiny_flux

    return write_tiny_flux(tmp_path_factory.mktemp("cache") / "flux", layers=(2, 2), dynamic_shift=False, vae_seed=0)


@pytest.fixture(scope="module")
def uncached(flux_folder):
    gen = DiffGenerator.from_pretrained(flux_folder, dtype="float32", progress=False)
    return gen.generate(**PARAMS).latents.numpy()


def _psnr(out, ref) -> float:
    """PSNR of final latents (they respond to every transformer call; decoded pixels blur that)."""
    return psnr(out, ref, data_range=float(ref.max() - ref.min()))


def _cached(folder, policy: str, threshold: float, **params):
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, cache=policy, cache_threshold=threshold)
    model = gen.components["transformer"]
    body_runs = []  # the last block runs only when the cache did not skip the call
    handle = model.single_transformer_blocks[-1].register_forward_hook(lambda *a: body_runs.append(1))
    req = gen.pipeline.forward(gen.new_request(gen.sampling_params_cls.from_user(**{**PARAMS, **params})))
    handle.remove()
    return req.latents.numpy(), dict(req.step_cache.stats), len(body_runs), req.step_cache


def test_policies_are_registered_and_the_model_opts_in(flux_folder):
    from diffcore.plugins import get_plugin_manager

    registry = get_plugin_manager().registry
    assert registry.get("cache_policies", "fbcache") is FirstBlockCache
    assert registry.get("cache_policies", "teacache") is TeaCache
    assert registry.origin("cache_policies", "fbcache").plugin == "diffcore"  # the built-in plugin
    gen = DiffGenerator.from_pretrained(flux_folder, dtype="float32", progress=False, cache="fbcache")
    assert gen.pipeline.cache_policy is FirstBlockCache and isinstance(gen.pipeline.new_step_cache(), FirstBlockCache)
    assert supports_step_cache(gen.components["transformer"])


@pytest.mark.parametrize("policy", ["fbcache", "teacache", "fbcache_taylor"])
def test_threshold_zero_equals_uncached_exactly(flux_folder, uncached, policy):
    out, stats, body_runs, _ = _cached(flux_folder, policy, 0.0)
    assert stats == {"computed": STEPS, "skipped": 0}
    assert body_runs == STEPS
    assert np.array_equal(out, uncached)


@pytest.mark.parametrize("policy,threshold", [("fbcache", 0.3), ("teacache", 0.3), ("fbcache_taylor", 0.3)])
def test_skips_calls_and_stays_close(flux_folder, uncached, policy, threshold):
    out, stats, body_runs, _ = _cached(flux_folder, policy, threshold)
    assert stats["computed"] + stats["skipped"] == STEPS
    assert stats["skipped"] >= 4, stats
    assert body_runs == stats["computed"]  # skipped calls really did not run the remaining blocks
    quality = _psnr(out, uncached)
    assert 30 <= quality < 100, f"{policy}@{threshold}: PSNR {quality:.1f} dB with {stats}"


def test_higher_threshold_skips_more_and_drifts_more(flux_folder, uncached):
    runs = [_cached(flux_folder, "fbcache", t) for t in (0.2, 0.3, 1.0)]
    skipped = [r[1]["skipped"] for r in runs]
    quality = [_psnr(r[0], uncached) for r in runs]
    assert skipped == sorted(skipped) and skipped[-1] > skipped[0], skipped
    assert quality == sorted(quality, reverse=True) and quality[0] > quality[-1], quality


def test_cfg_branches_have_separate_caches(flux_folder):
    out, stats, body_runs, cache = _cached(flux_folder, "fbcache", 0.3, negative_prompt="blurry", true_cfg_scale=2.0)
    assert stats["computed"] + stats["skipped"] == 2 * STEPS
    assert {branch for _, branch in cache._slots} == {"cond", "uncond"}
    assert body_runs == stats["computed"] and stats["skipped"] > 0


def test_model_without_protocol_runs_uncached():
    class Plain(torch.nn.Module):
        def forward(self, hidden_states, timestep, scale=1.0):
            return hidden_states * scale + timestep

    cache = FirstBlockCache(threshold=10.0)
    cache.reset(3)
    x, t = torch.ones(2, 3), torch.tensor(0.5)
    for step in range(3):
        assert torch.equal(cache(Plain(), step, "cond", hidden_states=x, timestep=t, scale=2.0), x * 2 + t)
    assert cache.stats == {"computed": 3, "skipped": 0}
    with pytest.raises(ValueError):
        TeaCache(threshold=-1)


def test_teacache_polynomial_rescales_the_signal():
    cache = TeaCache(threshold=0.1, coefficients=[2.0, 0.5])  # 2x + 0.5
    assert cache._rescale(0.25, model=None) == pytest.approx(1.0)
    assert TeaCache(threshold=0.1)._rescale(0.25, model=None) == 0.25


def test_compile_option_compiles_the_denoiser_lazily(flux_folder):
    """EngineArgs(compile=True) wraps the transformer's forward in torch.compile (compiled on first call)."""
    gen = DiffGenerator.from_pretrained(flux_folder, dtype="float32", progress=False, compile=True)
    assert gen.components["transformer"]._compiled_call_impl is not None
    plain = DiffGenerator.from_pretrained(flux_folder, dtype="float32", progress=False)
    assert plain.components["transformer"]._compiled_call_impl is None


def test_taylor_variant_extrapolates_and_warms_up(flux_folder, uncached):
    plain, plain_stats, _, _ = _cached(flux_folder, "fbcache", 0.3)
    taylor, stats, body_runs, _ = _cached(flux_folder, "fbcache_taylor", 0.3)
    assert stats["skipped"] >= 1 and body_runs == stats["computed"]
    assert stats["computed"] >= 2  # the warm-up steps always run
    assert not np.array_equal(taylor, plain)  # skipped calls used the extrapolated residual, not the last one
    print(f"fbcache {plain_stats} {_psnr(plain, uncached):.1f} dB; fbcache_taylor {stats} {_psnr(taylor, uncached):.1f} dB")
