"""Z-Image on the engine: threads and batches equal solo runs, the block-cache protocol, torchao quantization
and offload hold for the family (tiny checkpoints from ``diffcore_zimage.testing``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcore.testing.concurrency import assert_batch_equals_solo, assert_concurrent_equals_solo
from diffcore.testing.joining import assert_join_equals_solo
from diffcore.testing.step_cache import generate_with_step_cache
from diffcore.testing.weights import psnr

COMMON = dict(height=32, width=48, num_inference_steps=3, output_type="np")


def _requests():
    return [dict(prompt="a red circle", seed=1, **COMMON),
            dict(prompt=["a blue square", "two yellow squares on a white background"], seed=2, guidance_scale=3.0,
                 cfg_truncation=0.2, **COMMON),
            dict(prompt="a dog", negative_prompt="blurry", guidance_scale=4.0, cfg_normalization=True, seed=3,
                 **{**COMMON, "height": 48, "width": 32})]


@pytest.mark.parametrize("which", ["turbo", "base"])
def test_concurrent_generate_equals_solo(load, folders, which):
    assert_concurrent_equals_solo(load(folders[which]), _requests())


def test_generate_batch_equals_solo_with_mixed_guidance(base):
    """CFG rows with different scales, truncation and renormalisation and guidance-free rows (Turbo-style requests on
    the base model: guidance_scale 0) share one batch; each result equals its solo run."""
    requests = [dict(prompt="a red circle", seed=1, guidance_scale=2.0, **COMMON),
                dict(prompt=["a blue square on a green background", "a cat"], seed=2, guidance_scale=4.5,
                     cfg_truncation=0.2, **COMMON),
                dict(prompt="a dog", seed=3, guidance_scale=3.5, cfg_normalization=1.1, negative_prompt="ugly", **COMMON),
                dict(prompt="a fox", seed=4, guidance_scale=0.0, **COMMON),
                dict(prompt="a bird", seed=5, guidance_scale=0.0, **COMMON)]
    calls = assert_batch_equals_solo(base, requests)
    # solo: 3 cond + 3 uncond calls (truncation 0.2 ends guidance after 2 of the 3 steps: model times 0, 0.1, 0.29)
    assert calls["solo"] == [6, 5, 6, 3, 3]
    assert calls["batch"] == 3 + 3  # one cond call per step for all 6 rows, one uncond call for the guided rows


def test_turbo_batch_equals_solo(generator):
    requests = [dict(prompt="a red circle", seed=1, **COMMON), dict(prompt=["a cat", "a dog"], seed=2, **COMMON),
                dict(prompt="two yellow squares on a white background", seed=3, **COMMON)]
    calls = assert_batch_equals_solo(generator, requests)
    assert calls["solo"] == [3, 3, 3] and calls["batch"] == 3


PARAMS = dict(prompt="a red circle", negative_prompt="blurry", guidance_scale=4.0, height=32, width=32,
              num_inference_steps=8, seed=3, output_type="latent")


@pytest.fixture(scope="module")
def uncached(folders):
    from diffcore import DiffGenerator

    return DiffGenerator.from_pretrained(folders["base"], dtype="float32", progress=False).generate(**PARAMS).latents.numpy()


@pytest.mark.parametrize("policy", ["fbcache", "teacache"])
def test_step_cache_threshold_zero_equals_uncached(folders, uncached, policy):
    out, stats, body_runs = generate_with_step_cache(folders["base"], policy, 0.0, PARAMS, lambda m: m.layers[-1])
    assert stats == {"computed": 16, "skipped": 0} and body_runs == 16  # CFG: two calls per step
    assert np.array_equal(out, uncached)


@pytest.mark.parametrize("policy", ["fbcache", "teacache"])
def test_step_cache_skips_calls_and_stays_close(folders, uncached, policy):
    out, stats, body_runs = generate_with_step_cache(folders["base"], policy, 1.0, PARAMS, lambda m: m.layers[-1])
    assert stats["computed"] + stats["skipped"] == 16 and stats["skipped"] >= 4, stats
    assert body_runs == stats["computed"]  # skipped calls really did not run the remaining layers
    quality = psnr(out, uncached, data_range=float(uncached.max() - uncached.min()))
    assert 20 <= quality < 100, f"{policy}: PSNR {quality:.1f} dB with {stats}"


KW = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=0, output_type="np",
          guidance_scale=3.0)


@pytest.mark.parametrize("scheme", ["int8_weight_only", "fp8_weight_only"])
def test_quantized_transformer_tracks_full_precision(load, folders, scheme):
    pytest.importorskip("torchao")
    reference = load(folders["base"]).generate(**KW).output
    gen = load(folders["base"], quantization=scheme)
    transformer = gen.components["transformer"]
    kinds = {type(m.weight).__name__ for m in transformer.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds - {"Parameter"}, kinds  # the linear weights are torchao tensors now
    quality = psnr(gen.generate(**KW).output, reference)
    assert 25 < quality < 120, quality  # changed by the quantization, but close


@pytest.mark.parametrize("mode", ["model", "layers"])
def test_offload_equals_resident(load, folders, mode):
    reference = load(folders["base"]).generate(**KW).output
    gen = load(folders["base"], offload=mode)
    np.testing.assert_allclose(gen.generate(**KW).output, reference, atol=1e-6, rtol=0)
    if mode == "model":
        assert gen.pipeline.offload_hooks["model"].moves == ["text_encoder", "transformer", "vae"]
    else:
        model = gen.components["transformer"]  # blocks in the order they run: refiners, then the main layers
        assert gen.pipeline.offload_hooks["transformer"].blocks == [*model.noise_refiner, *model.context_refiner,
                                                                    *model.layers]


def test_mixed_batch_runs_the_unconditional_call_for_guided_rows_only(base):
    sizes = []
    hook = base.components["transformer"].register_forward_pre_hook(
        lambda m, a, kw: sizes.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    try:
        base.generate_batch([dict(prompt="a cat", seed=1, guidance_scale=0.0, **COMMON),
                             dict(prompt="a dog", seed=2, guidance_scale=3.0, **COMMON),
                             dict(prompt=["a fox", "a bird"], seed=3, guidance_scale=0.0, **COMMON)])
    finally:
        hook.remove()
    assert sizes == [4, 1] * 3  # every step: all 4 rows conditional, the one guided row unconditional


def test_requests_joining_a_running_batch_equal_solo(base):
    """CFG requests that arrive mid-run join at their own step 0; guidance truncation is decided per request at its
    own step (the unconditional call covers only the rows still guided): each equals solo."""
    first = dict(prompt="a red circle", seed=1, guidance_scale=2.0, **{**COMMON, "num_inference_steps": 4})
    joiners = [dict(prompt=["a blue square on a green background", "a cat"], seed=2, guidance_scale=4.5,
                    cfg_truncation=0.2, **COMMON),
               dict(prompt="a dog", seed=3, guidance_scale=3.5, cfg_normalization=1.1, negative_prompt="ugly", **COMMON)]
    counted = assert_join_equals_solo(base, first, joiners, at=0)
    # step 0 alone; then 3 steps of 4 rows: the truncated request's rows leave the uncond call after 2 of them
    assert counted["rows"] == [1, 1] + [4, 4] * 2 + [4, 2]
