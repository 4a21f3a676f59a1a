"""FLUX.2 on the engine: threads == solo, generate_batch == solo (requests with different numbers of reference
images grouped by their reference geometry), step caches, and model offload (the text encoder is not resident
on the device while the transformer denoises)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffcore import DiffGenerator
from diffcore.testing.concurrency import assert_batch_equals_solo, assert_concurrent_equals_solo
from diffcore.testing.joining import assert_join_equals_solo

SMALL = dict(num_inference_steps=2, max_sequence_length=16, output_type="np")


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _gen(flux2_folders, kind, **kw):
    return DiffGenerator.from_pretrained(flux2_folders[kind], dtype="float32", progress=False, **kw)


@pytest.mark.parametrize("kind", ["dev", "klein-base", "klein-kv"])
def test_concurrent_generate_equals_solo(flux2_folders, kind):
    reqs = [dict(prompt="a red circle", seed=1, height=32, width=32, **SMALL),
            dict(prompt=["a cat", "a dog"], seed=2, height=32, width=48, image=[_image(64, 64, 1)], **SMALL),
            dict(prompt="a hat", seed=3, height=48, width=32, image=[_image(64, 80, 2), _image(96, 64, 3)],
                 guidance_scale=3.0, **SMALL)]
    assert_concurrent_equals_solo(_gen(flux2_folders, kind), reqs)


@pytest.mark.parametrize("kind", ["dev", "klein-kv"])
def test_generate_batch_groups_by_reference_geometry(flux2_folders, kind):
    """Rows batch only with rows of the same reference grids: none, one 64x64, two (64x64, 96x64)."""
    common = dict(height=32, width=32, **SMALL)
    a, b, c = _image(64, 64, 1), _image(64, 64, 2), _image(96, 64, 3)
    requests = [dict(prompt="a cat", seed=1, **common), dict(prompt="a red dog", seed=2, guidance_scale=2.0, **common),
                dict(prompt="a hat", seed=3, image=[a], **common), dict(prompt="a cup", seed=4, image=[b], **common),
                dict(prompt="two cats", seed=5, image=[a, c], **common)]
    calls = assert_batch_equals_solo(_gen(flux2_folders, kind), requests)
    assert calls["solo"] == [2] * 5 and calls["batch"] == 3 * 2  # three groups, one call per step each


def test_step_cache_skips_and_threads_equal_solo(flux2_folders):
    gen = _gen(flux2_folders, "dev", cache="fbcache", cache_threshold=1.0)
    reqs = [dict(prompt="a red circle", seed=1, height=32, width=32, image=[_image(64, 64, 1)],
                 **{**SMALL, "num_inference_steps": 5}),
            dict(prompt="a cat", seed=2, height=32, width=48, **{**SMALL, "num_inference_steps": 5}),
            dict(prompt="a dog", seed=3, height=32, width=32, **{**SMALL, "num_inference_steps": 4})]
    solo = assert_concurrent_equals_solo(gen, reqs)
    assert sum(r.cache_stats["skipped"] for r in solo) > 0


def test_kv_step_cache_runs_references_once(flux2_folders):
    """klein-KV under a step cache: the first step extracts, cached steps never see the reference tokens."""
    # a threshold no step's change reaches: every step after the first is served from the cache (at 1.0 whether
    # a tiny random model's first block changes by more than 100% between steps depends on its tokenizer)
    gen = _gen(flux2_folders, "klein-kv", cache="fbcache", cache_threshold=1e6)
    kw = dict(prompt="a hat", seed=3, height=32, width=32, image=[_image(64, 64, 1)], **{**SMALL, "num_inference_steps": 4})
    plain = _gen(flux2_folders, "klein-kv").generate(**kw)
    cached = gen.generate(**kw)
    assert cached.cache_stats["skipped"] > 0 and cached.output.shape == plain.output.shape


def test_offloaded_text_encoder_is_not_resident_while_denoising(flux2_folders):
    gen = _gen(flux2_folders, "klein", offload="model")
    ref = _gen(flux2_folders, "klein").generate(prompt="a cat", seed=0, height=32, width=32, **SMALL).output
    hooks = gen.pipeline.offload_hooks["model"]
    te = gen.components["text_encoder"]
    resting = {n: p.data_ptr() for n, p in te.named_parameters()}
    seen = []

    def spy(module, args):  # after the offload hook: the transformer is the active (device) component
        seen.append((hooks.active.module is module,
                     all(p.data_ptr() == resting[n] for n, p in te.named_parameters())))

    gen.components["transformer"].register_forward_pre_hook(spy)
    out = gen.generate(prompt="a cat", seed=0, height=32, width=32, **SMALL).output
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)
    assert seen and all(active and te_resting for active, te_resting in seen), seen
    assert hooks.moves == ["text_encoder", "transformer", "vae"]


def test_teacache_reads_the_probe_and_a_zero_threshold_changes_nothing(flux2_folders):
    """TeaCache watches cache_probe (the first block's modulated image input): threshold 0 recomputes every step
    (equal to no cache), a large one skips."""
    kw = dict(prompt="a hat", seed=3, height=32, width=32, image=[_image(64, 64, 1)], **{**SMALL, "num_inference_steps": 5})
    plain = _gen(flux2_folders, "dev").generate(**kw).output
    exact = _gen(flux2_folders, "dev", cache="teacache", cache_threshold=0.0).generate(**kw)
    np.testing.assert_allclose(exact.output, plain, atol=1e-6)
    assert exact.cache_stats["skipped"] == 0
    assert _gen(flux2_folders, "dev", cache="teacache", cache_threshold=10.0).generate(**kw).cache_stats["skipped"] > 0


@pytest.mark.parametrize("kind", ["dev", "klein-kv"])
def test_requests_joining_a_running_batch_equal_solo(flux2_folders, kind):
    """Requests that arrive mid-run join at their own step 0 (other step counts, guidance, seeds): each equals solo."""
    common = dict(height=32, width=32, max_sequence_length=16, output_type="np")
    first = dict(prompt="a cat", seed=1, num_inference_steps=4, **common)
    joiners = [dict(prompt="a red dog", seed=2, guidance_scale=2.0, num_inference_steps=2, **common),
               dict(prompt=["a hat", "a cup on a table"], seed=3, num_inference_steps=3, **common)]
    counted = assert_join_equals_solo(_gen(flux2_folders, kind), first, joiners, at=0)
    assert counted["rows"] == [1, 4, 4, 3]  # 1 alone, 2 with all 4 rows, 1 without the 2-step one


@pytest.mark.parametrize("preset", ["gpu-48gb", "gpu-24gb"])
def test_memory_presets_stream_the_text_encoder_and_keep_it_off_while_denoising(flux2_folders, preset):
    """The 48 / 24 GB presets stream the text encoder's decoder layers (a 24B Mistral fits neither GPU whole):
    while the transformer denoises no text-encoder layer is installed on the device and every layer weight is its
    resting CPU copy. gpu-24gb streams the transformer too (output equal to resident weights); gpu-48gb quantizes
    the transformer to int8 (close to it)."""
    from diffcore.offload import LayerOffload

    from diffcore.testing.weights import psnr

    ref = _gen(flux2_folders, "dev").generate(prompt="a cat", seed=0, height=32, width=32, **SMALL).output
    gen = _gen(flux2_folders, "dev", memory_preset=preset)
    hooks = gen.pipeline.offload_hooks
    te_layers: LayerOffload = hooks["text_encoder"]
    te = gen.components["text_encoder"]
    assert te_layers.blocks == list(te.model.language_model.layers)
    assert isinstance(hooks.get("transformer"), LayerOffload) == (preset == "gpu-24gb")  # else model-offloaded
    resting = [[p.data_ptr() for p in b.parameters()] for b in te_layers.blocks]
    seen = []

    def spy(module, args):
        seen.append(not any(w.installed for w in te_layers.weights)
                    and [[p.data_ptr() for p in b.parameters()] for b in te_layers.blocks] == resting)

    gen.components["transformer"].register_forward_pre_hook(spy)
    out = gen.generate(prompt="a cat", seed=0, height=32, width=32, **SMALL).output
    assert seen and all(seen), seen
    assert te_layers.loads >= 31  # layers 0..29 ran (hidden state 30 is the last read), each copied in
    if preset == "gpu-24gb":
        np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)
    else:
        assert 25 < psnr(out, ref) < 120
