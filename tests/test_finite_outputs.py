"""Never a silent black picture; absurd numbers refused up front (issue 30 item 4)."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffcore import DiffGenerator
from diffcore.errors import (ConfigFileError, CorruptCheckpointError, LoraFormatError, NonFiniteError,
                             SamplingParamError)

SMALL = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=3, output_type="np")
LOAD = dict(dtype="float32", progress=False)


def _load(folder, manager, **kw):
    return DiffGenerator.from_pretrained(folder, plugin_manager=manager, **LOAD, **kw)


@pytest.fixture
def toy_copy(toy_folder, tmp_path):
    return shutil.copytree(toy_folder, tmp_path / "model")


def _lora_state(model, value=None):
    g, state = torch.Generator().manual_seed(1), {}
    layer = model.get_submodule("proj_out")
    state["transformer.proj_out.lora_A.weight"] = torch.randn(2, layer.in_features, generator=g) * 0.5
    state["transformer.proj_out.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=g) * 0.5
    if value is not None:
        state["transformer.proj_out.lora_B.weight"][0, 0] = value
    return state


@pytest.mark.parametrize("name,value", [("guidance_scale", 1e308), ("guidance_scale", 101.0),
                                        ("true_cfg_scale", 1e30), ("flow_shift", 1e-300), ("flow_shift", 1e300)])
def test_absurd_numbers_are_refused_up_front_and_the_generator_is_unchanged(toy_gen, name, value):
    before = toy_gen.generate(**SMALL).output
    with pytest.raises(SamplingParamError) as e:
        toy_gen.generate(**{**SMALL, name: value})
    assert e.value.param == name and "real models use" in str(e.value)
    np.testing.assert_array_equal(toy_gen.generate(**SMALL).output, before)


def test_the_documented_limits_still_pass(toy_gen):
    toy_gen.generate(**{**SMALL, "guidance_scale": 100.0, "flow_shift": 1e-3})
    toy_gen.generate(**{**SMALL, "flow_shift": 1e3})


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_checkpoint_with_a_non_finite_weight_is_refused_at_load(toy_copy, toy_manager, value):
    path = toy_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    key = sorted(k for k, v in state.items() if v.is_floating_point())[3]
    state[key].view(-1)[5] = value
    save_file(state, str(path))
    with pytest.raises(CorruptCheckpointError, match="NaN or inf") as e:
        _load(toy_copy, toy_manager)
    assert key in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("value", [math.nan, -math.inf])
def test_lora_with_a_non_finite_tensor_is_refused_at_load(toy_gen, tmp_path, value):
    before = toy_gen.generate(**SMALL).output
    state = _lora_state(toy_gen.components["transformer"], value)
    with pytest.raises(LoraFormatError, match="proj_out.lora_B.weight.*NaN or inf"):
        toy_gen.load_lora(state, name="nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(LoraFormatError, match="NaN or inf"):
        toy_gen.load_lora(tmp_path / "nan.safetensors")
    assert not toy_gen.loras
    np.testing.assert_array_equal(toy_gen.generate(**SMALL).output, before)


def test_non_finite_final_latents_name_the_adapter_instead_of_a_black_picture(toy_folder, toy_manager):
    gen = _load(toy_folder, toy_manager)
    before = gen.generate(**SMALL).output
    huge = {k: v * 1e30 for k, v in _lora_state(gen.components["transformer"]).items()}  # finite, but overflows
    gen.load_lora(huge, name="huge")
    with pytest.raises(NonFiniteError, match="the LoRA adapter\\(s\\) huge") as e:
        gen.generate(**{**SMALL, "loras": {"huge": 1.0}})
    assert "black" in str(e.value)
    with pytest.raises(NonFiniteError):
        gen.generate(**{**SMALL, "output_type": "latent", "loras": {"huge": 1.0}})
    np.testing.assert_array_equal(gen.generate(**SMALL).output, before)


def test_non_finite_latents_from_a_step_are_an_error(toy_gen):
    def poison(i, t, latents):
        latents.view(-1)[0] = math.nan

    with pytest.raises(NonFiniteError, match="corrupt or overflowing weights"):
        toy_gen.generate(**SMALL, callback=poison)


@pytest.mark.parametrize("shift", [0, -1.0, 1e-300, 1e300])
def test_scheduler_config_with_an_absurd_shift_is_refused_at_load(toy_copy, toy_manager, shift):
    path = toy_copy / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "shift": shift}))
    with pytest.raises(ConfigFileError, match="shift") as e:
        _load(toy_copy, toy_manager)
    assert e.value.field == "shift" and str(path) in str(e.value)


def test_step_count_the_unipc_schedule_cannot_take_is_refused_before_compute(toy_copy, toy_manager, monkeypatch):
    """Wan's UniPC (flow sigmas, integer timesteps): 400 steps at shift 3 repeat timesteps and ran off the
    schedule's end with an IndexError after all the compute."""
    (toy_copy / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000, "use_flow_sigmas": True,
        "flow_shift": 3.0, "prediction_type": "flow_prediction", "solver_order": 2}))
    index = json.loads((toy_copy / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "UniPCMultistepScheduler"]
    (toy_copy / "model_index.json").write_text(json.dumps(index))
    gen = _load(toy_copy, toy_manager)
    gen.config.linear_sigmas = False  # Wan's setting: the scheduler's own flow sigmas
    before = gen.generate(**SMALL).output
    encoded = []
    monkeypatch.setattr(gen.pipeline.stage("text_encoding"), "forward", lambda req: encoded.append(req) or req)
    with pytest.raises(SamplingParamError, match=r"400 steps .* use at most \d+ steps") as e:
        gen.generate(**{**SMALL, "num_inference_steps": 400})
    assert e.value.param == "num_inference_steps" and not encoded
    with pytest.raises(SamplingParamError, match="num_inference_steps"):
        gen.check({**SMALL, "num_inference_steps": 400})  # the server's check on arrival refuses it too
    monkeypatch.undo()
    np.testing.assert_array_equal(gen.generate(**SMALL).output, before)
    assert np.isfinite(gen.generate(**{**SMALL, "num_inference_steps": 300}).output).all()


def test_the_weight_check_can_be_skipped_for_trusted_checkpoints(toy_copy, toy_manager, monkeypatch):
    path = toy_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    key = sorted(k for k, v in state.items() if v.is_floating_point())[3]
    state[key].view(-1)[5] = math.nan
    save_file(state, str(path))
    monkeypatch.setenv("DIFFCORE_CHECK_WEIGHTS", "0")
    gen = _load(toy_copy, toy_manager)  # loads; the NaN is then caught at the output, not a black picture
    with pytest.raises(NonFiniteError):
        gen.generate(**SMALL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_the_finite_check_sees_nan_and_inf_in_every_dtype_and_never_overflows(dtype):
    from diffcore.finite import all_finite

    finite_max = torch.finfo(dtype).max
    big = torch.full((4096,), finite_max).to(dtype)  # finite weights whose sum overflows every float type
    assert all_finite(big)
    for bad in (float("nan"), float("inf"), float("-inf")):
        if bad != bad or dtype is not torch.float8_e4m3fn:  # e4m3fn has no inf: an inf becomes NaN
            t = torch.ones(64, dtype=torch.float32)
            t[17] = bad
            assert not all_finite(t.to(dtype)), (dtype, bad)
