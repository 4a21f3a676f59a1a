"""Qwen-Image-Layered against diffusers' QwenImageLayeredPipeline on tiny perturbed weights (fp32): 2 layers,
latents and RGBA pictures; the result holds several RGBA images per request; bad parameters are typed errors."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore import DiffGenerator
from diffcore.errors import SamplingParamError
from diffcore.testing.images import random_rgba
from diffcore.testing.weights import assert_parity


def _rgba(w, h, seed=0):
    return random_rgba(w, h, seed)  # partly transparent


@pytest.fixture(scope="module")
def layered(qwen_layered_folder):
    return DiffGenerator.from_pretrained(qwen_layered_folder, dtype="float32", progress=False)


@pytest.mark.parametrize("extra", [{}, {"negative_prompt": " ", "true_cfg_scale": 3.0, "cfg_normalize": True}])
def test_layered_parity(qwen_layered_folder, make_vl_processor, layered, extra):
    from diffusers import QwenImageLayeredPipeline
    from transformers import AutoImageProcessor, AutoTokenizer

    proc_dir = str(Path(qwen_layered_folder) / "processor")
    processor = make_vl_processor(AutoTokenizer.from_pretrained(proc_dir), AutoImageProcessor.from_pretrained(proc_dir))
    ref = QwenImageLayeredPipeline.from_pretrained(qwen_layered_folder, processor=processor, dtype=torch.float32)
    image = _rgba(48, 40)
    kw = dict(prompt="a red square over a blue circle", image=image, layers=2, resolution=640, num_inference_steps=2,
              **extra)
    steps = []  # diffusers' output_type="latent" fails for this pipeline (0.42.1): take the last step's latents

    def keep(pipe, i, t, tensors):
        steps.append(tensors["latents"].clone())
        return tensors

    want = ref(generator=torch.Generator("cpu").manual_seed(3), output_type="np", callback_on_step_end=keep, **kw).images[0]
    want_latents = steps[-1]
    result = layered.generate(seed=3, output_type="np", **kw)
    assert_parity(result.latents, want_latents)
    assert result.layers == 2 and result.output.shape == (2, 576, 704, 4)  # ~640^2 at 6:5, multiples of 32
    assert_parity(result.output, np.asarray(want))
    images = layered.generate(seed=3, **kw).images
    assert [im.mode for im in images] == ["RGBA", "RGBA"] and images[0].size == (704, 576)


@pytest.mark.parametrize("kwargs,param", [
    (dict(prompt="   "), "prompt"),
    (dict(prompt=["", "a cat"]), "prompt"),
    (dict(resolution=512), "resolution"),
    (dict(layers=0), "layers"),
    (dict(num_inference_steps=1), "num_inference_steps"),
    (dict(height=640), "height"),
    (dict(image=None), "image"),
])
def test_bad_parameters(layered, kwargs, param):
    kw = {"prompt": "a cat", "image": _rgba(32, 32), "num_inference_steps": 2, **kwargs}
    with pytest.raises(SamplingParamError) as info:
        layered.generate(**{k: v for k, v in kw.items() if v is not None})
    assert info.value.param == param, info.value


def test_cli_writes_one_file_per_layer(qwen_layered_folder, tmp_path, capsys):
    from diffcore.cli import main

    _rgba(40, 40).save(tmp_path / "in.png")
    rc = main(["generate", "--model", str(qwen_layered_folder), "--image", str(tmp_path / "in.png"), "--prompt",
               "a cat", "--steps", "2", "--dtype", "float32", "--quiet", "--output", str(tmp_path / "out.png")])
    assert rc == 0, capsys.readouterr().err
    written = sorted(p.name for p in tmp_path.glob("out*.png"))
    assert written == [f"out-layer{k}.png" for k in range(1, 5)]  # the default 4 layers
    assert all(Image.open(tmp_path / name).mode == "RGBA" for name in written)


def test_server_answers_one_entry_per_layer(layered):
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from diffcore.serve.settings import ServeSettings
    from diffcore.testing.serving import openai_client, png_bytes, running_server

    image = _rgba(40, 48, 1)
    want = layered.generate(prompt="a cat", image=image, layers=2, num_inference_steps=2, seed=4)
    with running_server(layered, ServeSettings(served_model_name="layered")) as (base, _):
        out = openai_client(base).images.edit(image=("in.png", png_bytes(image), "image/png"),
                                              prompt="a cat", extra_body={"layers": 2, "num_inference_steps": 2,
                                                                          "seed": 4})
    assert [(d.model_extra["output_index"], d.model_extra["layer"]) for d in out.data] == [(0, 1), (0, 2)]
    for entry, layer in zip(out.data, want.images):
        got = Image.open(io.BytesIO(base64.b64decode(entry.b64_json)))
        assert got.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(got), np.asarray(layer))


def test_server_honours_a_transparent_background_with_real_rgba_layers(layered):
    """Issue 29: background='transparent' is honoured where the model has alpha (Layered's RGBA layers come back
    with their alpha), and refused as a 400 naming it where the format cannot carry alpha (jpeg)."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from diffcore.serve.settings import ServeSettings
    from diffcore.testing.serving import openai_client, png_bytes, running_server

    image = _rgba(40, 48, 2)
    want = layered.generate(prompt="a cat", image=image, layers=2, num_inference_steps=2, seed=5)
    assert any(np.asarray(layer)[..., 3].min() < 255 for layer in want.images)  # the alpha is not trivially opaque
    sent = dict(image=("in.png", png_bytes(image), "image/png"), prompt="a cat")
    extra = {"layers": 2, "num_inference_steps": 2, "seed": 5, "background": "transparent"}
    with running_server(layered, ServeSettings(served_model_name="layered")) as (base, _):
        client = openai_client(base)
        out = client.images.edit(**sent, extra_body={**extra, "output_format": "png"})
        with pytest.raises(openai.BadRequestError) as refused:
            client.images.edit(**sent, extra_body={**extra, "output_format": "jpeg"})
    assert "background" in str(refused.value)
    assert len(out.data) == 2
    for entry, layer in zip(out.data, want.images):
        got = Image.open(io.BytesIO(base64.b64decode(entry.b64_json)))
        assert got.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(got), np.asarray(layer))


