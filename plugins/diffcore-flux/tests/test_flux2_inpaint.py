"""Acceptance: inpainting on a loaded FLUX.2 [klein] checkpoint equals diffusers' Flux2KleinInpaintPipeline on the
same tiny perturbed weights (fp32), with no reload; batched requests equal solo ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcore import DiffGenerator
from diffcore.testing.concurrency import assert_batch_equals_solo, assert_concurrent_equals_solo
from diffcore.testing.images import box_mask, random_picture
from diffcore.testing.weights import assert_parity


@pytest.fixture(scope="module")
def gens(flux2_folders):
    return {k: DiffGenerator.from_pretrained(flux2_folders[k], dtype="float32", progress=False)
            for k in ("klein", "klein-base")}


def _diffusers(folder, **kw):
    from diffusers import Flux2KleinInpaintPipeline

    pipe = Flux2KleinInpaintPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    return pipe(generator=torch.Generator("cpu").manual_seed(kw.pop("seed")), output_type="np", **kw).images


CASES = [
    # kind, prompt, picture (w, h), strength, reference (w, h) or None, extra
    ("klein", "a yellow square", (64, 96), 0.8, None, {}),
    ("klein", ["a cat", "a dog"], (80, 64), 1.0, None, {}),
    ("klein-base", "a red ball", (72, 70), 0.6, None, {"guidance_scale": 3.0}),  # floored to 64x64: resized
    ("klein-base", "replace it", (64, 64), 0.9, (80, 72), {"guidance_scale": 2.0}),
]


@pytest.mark.parametrize("kind,prompt,size,strength,reference,extra", CASES)
def test_klein_inpaint_parity(flux2_folders, gens, kind, prompt, size, strength, reference, extra):
    (w, h), mask = size, box_mask(*size)
    picture = random_picture(w, h, seed=3)
    kw = dict(prompt=prompt, strength=strength, num_inference_steps=4, max_sequence_length=32, seed=4, **extra)
    ref_kw = {"image_reference": random_picture(*reference, seed=5)} if reference else {}
    ref = _diffusers(flux2_folders[kind], image=picture, mask_image=mask, **ref_kw, **kw)
    images = [picture] + ([ref_kw["image_reference"]] if reference else [])
    ours = gens[kind].generate(image=images if reference else picture, mask=mask, output_type="np", **kw).output
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert_parity(ours, ref)


def test_one_load_serves_inpainting(gens):
    """The composition runs on the loaded components (no second copy of the weights), with the picture's latents
    fed as reference tokens after its re-noised start."""
    pipe = gens["klein"].pipeline
    comp = pipe.compositions["inpaint"]
    assert comp.components is pipe.components and comp.stage("denoising").transformers[0] is pipe.components["transformer"]
    names = [s.name for s in comp.stages]
    assert names.index("init_latents") < names.index("reference_latents") < names.index("conditioning")
    assert "image_vae_encoding" not in names  # the picture is encoded once


def test_batch_and_threads_equal_solo(gens):
    """Inpaint requests with other masks, prompts and guidance share transformer calls (same strength and
    picture size) and equal their solo runs; another strength gets its own schedule; threads == solo."""
    common = dict(num_inference_steps=4, max_sequence_length=32, output_type="np")
    reqs = [dict(prompt="a cat", image=random_picture(64, 64, 1), mask=box_mask(64, 64), strength=0.75, seed=1, **common),
            dict(prompt=["a dog", "a hat"], image=random_picture(64, 64, 2), mask=box_mask(64, 64, (0, 0, 0.5, 1)),
                 strength=0.75, seed=2, guidance_scale=2.5, **common),
            dict(prompt="a bird", image=random_picture(64, 64, 3), mask=box_mask(64, 64), strength=0.5, seed=3, **common)]
    counts = assert_batch_equals_solo(gens["klein-base"], reqs)
    # CFG: 2 calls a step; 4 steps at 0.75 -> 3 steps, at 0.5 -> 2; the first two requests share theirs
    assert counts["solo"] == [6, 6, 4] and counts["batch"] == 6 + 4
    assert_concurrent_equals_solo(gens["klein"], [{k: v for k, v in r.items() if k != "guidance_scale"} for r in reqs])


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=32, width=32), "picture's own size"),
    (dict(image=[]), "at least 1 input image"),
    (dict(strength=1.5), r"\(0, 1\]"),
    (dict(image=random_picture(96, 64)), "mask is 64x48 but the image is 96x64"),
    (dict(image=random_picture(40, 64)), "need both sides >= 64 px"),
])
def test_bad_input_is_a_typed_error(gens, kwargs, match):
    from diffcore.errors import SamplingParamError

    kw = {**dict(prompt="x", image=random_picture(64, 64), mask=box_mask(64, 48), num_inference_steps=2), **kwargs}
    kw["mask"] = box_mask(64, 48) if "image" in kwargs else box_mask(64, 64)
    with pytest.raises(SamplingParamError, match=match):
        gens["klein"].generate(**kw)


def test_lora_per_request_on_klein_inpaint(flux2_folders, tmp_path):
    """A PEFT adapter chosen per request on a klein inpaint equals diffusers' Flux2KleinInpaintPipeline with it set;
    a row with it and a row without share a batch, each equal to its solo run."""
    from diffusers import Flux2KleinInpaintPipeline, Flux2KleinPipeline, Flux2Transformer2DModel

    from diffcore.testing.lora import diffusers_with_loras, save_peft_lora
    from diffcore.testing.weights import psnr

    folder = flux2_folders["klein"]
    path = save_peft_lora(Flux2KleinPipeline, Flux2Transformer2DModel, folder, tmp_path / "a",
                          ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out", "to_qkv_mlp_proj", "linear_in",
                           "linear_out", "x_embedder", "context_embedder"], rank=4, alpha=16, seed=2)
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    gen.load_lora(path.parent, name="a")
    picture, mask = random_picture(64, 64, seed=8), box_mask(64, 64)
    kw = dict(prompt="a red ball", strength=0.9, num_inference_steps=3, max_sequence_length=32)
    pipe = diffusers_with_loras(Flux2KleinInpaintPipeline.from_pretrained(folder, torch_dtype=torch.float32),
                                {"a": (path, 0.7)})
    want = pipe(image=picture, mask_image=mask, generator=torch.Generator("cpu").manual_seed(6), output_type="np",
                **kw).images
    with_lora = dict(image=picture, mask=mask, seed=6, output_type="np", loras={"a": 0.7}, **kw)
    got = gen.generate(**with_lora).output
    assert psnr(gen.generate(**{**with_lora, "loras": None}).output, want) < 40  # the adapter matters here
    assert_parity(got, want)
    assert_batch_equals_solo(gen, [with_lora, {**with_lora, "loras": None, "seed": 7}])
