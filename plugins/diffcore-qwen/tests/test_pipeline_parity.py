"""Acceptance: diffcore's Qwen-Image pipelines equal diffusers' on the same tiny perturbed weights (fp32).

Every run uses >= 2 steps: with 1 step diffusers' shift_terminal stretch divides by zero (NaN).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore import DiffGenerator
from diffcore.testing.weights import max_abs_diff, psnr

SEED = 7


def _compare(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.isfinite(ours).all() and np.isfinite(ref).all()
    diff, quality = max_abs_diff(ours, ref), psnr(ours, ref)
    print(f"max|diff|={diff:.2e} psnr={quality:.1f} dB")
    assert diff <= 2e-3 and quality >= 45, f"max|diff|={diff:.2e} psnr={quality:.1f}"


def _image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def generators(qwen_folders):
    return {v: DiffGenerator.from_pretrained(f, dtype="float32", progress=False) for v, f in qwen_folders.items()}


@pytest.fixture(scope="module")
def references(qwen_folders, qwen_reference):
    return {v: qwen_reference(f, v) for v, f in qwen_folders.items()}


T2I_CASES = {
    "single_no_cfg": dict(prompt="a red circle on a blue background", height=64, width=32, true_cfg_scale=1.0),
    "batch_lengths_no_cfg": dict(prompt=["a cat", "two yellow squares on a white background"], height=32, width=64,
                                 true_cfg_scale=1.0),
    "batch_lengths_true_cfg": dict(prompt=["a cat", "two yellow squares on a white background"], height=64, width=64,
                                   negative_prompt=["blurry", "a dark photo of a dog"], true_cfg_scale=4.0),
    "truncated_true_cfg": dict(prompt="two yellow squares on a white background", height=32, width=32,
                               negative_prompt="blurry", true_cfg_scale=2.5, max_sequence_length=4),
}


@pytest.mark.parametrize("case", list(T2I_CASES))
def test_qwen_image_parity(generators, references, case):
    kw = T2I_CASES[case]
    ref = references["t2i"](**kw, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(SEED),
                            output_type="np").images
    ours = generators["t2i"].generate(**kw, num_inference_steps=3, seed=SEED, output_type="np").output
    _compare(ours, ref)


def test_qwen_image_default_negative_prompt_is_a_space(generators, references):
    """Defaults: true_cfg_scale 4.0 with negative prompt " " (the model card's), which diffusers needs spelled out."""
    gen = generators["t2i"]
    kw = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2)
    ref = references["t2i"](**kw, negative_prompt=" ", true_cfg_scale=4.0,
                            generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images
    ours = gen.generate(**kw, seed=SEED, output_type="np").output
    _compare(ours, ref)
    no_cfg = gen.generate(**kw, true_cfg_scale=1.0, seed=SEED, output_type="np").output
    assert max_abs_diff(ours, no_cfg) > 1e-2  # CFG really ran


def test_qwen_image_edit_parity_non_square(generators, references):
    image = _image(60, 40)
    kw = dict(image=image, prompt="make it red", height=64, width=32, num_inference_steps=2,
              negative_prompt="blurry", true_cfg_scale=4.0)
    ref = references["edit"](**kw, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images
    gen = generators["edit"]
    ours = gen.generate(**kw, seed=SEED, output_type="np").output
    _compare(ours, ref)
    # A batch: every prompt sees the image (diffusers refuses one image for two prompts). Row 0 is the longest
    # prompt and draws the same noise as the single run, so it must still match the reference.
    batch = gen.generate(**{**kw, "prompt": ["make it red", "a cat"]}, seed=SEED, output_type="np").output
    assert batch.shape == (2, 64, 32, 3)
    _compare(batch[:1], ref)


def test_qwen_image_edit_default_size_follows_input_aspect(generators):
    """No height/width: the input's aspect at ~1 MP, multiples of 32 (60x40 -> 1248x832): 26*39 tokens (VAE 16x)."""
    out = generators["edit"].generate(image=_image(60, 40), prompt="make it red", num_inference_steps=2,
                                      true_cfg_scale=1.0, seed=SEED, output_type="latent")
    assert out.latents.shape == (1, (832 // 32) * (1248 // 32), 16)


def test_qwen_image_edit_plus_parity_two_images(generators, references):
    images = [_image(60, 40, seed=1), _image(48, 64, seed=2)]
    kw = dict(image=images, prompt="put the cat on the table", height=32, width=64, num_inference_steps=2,
              negative_prompt="blurry", true_cfg_scale=4.0)
    ref = references["edit_plus"](**kw, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images
    ours = generators["edit_plus"].generate(**kw, seed=SEED, output_type="np").output
    _compare(ours, ref)


def test_qwen_image_edit_plus_prompt_embeddings_equal_diffusers(generators, references):
    """The VL encoding alone (tight tolerance): "Picture N:" template, each image at ~384x384, 64 tokens dropped."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

    from diffcore.request import Request

    images = [_image(60, 40, seed=1), _image(48, 64, seed=2)]
    ref = references["edit_plus"]
    views = []
    for im in images:
        w, h = calculate_dimensions(CONDITION_IMAGE_SIZE, im.size[0] / im.size[1])
        views.append(ref.image_processor.resize(im, h, w))
    want, want_mask = ref.encode_prompt(prompt=["a cat"], image=views, device=torch.device("cpu"))
    gen = generators["edit_plus"]
    params = gen.sampling_params_cls.from_user(prompt=["a cat"], image=images, height=32, width=32)
    req = Request(params=params, prompts=params.prompts, batch_size=1, device=torch.device("cpu"),
                  generator=torch.Generator().manual_seed(0))
    for name in ("input_validation", "text_encoding"):
        req = gen.pipeline.stage(name)(req)
    got = req.prompt_embeds
    assert got.embeds.shape == want.shape and want.shape[1] > 2 * 100  # two images' vision tokens are in there
    torch.testing.assert_close(got.embeds, want, atol=1e-5, rtol=1e-5)
    assert want_mask is None and bool(got.mask.all())
