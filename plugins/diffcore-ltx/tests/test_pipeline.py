"""A tiny checkpoint in Diffusers format, loaded by diffcore's loader, generates correct images."""
from __future__ import annotations

import json

import numpy as np
import pytest

from diffcore.testing.conformance import check_bad_params, check_dataflow, check_determinism, check_output

SMALL = dict(num_inference_steps=2, max_sequence_length=16)


def test_checkpoint_is_in_diffusers_format(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "LTX2Pipeline"
    assert index["transformer"] == ["diffusers", "LTX2Transformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    for sub, name in [("transformer", "diffusion_pytorch_model.safetensors"), ("transformer", "config.json"),
                      ("vae", "diffusion_pytorch_model.safetensors"), ("scheduler", "scheduler_config.json"),
                      ("text_encoder", "model.safetensors"), ("tokenizer", "tokenizer_config.json")]:
        assert (tiny_checkpoint / sub / name).is_file(), f"{sub}/{name} missing"


def test_loader_reads_the_saved_weights(generator, tiny_checkpoint):
    from safetensors.torch import load_file

    from diffcore_ltx.transformer import LTX2Transformer2DModel

    model = generator.components["transformer"]
    assert isinstance(model, LTX2Transformer2DModel)
    saved = load_file(tiny_checkpoint / "transformer" / "diffusion_pytorch_model.safetensors")
    state = model.state_dict()
    assert saved.keys() == state.keys()
    for key, value in saved.items():
        assert np.array_equal(value.numpy(), state[key].numpy()), key


def test_generate_returns_the_requested_size(generator):
    result = generator.generate(prompt="a red circle on a blue background", height=32, width=48, seed=0, **SMALL)
    assert result.images[0].size == (48, 32)
    assert result.output.shape == (1, 32, 48, 3)


def test_output_and_dataflow_conformance(generator):
    check_dataflow(generator)
    check_output(generator, height=32, width=32, prompt=["a cat", "a dog on the grass"], **SMALL)


def test_same_seed_same_image(generator):
    check_determinism(generator, seed=3, prompt="a cat", height=32, width=32, **SMALL)


def test_bad_parameters_are_refused(generator):
    messages = check_bad_params(generator, prompt="a cat")
    assert any("num_inference_steps" in m for m in messages)


def test_prompt_and_guidance_change_the_image(generator):
    def run(**kw):
        return generator.generate(height=32, width=32, seed=1, output_type="np", **{**SMALL, **kw}).output

    base = run(prompt="a cat")
    assert not np.allclose(base, run(prompt="a blue square"), atol=1e-6)
    assert not np.allclose(base, run(prompt="a cat", guidance_scale=1.0), atol=1e-6)  # no CFG branch


def test_sizes_are_rounded_to_what_the_model_takes(generator):
    # VAE 2x down and patch 2: multiples of 4; 34 is rounded down to 32, as diffusers does
    assert generator.config.size_multiple == 4
    assert generator.generate(prompt="a cat", height=34, width=32, output_type="np", **SMALL).output.shape[1] == 32


def test_default_sampling_params():
    from diffcore_ltx.configs import LTX2SamplingParams

    params = LTX2SamplingParams.from_user(prompt="a cat")
    assert (params.height, params.width, params.guidance_scale) == (256, 256, 4.0)
    with pytest.raises(Exception, match="max_sequence_length"):
        LTX2SamplingParams.from_user(prompt="a cat", max_sequence_length=78)
