"""LTX-2 on the engine: threads == solo, generate_batch == solo, int8 weights, offload."""
from __future__ import annotations

import numpy as np
from PIL import Image

from diffcore.testing.concurrency import assert_batch_equals_solo, assert_concurrent_equals_solo

from ltx_testlib import SMALL

COMMON = {**SMALL, "output_type": "np"}


def _requests():
    return [dict(prompt="a red cat plays a drum", seed=1, **COMMON),
            dict(prompt=["a blue square hums", "rain on a roof"], negative_prompt="noise", seed=2, guidance_scale=2.0,
                 audio_guidance_scale=4.0, stg_scale=0.5, **COMMON),
            dict(prompt="a dog barks", seed=3, modality_scale=2.0, guidance_rescale=0.0, **COMMON)]


def test_concurrent_generate_equals_solo(generator):
    assert_concurrent_equals_solo(generator, _requests())


def test_generate_batch_equals_solo(generator):
    calls = assert_batch_equals_solo(generator, _requests())
    # per step: [negative, positive] in one call, STG, isolation; the batch makes them once for all its rows
    assert calls["batch"] == calls["solo"][0] == 3 * SMALL["num_inference_steps"]


def test_image_to_video_batch_equals_solo(i2v_generator):
    rng = np.random.default_rng(0)
    requests = [{**r, "image": Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8)), "image_crf": 0}
                for r in _requests()]
    assert_batch_equals_solo(i2v_generator, requests)


def test_int8_weights_stay_close(load, t2v_checkpoint, generator):
    want = generator.generate(prompt="a red cat", seed=0, **COMMON)
    got = load(t2v_checkpoint, quantization="int8_weight_only").generate(prompt="a red cat", seed=0, **COMMON)
    assert np.abs(got.output - want.output).mean() < 0.02 and np.abs(got.audios - want.audios).mean() < 0.05
    assert np.abs(got.output - want.output).max() > 0  # the quantized weights really ran


def test_offload_equals_no_offload(load, t2v_checkpoint, generator):
    want = generator.generate(prompt="a red cat", seed=0, **COMMON)
    for mode in ("model", "layers"):
        gen = load(t2v_checkpoint, offload=mode)
        got = gen.generate(prompt="a red cat", seed=0, **COMMON)
        np.testing.assert_allclose(got.output, want.output, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.audios, want.audios, atol=1e-5, rtol=0)
        if mode == "model":  # every component came in while it ran, the audio ones included
            assert {"text_encoder", "connectors", "transformer", "vae", "audio_vae", "vocoder"} <= set(
                gen.pipeline.offload_hooks["model"].moves)


def test_unsupported_engine_features_are_refused(load, t2v_checkpoint):
    import pytest

    from diffcore.errors import ConfigError

    with pytest.raises(ConfigError, match="step caches"):
        load(t2v_checkpoint, cache="fbcache")
