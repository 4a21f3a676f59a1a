"""A tiny checkpoint in Diffusers format, loaded by diffcore's loader, generates correct images."""
from __future__ import annotations

import json

import numpy as np
import pytest

from diffcore.testing.conformance import check_bad_params, check_dataflow, check_determinism, check_output

SMALL = dict(num_inference_steps=2, max_sequence_length=16)


def test_checkpoint_is_in_diffusers_format(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "{{ cookiecutter.pipeline_class_names.split(',')[0].strip() }}"
    assert index["transformer"] == ["diffusers", "{{ cookiecutter.class_prefix }}Transformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    for sub, name in [("transformer", "diffusion_pytorch_model.safetensors"), ("transformer", "config.json"),
                      ("vae", "diffusion_pytorch_model.safetensors"), ("scheduler", "scheduler_config.json"),
                      ("text_encoder", "model.safetensors"), ("tokenizer", "tokenizer_config.json")]:
        assert (tiny_checkpoint / sub / name).is_file(), f"{sub}/{name} missing"


def test_loader_reads_the_saved_weights(generator, tiny_checkpoint):
    from safetensors.torch import load_file

    from {{ cookiecutter.package_name }}.transformer import {{ cookiecutter.class_prefix }}Transformer2DModel

    model = generator.components["transformer"]
    assert isinstance(model, {{ cookiecutter.class_prefix }}Transformer2DModel)
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


def test_per_step_guidance_policy_narrows_the_unconditional_call(generator, monkeypatch):
    """A policy (``guidance_active``) that keeps CFG after the first step for the seed-1 row only: later
    unconditional calls run for that row alone (``condition_rows``), and each row equals its solo result."""
    sizes = []
    hook = generator.components["transformer"].register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    monkeypatch.setattr(type(generator.config), "guidance_active", lambda self, params, step, t: step == 0 or params.seed == 1)
    try:
        rows = [dict(prompt="a cat", seed=1), dict(prompt="a blue square", seed=2)]
        kw = dict(height=32, width=32, output_type="np", **SMALL)
        solo = [generator.generate(**row, **kw).output for row in rows]
        sizes.clear()
        batch = generator.generate_batch([dict(row, **kw) for row in rows])
    finally:
        hook.remove()
    assert sizes == [2, 2, 2, 1]  # step 0: cond + uncond for both rows; step 1: uncond for the seed-1 row only
    for alone, together in zip(solo, batch):
        np.testing.assert_allclose(together.output, alone, atol=1e-5)


def test_sizes_are_rounded_to_what_the_model_takes(generator):
    # VAE 2x down and patch 2: multiples of 4; 34 is rounded down to 32, as diffusers does
    assert generator.config.size_multiple == 4
    assert generator.generate(prompt="a cat", height=34, width=32, output_type="np", **SMALL).output.shape[1] == 32


def test_default_sampling_params():
    from {{ cookiecutter.package_name }}.configs import {{ cookiecutter.class_prefix }}SamplingParams

    params = {{ cookiecutter.class_prefix }}SamplingParams.from_user(prompt="a cat")
    assert (params.height, params.width, params.guidance_scale) == (256, 256, 4.0)
    with pytest.raises(Exception, match="max_sequence_length"):
        {{ cookiecutter.class_prefix }}SamplingParams.from_user(prompt="a cat", max_sequence_length=78)
