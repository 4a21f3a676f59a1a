"""Bad LTX-2 input is refused before any model call, with a typed error naming the parameter."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from diffcore.errors import SamplingParamError

from ltx_testlib import SMALL

PROMPT = "a red cat"


@pytest.mark.parametrize("kwargs,param", [
    (dict(num_frames=10), "num_frames"),  # frames must be 8k + 1
    (dict(frame_rate=0), "frame_rate"),
    (dict(frame_rate=-24.0), "frame_rate"),
    (dict(image="x.png"), "image"),  # the text-to-video pipeline takes no image
    (dict(spatio_temporal_guidance_blocks=[5]), "spatio_temporal_guidance_blocks"),  # 2 blocks here
    (dict(max_sequence_length=30), "max_sequence_length"),  # not a multiple of the connectors' 8 registers
    (dict(sigmas=[0.5, 0.9]), "sigmas"),  # not decreasing
    (dict(sigmas=[1.0, 0.5, 0.2]), "sigmas"),  # 3 sigmas for 2 steps
    (dict(guidance_rescale=-0.5), "guidance_rescale"),
    # issue 30 rechecked on LTX-2: absurd finite values (audio sized for ~1e8 latent frames; a black picture)
    (dict(frame_rate=1e-6), "frame_rate"),
    (dict(frame_rate=1e308), "frame_rate"),
    (dict(stg_scale=1e308), "stg_scale"),
    (dict(audio_guidance_scale=1e308), "audio_guidance_scale"),
])
def test_refused_with_the_parameter_named(generator, kwargs, param):
    with pytest.raises(SamplingParamError) as info:
        generator.check({"prompt": PROMPT, **{**SMALL, **kwargs}})
    assert info.value.param == param


def test_image_to_video_needs_one_image_and_a_valid_crf(i2v_generator):
    for kwargs, param in ((dict(), "image"), (dict(image=[np.zeros((8, 8, 3))] * 2), "image"),
                          (dict(image=np.zeros((8, 8, 3)), image_crf=60), "image_crf")):
        with pytest.raises(SamplingParamError) as info:
            i2v_generator.check({"prompt": PROMPT, **SMALL, **kwargs})
        assert info.value.param == param


def test_sizes_are_rounded_down_to_multiples_of_32_with_a_warning(generator, caplog):
    with caplog.at_level(logging.WARNING):
        result = generator.generate(prompt=PROMPT, seed=0, output_type="np", **{**SMALL, "height": 70, "width": 100})
    assert result.output.shape[2:4] == (64, 96)
    assert "height=70 is not a multiple of 32" in caplog.text


def test_image_recompression_is_lossy_but_close():
    from diffcore_ltx.image import recompress

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (8, 10, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 64 x 80
    out = recompress(smooth, 33)
    assert out.shape == smooth.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - smooth.astype(int))
    assert 0 < diff.mean() < 20  # H.264 at CRF 33 changes the image, but only a little
    assert recompress(smooth[:63, :79], 33).shape == (62, 78, 3)  # odd sizes cropped to even
