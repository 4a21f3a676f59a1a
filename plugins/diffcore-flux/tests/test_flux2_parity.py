"""Acceptance: diffcore's FLUX.2 pipelines equal diffusers' on the same tiny perturbed weights (fp32)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore import DiffGenerator
from diffcore.testing.weights import assert_parity

_CLASSES = {"dev": "Flux2Pipeline", "klein": "Flux2KleinPipeline", "klein-base": "Flux2KleinPipeline",
            "klein-kv": "Flux2KleinKVPipeline"}


def _diffusers(folder, kind):
    import diffusers

    return getattr(diffusers, _CLASSES[kind]).from_pretrained(folder, torch_dtype=torch.float32)


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


CASES = [
    # kind, prompt, size (h, w) or None, reference sizes (w, h), extra
    # the whole templated prompt (system message included) fits in 256 tokens of the tiny tokenizer
    ("dev", "a red circle on a blue background", (64, 48), [], {"guidance_scale": 3.5, "max_sequence_length": 256}),
    ("dev", ["a cat", "two yellow squares"], (32, 64), [], {"guidance_scale": 4.0}),
    ("dev", "make it red", None, [(80, 64)], {"guidance_scale": 2.5}),
    ("dev", "put the cat in the room", (48, 64), [(64, 96), (100, 70), (72, 72)], {"guidance_scale": 4.0}),
    ("klein", ["a dog", "a red cat"], (48, 32), [], {}),
    ("klein", "make it blue", None, [(96, 64)], {}),
    ("klein-base", "a red circle", (32, 48), [], {"guidance_scale": 3.0}),
    ("klein-base", ["a cat", "a dog"], (32, 32), [(64, 64)], {"guidance_scale": 2.0}),
    ("klein-kv", "add a hat", (48, 48), [(64, 80), (96, 64)], {}),
    ("klein-kv", "a cat", (32, 48), [], {}),
]


@pytest.mark.parametrize("kind,prompt,size,refs,extra", CASES)
def test_flux2_parity(flux2_folders, kind, prompt, size, refs, extra):
    folder = flux2_folders[kind]
    images = [_image(w, h, i) for i, (w, h) in enumerate(refs)]
    kw = dict(prompt=prompt, num_inference_steps=3, **{"max_sequence_length": 32, **extra})
    if size:
        kw.update(height=size[0], width=size[1])
    if images:
        kw["image"] = images
    ref = _diffusers(folder, kind)(generator=torch.Generator("cpu").manual_seed(7), output_type="np", **kw).images
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    ours = gen.generate(seed=7, output_type="np", **kw).output
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert_parity(ours, ref)


@pytest.mark.parametrize("kind,refs", [("dev", []), ("klein", []), ("klein-kv", [(64, 64)])])
def test_latent_output_is_what_diffusers_returns(flux2_folders, kind, refs):
    """output_type="latent": [dev] gives the packed, normalised tokens (B, h*w, 128); klein and klein-KV the
    de-normalised, unpatchified VAE latents (B, 32, H/8, W/8), as diffusers' pipelines do."""
    kw = dict(prompt="a red cat", height=32, width=48, num_inference_steps=2, max_sequence_length=32)
    if refs:
        kw["image"] = [_image(w, h, i) for i, (w, h) in enumerate(refs)]
    ref = _diffusers(flux2_folders[kind], kind)(generator=torch.Generator("cpu").manual_seed(3), output_type="latent",
                                                  **kw).images
    gen = DiffGenerator.from_pretrained(flux2_folders[kind], dtype="float32", progress=False)
    ours = gen.generate(seed=3, output_type="latent", **kw).latents
    c = gen.components["transformer"].config["in_channels"]  # 4x the VAE's latent channels (2x2 patches)
    assert tuple(ours.shape) == tuple(ref.shape) == ((1, 2 * 3, c) if kind == "dev" else (1, c // 4, 4, 6))
    assert float((ours - ref).abs().max()) <= 2e-3


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_ten_references_match_diffusers_and_eleven_are_refused(flux2_folders, kind):
    """diffusers' Flux2Pipeline / Flux2KleinPipeline check each reference (side >= 64, aspect <= 8) but not their
    count; diffcore takes up to 10 (``max_images``: BFL's multi-reference figure for FLUX.2) on every variant. At
    the limit both engines agree; one more is a SamplingParamError naming ``image``, and the generator still works."""
    from diffcore.errors import SamplingParamError

    images = [_image(64, 64, i) for i in range(10)]
    kw = dict(prompt="combine them", height=32, width=32, num_inference_steps=2, max_sequence_length=32)
    ref = _diffusers(flux2_folders[kind], kind)(generator=torch.Generator("cpu").manual_seed(4), output_type="np",
                                                  image=images, **kw).images
    gen = DiffGenerator.from_pretrained(flux2_folders[kind], dtype="float32", progress=False)
    assert gen.sampling_params_cls.max_images == 10
    assert_parity(gen.generate(seed=4, output_type="np", image=images, **kw).output, ref)
    with pytest.raises(SamplingParamError, match="at most 10") as e:
        gen.generate(seed=4, output_type="np", image=images + [_image(64, 64, 10)], **kw)
    assert e.value.param == "image"
    assert gen.generate(seed=4, output_type="np", **kw).output.shape == (1, 32, 32, 3)
