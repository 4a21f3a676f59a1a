"""Acceptance: image-to-image and inpainting on a loaded FluxPipeline checkpoint equal diffusers'
FluxImg2ImgPipeline / FluxInpaintPipeline on the same tiny perturbed weights (fp32), with no reload."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore import DiffGenerator
from diffcore.testing.images import box_mask, random_picture
from diffcore.testing.weights import assert_parity


@pytest.fixture(scope="module")
def dev(flux_folders):
    return DiffGenerator.from_pretrained(flux_folders["dev"], dtype="float32", progress=False)


@pytest.mark.parametrize("strength,prompt,size", [(0.6, "a red cat", (48, 64)), (0.9, ["a cat", "a dog"], (64, 32))])
def test_flux_img2img_parity(flux_folders, dev, strength, prompt, size):
    from diffusers import FluxImg2ImgPipeline

    h, w = size
    image = random_picture(50, 40)
    kw = dict(prompt=prompt, image=image, strength=strength, height=h, width=w, num_inference_steps=4,
              guidance_scale=3.5, max_sequence_length=32)
    ref = FluxImg2ImgPipeline.from_pretrained(flux_folders["dev"], torch_dtype=torch.float32)(
        generator=torch.Generator("cpu").manual_seed(5), output_type="np", **kw).images
    assert_parity(dev.generate(seed=5, output_type="np", **kw).output, ref)


@pytest.mark.parametrize("strength,extra", [(0.7, {}), (1.0, {"negative_prompt": "blurry", "true_cfg_scale": 2.0})])
def test_flux_inpaint_parity(flux_folders, dev, strength, extra):
    from diffusers import FluxInpaintPipeline

    image, mask = random_picture(64, 48, seed=1), box_mask(64, 48)
    kw = dict(prompt="a yellow square", image=image, strength=strength, height=48, width=64, num_inference_steps=3,
              guidance_scale=3.5, max_sequence_length=32, **extra)
    ref = FluxInpaintPipeline.from_pretrained(flux_folders["dev"], torch_dtype=torch.float32)(
        mask_image=mask, generator=torch.Generator("cpu").manual_seed(2), output_type="np", **kw).images
    ours = dev.generate(mask=mask, seed=2, output_type="np", **kw).output
    assert_parity(ours, ref)


def test_all_white_mask_is_img2img(dev):
    """An all-white mask repaints everything: the same picture as image-to-image (documented in docs/api.md)."""
    kw = dict(prompt="a cat", image=random_picture(32, 32), strength=0.8, height=32, width=32, num_inference_steps=3,
              seed=1, output_type="np")
    white = Image.new("L", (32, 32), 255)
    inpainted, img2img = dev.generate(mask=white, **kw).output, dev.generate(**kw).output
    np.testing.assert_array_equal(inpainted, img2img)
    assert np.abs(dev.generate(mask=box_mask(32, 32), **kw).output - img2img).max() > 1e-2  # a real mask changes it


def test_one_load_serves_every_task(dev):
    """The compositions share the loaded components (no second copy of any weight)."""
    pipe = dev.pipeline
    assert set(pipe.compositions) == {"img2img", "inpaint"}
    for comp in pipe.compositions.values():
        assert comp.components is pipe.components and comp.loras is pipe.loras
        assert comp.stage("denoising").transformers[0] is pipe.components["transformer"]
    assert "init_latents" in [s.name for s in pipe.compositions["img2img"].stages]
    assert "inpaint_blend" in [s.name for s in pipe.compositions["inpaint"].stages]


def test_plugins_command_lists_the_compositions(capsys):
    import argparse
    import json

    from diffcore.cli import _plugins

    _plugins(argparse.Namespace(json=True))
    flux = next(p for p in json.loads(capsys.readouterr().out)["plugins"] if p["name"] == "flux")
    assert {(c["name"], c["pipeline"], c["task"]) for c in flux["compositions"]} == {
        ("FluxImg2ImgPipeline", "FluxPipeline", "img2img"), ("FluxInpaintPipeline", "FluxPipeline", "inpaint"),
        ("Flux2KleinInpaintPipeline", "Flux2KleinPipeline", "inpaint")}
    _plugins(argparse.Namespace(json=False))
    assert "task      inpaint on FluxPipeline: FluxInpaintPipeline" in capsys.readouterr().out


def test_a_task_the_model_lacks_is_a_typed_error(flux_folders):
    from diffcore.errors import SamplingParamError

    kontext = DiffGenerator.from_pretrained(flux_folders["kontext"], dtype="float32", progress=False)
    with pytest.raises(SamplingParamError, match="FluxKontextPipeline has no inpaint composition"):
        kontext.generate(prompt="x", image=random_picture(32, 32), mask=box_mask(32, 32), num_inference_steps=1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(strength=0.5), "at least 1 input image"),
    (dict(image="PIC", strength=0.0), r"strength.*\(0, 1\]"),
    (dict(image="PIC", strength=1.5), r"\(0, 1\]"),
    (dict(image="PIC", mask=[None]), "one mask"),
])
def test_bad_task_parameters(dev, kwargs, match):
    from diffcore.errors import SamplingParamError

    kwargs = {k: (random_picture(32, 32) if v == "PIC" else v) for k, v in kwargs.items()}
    with pytest.raises(SamplingParamError, match=match):
        dev.generate(prompt="x", height=32, width=32, num_inference_steps=2, **kwargs)


@pytest.mark.parametrize("pad,box", [(4, (0.5, 0.4, 0.75, 0.6)), (0, (0.0, 0.5, 0.3, 1.0))])
def test_flux_inpaint_padding_mask_crop_parity(flux_folders, dev, pad, box, monkeypatch):
    """The box around the mask painted at 32x48, pasted back into the 96x80 picture: diffusers' result."""
    from diffusers import FluxInpaintPipeline

    from diffcore.testing.images import assert_mask_crop_parity

    image, mask = random_picture(96, 80, seed=4), box_mask(96, 80, box)
    kw = dict(prompt=["a yellow square", "a cat"], image=image, strength=0.8, height=48, width=32,
              num_inference_steps=3, guidance_scale=3.5, max_sequence_length=32, padding_mask_crop=pad)
    pipe = FluxInpaintPipeline.from_pretrained(flux_folders["dev"], torch_dtype=torch.float32)
    assert_mask_crop_parity(monkeypatch, dev, pipe, dict(kw, mask=mask, seed=3),
                            dict(kw, mask_image=mask, generator=torch.Generator("cpu").manual_seed(3)), (96, 80))
