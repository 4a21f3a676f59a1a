"""Acceptance: diffcore's Wan pipelines equal diffusers' on the same tiny perturbed weights (fp32).

Every case compares all output frames (B, F, H, W, 3): max |diff| <= 2e-3 and PSNR >= 45 dB. Each
model runs at two frame counts (5 and 9) and non-square sizes; the two-expert cases check that both
experts actually ran.
"""
from __future__ import annotations

import logging

import pytest

from diffcore_wan.configs import DEFAULT_NEGATIVE_PROMPT, I2V_NEGATIVE_PROMPT
from wan_testlib import compare, ours, random_image, run_both

T2V_CASES = [
    # kind, prompt, frames, height, width, kwargs for both, kwargs for diffusers only
    ("t2v21", "a red  cat &amp;amp; a dog\n", 5, 32, 48, {"negative_prompt": "blurry", "guidance_scale": 5.0}, {}),
    # our defaults: guidance 5.0 and the official (Chinese) negative prompt
    ("t2v21", ["a cat", "two yellow squares on a white background"], 9, 48, 32, {},
     {"guidance_scale": 5.0, "negative_prompt": DEFAULT_NEGATIVE_PROMPT}),
    ("t2v21", "a cat", 5, 48, 32, {"guidance_scale": 1.0}, {}),  # no CFG
    ("t2v22", "a red circle", 5, 32, 48, {"guidance_scale": 4.0, "guidance_scale_2": 2.0, "negative_prompt": "dark"}, {}),
    ("t2v22", ["a dog", "a blue square"], 9, 48, 32, {"guidance_scale": 3.0, "guidance_scale_2": 5.0},
     {"negative_prompt": DEFAULT_NEGATIVE_PROMPT}),
    ("ti2v", "a cat", 5, 64, 96, {"guidance_scale": 4.0, "negative_prompt": "blurry"}, {}),
    ("ti2v", ["a dog", "a red cat"], 9, 96, 64, {"guidance_scale": 5.0, "negative_prompt": ["dark", "blurry"]}, {}),
]


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("kind,prompt,frames,height,width,kwargs,ref_only", T2V_CASES)
def test_text_to_video_parity(wan_folders, kind, prompt, frames, height, width, kwargs, ref_only):
    folder = wan_folders[kind]
    comps = ours(folder).components
    calls = {name: _count_calls(comps[name]) for name in ("transformer", "transformer_2") if comps.get(name)}
    try:
        got, ref = run_both(folder, kind, prompt=prompt, num_frames=frames, height=height, width=width,
                            num_inference_steps=3, ref_kwargs=ref_only, **kwargs)
    finally:
        for _, handle in calls.values():
            handle.remove()
    assert got.shape[1:] == (frames, height, width, 3)
    compare(got, ref)
    if kind == "t2v22":  # the folder's flow shift 3 -> t = 999, 857, 666: steps 2 and 3 are below 875
        assert all(len(c) > 0 for c, _ in calls.values()) and len(calls) == 2


def test_flow_shift_is_a_per_request_choice(wan_folders):
    """The folder's scheduler_config.json decides (the cases above compare against diffusers with the
    folder as saved); generate(flow_shift=12.0) is diffusers with from_config(..., flow_shift=12.0), for
    that request only."""
    folder = wan_folders["t2v22"]
    kw = dict(prompt="a red circle", num_frames=5, height=32, width=48, num_inference_steps=3, guidance_scale=4.0,
              negative_prompt="dark")
    got, ref = run_both(folder, "t2v22", flow_shift=12.0, **kw)
    compare(got, ref)
    plain = ours(folder).generate(**kw, seed=7, output_type="np").output
    assert abs(plain - got).max() > 0.01  # the shift really changed the schedule
    assert ours(folder).components["scheduler"].config["flow_shift"] == 3.0  # as saved, not replaced


I2V_CASES = [
    # kind, prompt, frames, height, width, image (w, h), kwargs
    ("i2v21", "a cat walks", 5, 32, 48, (56, 40), {"negative_prompt": "blurry"}),
    ("i2v21", ["a dog", "a red cat"], 9, 48, 32, (64, 64), {"guidance_scale": 4.0}),
    ("i2v22", "a cat walks", 5, 48, 32, (40, 56), {"negative_prompt": "blurry", "guidance_scale": 3.5}),
    ("i2v22", ["a dog", "a red cat"], 9, 32, 48, (30, 30), {"guidance_scale": 4.0, "guidance_scale_2": 2.0,
                                                          "negative_prompt": ["dark", "blurry"]}),
    ("ti2v", "a cat walks", 5, 64, 96, (100, 70), {"negative_prompt": "blurry"}),
    ("ti2v", ["a dog", "a red cat"], 9, 96, 64, (64, 64), {"guidance_scale": 3.0, "negative_prompt": "dark"}),
]


@pytest.mark.parametrize("kind,prompt,frames,height,width,image_size,kwargs", I2V_CASES)
def test_image_to_video_parity(wan_folders, kind, prompt, frames, height, width, image_size, kwargs):
    """Wan 2.1 I2V (CLIP + 36-ch-style concat), Wan 2.2 I2V-A14B (two experts), TI2V first frame."""
    image = random_image(*image_size, seed=frames)
    # diffusers defaults to "" as negative prompt; ours to the official one (I2V-14B: camera-shake prefix)
    default_negative = I2V_NEGATIVE_PROMPT if kind == "i2v21" else DEFAULT_NEGATIVE_PROMPT
    ref_only = {} if "negative_prompt" in kwargs else {"negative_prompt": default_negative}
    got, ref = run_both(wan_folders[kind], kind, image=image, prompt=prompt, num_frames=frames, height=height,
                        width=width, num_inference_steps=3, max_sequence_length=512, ref_kwargs=ref_only, **kwargs)
    assert got.shape[1:] == (frames, height, width, 3)
    compare(got, ref)


def test_ti2v_image_changes_the_video(wan_folders):
    """The first-frame image really conditions TI2V (guards against a silently ignored image)."""
    gen = ours(wan_folders["ti2v"])
    kw = dict(prompt="a cat", num_frames=5, height=64, width=96, num_inference_steps=2, seed=1, output_type="np")
    plain = gen.generate(**kw).output
    with_image = gen.generate(image=random_image(96, 64), **kw).output
    assert abs(plain - with_image).max() > 0.05


def test_frames_and_size_are_rounded_like_diffusers(wan_folders, caplog):
    """TI2V (multiples of 32): num_frames 7 -> 5 (4k+1) and 80x112 -> 64x96, with warnings, as diffusers does."""
    with caplog.at_level(logging.WARNING):
        got, ref = run_both(wan_folders["ti2v"], "ti2v", prompt="a cat", num_frames=7, height=80, width=112,
                            num_inference_steps=2, negative_prompt="dark")
    assert got.shape == (1, 5, 64, 96, 3)
    compare(got, ref)
    text = caplog.text
    assert "num_frames=7" in text and "height=80" in text and "width=112" in text
