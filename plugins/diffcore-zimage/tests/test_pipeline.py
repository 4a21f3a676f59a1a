"""The tiny checkpoints through diffcore's loader: format, config selection, conformance, the guidance policy
(calls counted), and bad input."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from diffcore.errors import SamplingParamError
from diffcore.testing.conformance import check_bad_params, check_dataflow, check_determinism, check_output

SMALL = dict(num_inference_steps=2, max_sequence_length=64, height=32, width=32)


class Calls:
    """Batch size of every transformer call."""

    def __init__(self, gen):
        self.sizes = []
        self.handle = gen.components["transformer"].register_forward_pre_hook(
            lambda m, a, kw: self.sizes.append(kw["hidden_states"].shape[0]), with_kwargs=True)


def test_checkpoint_is_in_diffusers_format(folders):
    folder = folders["turbo"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    assert index["transformer"] == ["diffusers", "ZImageTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "Qwen3Model"]
    assert index["tokenizer"] == ["transformers", "Qwen2Tokenizer"]
    for sub, name in [("transformer", "diffusion_pytorch_model.safetensors"), ("transformer", "config.json"),
                      ("vae", "diffusion_pytorch_model.safetensors"), ("scheduler", "scheduler_config.json"),
                      ("text_encoder", "model.safetensors"), ("tokenizer", "tokenizer_config.json")]:
        assert (folder / sub / name).is_file(), f"{sub}/{name} missing"


def test_loader_reads_the_saved_weights(generator, folders):
    from safetensors.torch import load_file

    from diffcore_zimage.transformer import ZImageTransformer2DModel

    model = generator.components["transformer"]
    assert isinstance(model, ZImageTransformer2DModel)
    saved = load_file(folders["turbo"] / "transformer" / "diffusion_pytorch_model.safetensors")
    state = model.state_dict()
    assert saved.keys() == state.keys()
    for key, value in saved.items():
        assert np.array_equal(value.numpy(), state[key].numpy()), key


def test_configs_and_defaults_per_checkpoint(generator, base, load, folders):
    from diffcore_zimage.configs import ZImageSamplingParams, ZImageTurboSamplingParams

    assert type(generator.config).__name__ == "ZImageTurboConfig" and type(base.config).__name__ == "ZImageConfig"
    turbo = ZImageTurboSamplingParams.from_user(prompt="a cat")
    assert (turbo.num_inference_steps, turbo.guidance_scale) == (8, 0.0)
    plain = ZImageSamplingParams.from_user(prompt="a cat")
    assert (plain.num_inference_steps, plain.guidance_scale, plain.cfg_truncation, plain.cfg_normalization) == \
        (50, 5.0, 1.0, False)
    assert load(folders["img2img"]).pipeline.pipeline_name == "ZImageImg2ImgPipeline"


def test_aliases_and_hub_ids_are_registered(isolated_plugin_manager):
    import diffcore_zimage.plugin

    registry = isolated_plugin_manager(diffcore_zimage.plugin).registry
    assert registry.config_for_alias("z-image-turbo").hf_ids == ("Tongyi-MAI/Z-Image-Turbo",)
    assert registry.config_for_alias("z-image").hf_ids == ("Tongyi-MAI/Z-Image",)


def test_generate_returns_the_requested_size(generator):
    result = generator.generate(prompt="a red circle on a blue background", seed=0, **{**SMALL, "width": 48})
    assert result.images[0].size == (48, 32)


@pytest.mark.parametrize("which", ["turbo", "base"])
def test_conformance(generator, base, which):
    gen = {"turbo": generator, "base": base}[which]
    check_dataflow(gen)
    check_output(gen, prompt=["a cat", "a dog on the grass"], **SMALL)
    check_determinism(gen, seed=3, prompt="a cat", **SMALL)
    messages = check_bad_params(gen, prompt="a cat")
    assert any("num_inference_steps" in m for m in messages)


def test_img2img_conformance(load, folders):
    from PIL import Image

    gen = load(folders["img2img"])
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    check_dataflow(gen)
    check_determinism(gen, seed=3, prompt="a cat", image=image, num_inference_steps=2, strength=1.0)
    result = gen.generate(prompt="a cat", image=image, num_inference_steps=2, strength=1.0)
    assert result.images[0].size == (32, 16)  # the input's size, rounded down to multiples of 16
    with pytest.raises(SamplingParamError, match="strength"):
        gen.generate(prompt="a cat", image=image, strength=1.5)
    with pytest.raises(SamplingParamError, match="strength"):
        gen.generate(prompt="a cat", image=image, strength=0.0, num_inference_steps=2)  # no step left
    with pytest.raises(SamplingParamError, match="image"):
        gen.generate(prompt="a cat")


def test_cfg_truncation_stops_the_unconditional_calls(base):
    calls = Calls(base)
    full = base.generate(prompt="a cat", seed=1, output_type="np", **{**SMALL, "num_inference_steps": 4}).output
    assert calls.sizes == [1] * 8
    calls.sizes.clear()
    cut = base.generate(prompt="a cat", seed=1, output_type="np", cfg_truncation=0.1,
                        **{**SMALL, "num_inference_steps": 4}).output
    assert calls.sizes == [1] * 6  # model times 0, 0.05 guided; 0.14, 0.33 > 0.1 are not
    assert np.abs(full - cut).max() > 1e-3
    calls.sizes.clear()
    normed = base.generate(prompt="a cat", seed=1, output_type="np", cfg_normalization=True,
                           **{**SMALL, "num_inference_steps": 4}).output
    assert np.abs(full - normed).max() > 1e-3  # the renormalisation clipped


def test_rows_that_disagree_get_their_solo_results(base):
    rows = [dict(prompt="a cat", seed=1, cfg_truncation=0.1), dict(prompt="two yellow squares", seed=2),
            dict(prompt="a dog", seed=3, guidance_scale=2.0, cfg_normalization=True, cfg_truncation=0.0)]
    kw = {**SMALL, "num_inference_steps": 4, "output_type": "np"}
    solo = [base.generate(**r, **kw).output for r in rows]
    calls = Calls(base)
    batch = base.generate_batch([{**r, **kw} for r in rows])
    for alone, together in zip(solo, batch):
        np.testing.assert_allclose(together.output, alone, atol=2e-5)
    # unconditional rows per step: 3 (t=0), then rows 1-2 (0.05 > 0.0 ends row 3), then row 2 alone twice
    assert calls.sizes == [3, 3, 3, 2, 3, 1, 3, 1]


def test_size_not_multiple_of_16_is_rounded_with_a_warning(generator, caplog):
    with caplog.at_level(logging.WARNING):
        out = generator.generate(prompt="a cat", **{**SMALL, "height": 40, "width": 56}, output_type="np").output
    assert out.shape[1:3] == (32, 48)
    assert "height=40 is not a multiple of 16" in caplog.text


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "half"])
def test_cfg_truncation_outside_0_1_is_refused(base, value):
    with pytest.raises(SamplingParamError, match="cfg_truncation"):
        base.generate(prompt="a cat", cfg_truncation=value, **SMALL)


def test_cfg_normalization_must_be_a_flag_or_ratio(base):
    with pytest.raises(SamplingParamError, match="cfg_normalization"):
        base.generate(prompt="a cat", cfg_normalization=-1.0, **SMALL)


def test_guidance_on_turbo_is_ignored_with_a_warning(generator, caplog):
    calls = Calls(generator)
    plain = generator.generate(prompt="a cat", seed=2, output_type="np", **SMALL).output
    with caplog.at_level(logging.WARNING):
        guided = generator.generate(prompt="a cat", seed=2, output_type="np", guidance_scale=4.0, **SMALL).output
    assert "guidance_scale=4.0 is ignored: Z-Image-Turbo is guidance-distilled" in caplog.text
    np.testing.assert_array_equal(plain, guided)
    assert calls.sizes == [1] * 4  # no unconditional call in either run


def test_prompt_changes_the_image(generator):
    def run(prompt):
        return generator.generate(prompt=prompt, seed=1, output_type="np", **SMALL).output

    assert not np.allclose(run("a cat"), run("a blue square"), atol=1e-4)
