"""SamplingParams and EngineArgs validation: every bad value fails early with the parameter's name."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore import DiffGenerator, EngineArgs, SamplingParams
from diffcore.configs import parse_dtype
from diffcore.errors import ConfigError, SamplingParamError
from toy_plugin.configs import ToyEditSamplingParams, ToySamplingParams

BAD_VALUES = [
    ("num_inference_steps", 0, "positive integer"),
    ("num_inference_steps", -3, "positive integer"),
    ("num_inference_steps", "10", "got '10' (str)"),
    ("num_inference_steps", 2.0, "got 2.0 (float)"),
    ("seed", 1.5, "expected an integer"),
    ("seed", -1, "must be in [0, 2**63)"),
    ("seed", True, "expected an integer"),
    ("height", True, "got True (bool)"),
    ("width", 0, "positive integer"),
    ("num_frames", -1, "positive integer"),
    ("fps", "16", "positive integer"),
    ("max_sequence_length", 0, "positive integer"),
    ("guidance_scale", "3", "expected a number"),
    ("guidance_scale", -1.0, "must be >= 0"),
    ("true_cfg_scale", -0.5, "must be >= 0"),
    ("prompt", 123, "a string or a non-empty list of strings"),
    ("prompt", [], "a string or a non-empty list of strings"),
    ("prompt", ["a cat", 3], "a string or a non-empty list of strings"),
    ("negative_prompt", 5, "a string or a non-empty list of strings"),
    ("output_type", "jpg", "must be one of pil, np, pt, latent"),
    ("image", 42, "a PIL image, a path or an array"),
    ("flow_shift", 0.0, "finite number > 0"),
    ("flow_shift", float("nan"), "finite number > 0"),
    ("flow_shift", float("inf"), "finite number > 0"),
    ("flow_shift", "5", "finite number > 0"),
]


@pytest.mark.parametrize("cls", [SamplingParams, ToySamplingParams], ids=["base", "subclass"])
@pytest.mark.parametrize("name,value,reason", BAD_VALUES, ids=[f"{n}={v!r}" for n, v, _ in BAD_VALUES])
def test_bad_value_names_the_parameter(cls, name, value, reason):
    """The subclass re-declares several fields with plain defaults: validation must survive that."""
    kwargs = {"prompt": "a cat", name: value}
    with pytest.raises(SamplingParamError) as exc_info:
        cls.from_user(**kwargs)
    assert exc_info.value.param == name
    assert f"'{name}'" in str(exc_info.value) and reason in str(exc_info.value)


def test_real_plugin_params_keep_base_validation():
    flux = pytest.importorskip("diffcore_flux.configs")
    for name, value in [("num_inference_steps", 0), ("height", True), ("max_sequence_length", -1)]:
        with pytest.raises(SamplingParamError, match=name):
            flux.FluxDevSamplingParams.from_user(prompt="x", **{name: value})


def test_defaults_and_none_keep_the_models_defaults():
    p = ToySamplingParams.from_user(prompt="a cat", height=None, num_inference_steps=None)
    assert (p.height, p.width, p.num_inference_steps, p.guidance_scale, p.max_sequence_length) == (32, 32, 2, 3.0, 16)
    p = ToySamplingParams.from_user(prompt=["a", "b"], guidance_scale=4, seed=2**63 - 1)
    assert p.prompts == ["a", "b"] and p.guidance_scale == 4


def test_missing_prompt():
    with pytest.raises(SamplingParamError, match="a prompt is required") as exc_info:
        ToySamplingParams.from_user(num_inference_steps=3)
    assert exc_info.value.param == "prompt"


def test_unknown_parameter_lists_the_accepted_names():
    with pytest.raises(SamplingParamError) as exc_info:
        ToySamplingParams.from_user(prompt="a cat", steps=3)
    err = exc_info.value
    assert err.param == "steps" and "unknown parameter" in str(err)
    for accepted in ("num_inference_steps", "guidance_scale", "max_sequence_length", "seed", "output_type"):
        assert accepted in str(err)
    assert "max_images" not in str(err)  # model limits are not user parameters


def test_too_long_max_sequence_length():
    with pytest.raises(SamplingParamError, match="accepts at most 77, got 78") as exc_info:
        ToySamplingParams.from_user(prompt="a cat", max_sequence_length=78)
    assert exc_info.value.param == "max_sequence_length"
    assert ToySamplingParams.from_user(prompt="a cat", max_sequence_length=77).max_sequence_length == 77


def test_image_count_for_text_and_edit_models():
    img = Image.new("RGB", (8, 8))
    with pytest.raises(SamplingParamError, match="takes no input image, got 1") as exc_info:
        ToySamplingParams.from_user(prompt="a cat", image=img)
    assert exc_info.value.param == "image"
    with pytest.raises(SamplingParamError, match="needs at least 1 input image"):
        ToyEditSamplingParams.from_user(prompt="make it red")
    with pytest.raises(SamplingParamError, match="at most 1 input image.*got 2"):
        ToyEditSamplingParams.from_user(prompt="make it red", image=[img, img])
    assert ToyEditSamplingParams.from_user(prompt="make it red", image=img).images == [img]
    assert len(ToyEditSamplingParams.from_user(prompt="x", image=np.zeros((8, 8, 3), np.uint8)).images) == 1


def test_unreadable_image_names_the_parameter(tmp_path):
    from diffcore.stages import load_image

    with pytest.raises(SamplingParamError, match=r"image\[0\]: file .* does not exist") as exc_info:
        load_image(tmp_path / "nope.png")
    assert exc_info.value.param == "image"
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(SamplingParamError, match="not a readable image"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(SamplingParamError, match=r"HxWx3 array, got shape \(4, 4\)"):
        load_image(np.zeros((4, 4)))


# ------------------------------------------------------------------------- through generate()
def test_generate_validates_before_running(toy_gen):
    with pytest.raises(SamplingParamError, match="'num_inference_steps'"):
        toy_gen.generate(prompt="a cat", num_inference_steps=0)
    with pytest.raises(SamplingParamError, match="'steps': unknown parameter"):
        toy_gen.generate(prompt="a cat", steps=3)
    with pytest.raises(SamplingParamError, match="'prompt'"):
        toy_gen.generate()
    with pytest.raises(SamplingParamError, match="'seed'"):
        toy_gen.generate(prompt="a cat", seed="3")
    with pytest.raises(SamplingParamError, match="'negative_prompt': got 1 negative prompts for 2 prompts"):
        toy_gen.generate(prompt=["a", "b"], negative_prompt=["x"], output_type="latent")


def test_size_the_model_cannot_take(toy_gen, caplog):
    """The toy model needs multiples of 4 (VAE 2x, patch 2): round down with a warning, or refuse."""
    with caplog.at_level(logging.WARNING):
        out = toy_gen.generate(prompt="a cat", height=30, width=32, output_type="np").output
    assert out.shape == (1, 28, 32, 3) and "height=30 is not a multiple of 4; using 28" in caplog.text
    toy_gen.config.size_policy = "error"
    try:
        with pytest.raises(SamplingParamError, match="height=30 is not a multiple of 4; use e.g. 28"):
            toy_gen.generate(prompt="a cat", height=30, output_type="latent")
    finally:
        toy_gen.config.size_policy = "round"


# ------------------------------------------------------------------------------- EngineArgs
def test_engine_args_unknown_key_lists_accepted(toy_folder, toy_manager):
    with pytest.raises(ConfigError, match="unknown engine argument\\(s\\) attn_backend; accepted: .*attention_backend"):
        EngineArgs.from_kwargs(attn_backend="sdpa")
    with pytest.raises(ConfigError, match="unknown engine argument\\(s\\) compile_mode"):
        DiffGenerator.from_pretrained(toy_folder, plugin_manager=toy_manager, compile_mode=True)


@pytest.mark.parametrize("value", ["float8", "int8", 32, torch.int64])
def test_engine_args_bad_dtype(value, toy_folder, toy_manager):
    with pytest.raises(ConfigError, match="unknown dtype .*; accepted: float32"):
        EngineArgs(dtype=value)
    with pytest.raises(ConfigError, match="unknown dtype"):
        DiffGenerator.from_pretrained(toy_folder, dtype=value, plugin_manager=toy_manager)


def test_engine_args_dtype_names():
    assert parse_dtype("BF16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    assert parse_dtype(None) is None and EngineArgs(dtype="fp16").dtype is torch.float16


def test_every_installed_models_scales_get_the_guidance_range():
    """Issue 30 rechecked on the new families: every ``*_scale`` parameter of every installed model (LTX-2's
    stg_scale / modality_scale / audio_guidance_scale, Wan 2.2 T2V's guidance_scale_2, whose subclass default
    had dropped its validator) refuses 1e308 before anything runs, as guidance_scale does."""
    import re

    import attrs

    from diffcore.plugins import PluginManager
    from diffcore.records import resolve_ref

    registry = PluginManager().registry
    checked = set()
    for name in registry.names("configs"):
        cls = resolve_ref(registry.origin("configs", name).record.sampling_params)
        try:
            cls(prompt="x")
        except SamplingParamError:  # a composition that needs a mask or an image: its model's class is checked
            continue
        for field in attrs.fields(cls):
            if re.search(r"(^|_)scale(_\d+)?$", field.name) and (cls, field.name) not in checked:
                checked.add((cls, field.name))
                with pytest.raises(SamplingParamError, match=f"'{field.name}': must be at most 100"):
                    cls(prompt="x", **{field.name: 1e308})
    names = {n for _, n in checked}
    assert {"guidance_scale", "true_cfg_scale", "guidance_scale_2", "stg_scale", "audio_guidance_scale"} <= names


def test_a_plugin_subclass_default_keeps_its_parents_own_validator():
    import attrs

    def small(inst, attribute, value):
        if value is not None and value > 5:
            raise SamplingParamError(attribute.name, "must be at most 5")

    @attrs.define(kw_only=True)
    class Parent(SamplingParams):
        knob: int = attrs.field(default=1, validator=small)

    @attrs.define(kw_only=True)
    class Child(Parent):
        knob: int = 2  # a plain default: attrs drops the parent's validator

    with pytest.raises(SamplingParamError, match="'knob': must be at most 5"):
        Child(prompt="x", knob=9)
    assert Child(prompt="x", knob=3).knob == 3


@pytest.mark.parametrize("fps", [10**9, 241])
def test_a_frame_rate_outside_the_range_is_refused(fps):
    with pytest.raises(SamplingParamError, match="'fps': must be in \\[1, 240\\] frames per second"):
        SamplingParams.from_user(prompt="x", fps=fps)
    assert SamplingParams.from_user(prompt="x", fps=240).fps == 240