def test_layered_requests_batch_with_each_other(layered):
    """Layered requests with the same layer count, resolution and picture aspect share transformer and VAE calls
    (other pictures, prompts, seeds, guidance scales); each result equals its solo run, its own layers in order."""
    from diffcore.testing.concurrency import assert_batch_equals_solo

    base = dict(resolution=640, num_inference_steps=2, output_type="np")
    reqs = [dict(prompt="a red square", image=_rgba(48, 40, 1), layers=2, seed=1, negative_prompt="blurry",
                 true_cfg_scale=2.0, **base),
            dict(prompt=["a cat", "a dog"], image=_rgba(96, 80, 2), layers=2, seed=2, negative_prompt=" ",
                 true_cfg_scale=3.0, **base),  # the same condition size (6:5): one batch
            dict(prompt="a blue circle", image=_rgba(48, 40, 3), layers=3, seed=3, **base)]  # 3 layers: its own
    counts = assert_batch_equals_solo(layered, reqs)
    assert counts["solo"] == [4, 4, 2] and counts["batch"] == 4 + 2  # CFG: two calls a step
    results = layered.generate_batch(reqs)
    assert [r.layers for r in results] == [2, 2, 3] and [len(r.output) for r in results] == [2, 4, 3]


@pytest.mark.parametrize("prompt,extra", [("", {}), (" ", {"use_en_prompt": True, "negative_prompt": " ",
                                                          "true_cfg_scale": 2.0})])
def test_empty_prompt_captions_the_picture_as_diffusers(qwen_layered_folder, make_vl_processor, layered, prompt, extra,
                                                        caplog):
    """An empty prompt: the text encoder captions the picture (Chinese or English instruction) and that caption is
    the prompt, as in diffusers; the caption is told in a notice."""
    from diffusers import QwenImageLayeredPipeline
    from transformers import AutoImageProcessor, AutoTokenizer

    proc_dir = str(Path(qwen_layered_folder) / "processor")
    processor = make_vl_processor(AutoTokenizer.from_pretrained(proc_dir), AutoImageProcessor.from_pretrained(proc_dir))
    ref = QwenImageLayeredPipeline.from_pretrained(qwen_layered_folder, processor=processor, dtype=torch.float32)
    captions = []
    ref_caption = ref.get_image_caption
    ref.get_image_caption = lambda *a, **k: captions.append(ref_caption(*a, **k)) or captions[-1]
    steps = []

    def keep(pipe, i, t, tensors):
        steps.append(tensors["latents"].clone())
        return tensors

    kw = dict(prompt=prompt, image=_rgba(40, 48, 4), layers=2, resolution=640, num_inference_steps=2, **extra)
    want = ref(generator=torch.Generator("cpu").manual_seed(2), output_type="np", callback_on_step_end=keep, **kw).images[0]
    with caplog.at_level("INFO"):
        result = layered.generate(seed=2, output_type="np", **kw)
    assert len(captions) == 1 and captions[0]  # diffusers captioned the picture ...
    assert repr(captions[0][:300]) in caplog.text  # ... and diffcore used the same caption
    assert_parity(result.latents, steps[-1])
    assert_parity(result.output, np.asarray(want))
    described = layered.generate(seed=2, output_type="np", **{**kw, "prompt": captions[0]})
    np.testing.assert_array_equal(described.output, result.output)  # the caption is exactly the prompt used


def test_server_takes_an_empty_prompt_for_captioning(layered):
    """OpenAI's edits need a prompt; a captioning model takes "" over HTTP too (the answer equals generate's)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from diffcore.serve.settings import ServeSettings
    from diffcore.testing.serving import openai_client, png_bytes, running_server

    image = _rgba(40, 48, 5)
    want = layered.generate(prompt="", image=image, layers=2, num_inference_steps=2, seed=4, use_en_prompt=True)
    with running_server(layered, ServeSettings(served_model_name="layered")) as (base, _):
        out = openai_client(base).images.edit(image=("in.png", png_bytes(image), "image/png"), prompt="",
                                              extra_body={"layers": 2, "num_inference_steps": 2, "seed": 4,
                                                          "use_en_prompt": True})
    for entry, layer in zip(out.data, want.images):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(entry.b64_json)))),
                                      np.asarray(layer))


def test_only_a_captioning_model_takes_an_empty_prompt_over_http():
    pytest.importorskip("fastapi")
    from diffcore.configs import SamplingParams
    from diffcore.serve.errors import APIError
    from diffcore.serve.schemas import _prompt
    from diffcore_qwen.layered import QwenImageLayeredSamplingParams

    assert _prompt({"prompt": ""}, QwenImageLayeredSamplingParams) == ""
    for params_cls, body in ((SamplingParams, {"prompt": ""}), (QwenImageLayeredSamplingParams, {"prompt": "  "}),
                             (QwenImageLayeredSamplingParams, {})):
        with pytest.raises(APIError, match="prompt is required"):
            _prompt(body, params_cls)
