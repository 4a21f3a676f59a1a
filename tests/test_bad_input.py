"""Bad input is a typed, actionable DiffcoreError before any heavy work, and leaves the generator intact."""
from __future__ import annotations

import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch

from diffcore import DiffGenerator
from diffcore.configs import EngineArgs
from diffcore.configs.budget import Budget
from diffcore.errors import ConfigError, ConfigFileError, DiffcoreError, InputError, SamplingParamError
from diffcore.stages.input_validation import load_image

SMALL = dict(height=32, width=32, num_inference_steps=2)


def _out(gen, **kw):
    return gen.generate(prompt="a red circle", seed=3, output_type="np", **{**SMALL, **kw}).output


@pytest.mark.parametrize("name", ["guidance_scale", "true_cfg_scale", "flow_shift"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused(toy_gen, name, value):
    with pytest.raises(SamplingParamError, match="finite") as e:
        toy_gen.generate(prompt="a cat", **{name: value})
    assert e.value.param == name


def test_non_finite_subclass_floats_are_refused_without_a_validator():
    """A model's own float parameter (no validator of its own) is checked too."""
    import attrs

    from toy_plugin.configs import ToySamplingParams

    @attrs.define(kw_only=True)
    class WithShift(ToySamplingParams):
        flow_shift: float = 3.0

    with pytest.raises(SamplingParamError, match="flow_shift.*finite"):
        WithShift.from_user(prompt="x", flow_shift=float("nan"))


def test_budget_refuses_absurd_sizes_and_steps_before_allocating(toy_gen, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "randn", lambda *a, **k: calls.append(a) or pytest.fail("noise was drawn"))
    with pytest.raises(SamplingParamError, match=r"over this engine's budget.*max_pixels.*DIFFCORE_MAX_PIXELS") as e:
        toy_gen.generate(prompt="a cat", height=10**6, width=10**6)
    assert e.value.param == "height"
    with pytest.raises(SamplingParamError, match="max_steps") as e:
        toy_gen.generate(prompt="a cat", num_inference_steps=10**9)
    assert e.value.param == "num_inference_steps"
    assert not calls


def test_budget_defaults_allow_real_model_sizes_and_are_configurable(monkeypatch):
    budget = Budget()
    budget.check_size(1024, 1024)
    budget.check_size(2048, 2048)
    budget.check_size(720, 1280, 81)  # Wan 720p
    budget.check_steps(50)
    monkeypatch.setenv("DIFFCORE_MAX_PIXELS", "1000")
    with pytest.raises(SamplingParamError, match="1,000 \\(max_pixels\\)"):
        Budget().check_size(32, 32)
    assert EngineArgs(max_pixels=4096).budget().max_pixels == 4096  # an explicit value wins over the env
    monkeypatch.setenv("DIFFCORE_MAX_FRAMES", "many")
    with pytest.raises(ConfigError, match="DIFFCORE_MAX_FRAMES='many'"):
        Budget()
    with pytest.raises(ConfigError, match="max_steps"):
        EngineArgs(max_steps=0)


def test_engine_budget_applies_to_its_runs(toy_folder, toy_manager):
    gen = DiffGenerator.from_pretrained(toy_folder, dtype="float32", progress=False, plugin_manager=toy_manager,
                                        max_pixels=32 * 32, max_steps=2)
    assert _out(gen).shape == (1, 32, 32, 3)
    with pytest.raises(SamplingParamError, match="1,024 \\(max_pixels\\)"):
        gen.generate(prompt="a cat", height=64, width=32)
    with pytest.raises(SamplingParamError, match="max_steps"):
        gen.generate(prompt="a cat", num_inference_steps=3)


def test_sampling_param_errors_are_not_config_errors():
    """A request's bad parameter and a bad engine/model setup are different classes, each answered by the
    server on purpose: 400 naming the parameter, or 400 without one."""
    from diffcore.serve.errors import from_exception

    assert not issubclass(SamplingParamError, ConfigError) and issubclass(SamplingParamError, ValueError)
    param = from_exception(SamplingParamError("num_frames", "use 21"))
    assert (param.status, param.param, param.code) == (400, "num_frames", "invalid_value")
    config = from_exception(ConfigError("unknown dtype"))
    assert (config.status, config.param, config.code) == (400, None, "invalid_value")


def test_engine_arguments_are_typed_errors(toy_folder, toy_manager):
    with pytest.raises(ConfigError, match="unknown attention backend.*available: .*sdpa"):
        DiffGenerator.from_pretrained(toy_folder, attention_backend="flash9", progress=False, plugin_manager=toy_manager)
    for bad in (dict(device="gpu0"), dict(num_threads=0), dict(cache_threshold=math.nan), dict(cache=3)):
        with pytest.raises(ConfigError):
            EngineArgs(**bad)


def test_prompt_with_a_lone_surrogate(toy_gen):
    with pytest.raises(SamplingParamError, match=r"prompt\[1\] is not valid Unicode.*'\\ud83d' at position 2"):
        toy_gen.generate(prompt=["ok", "a \ud83d cat"])
    with pytest.raises(SamplingParamError, match="negative_prompt is not valid Unicode"):
        toy_gen.generate(prompt="ok", negative_prompt="\udc80")


def test_callback_must_be_callable(toy_gen):
    with pytest.raises(SamplingParamError, match="callback.*got list") as e:
        toy_gen.generate(prompt="a cat", callback=[])
    assert e.value.param == "callback"


def test_image_inputs(tmp_path, monkeypatch):
    from PIL import Image

    with pytest.raises(SamplingParamError, match="is a directory"):
        load_image(tmp_path)
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # a 4096-pixel file is a "bomb" now
    with pytest.raises(SamplingParamError, match="64 x 64 = 4,096 pixels, more than the 3,000 accepted"):
        load_image(path)  # between 1x and 2x the limit PIL only warns: refused here
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(SamplingParamError, match="decompression bomb.*MAX_IMAGE_PIXELS"):
        load_image(path)  # PIL's own refusal at 2x, as a SamplingParamError
    monkeypatch.undo()
    assert load_image(path).size == (64, 64)
    with pytest.raises(SamplingParamError, match=r"float arrays must be in \[0, 1\], got values in \[255, 255\]"):
        load_image(np.full((4, 4, 3), 255.0, np.float32))
    with pytest.raises(SamplingParamError, match="NaN"):
        load_image(np.full((4, 4, 3), np.nan, np.float32))
    with pytest.raises(SamplingParamError, match="uint8 .* or float .*int64"):
        load_image(np.zeros((4, 4, 3), np.int64))
    ok = load_image(np.full((4, 4, 3), 0.5, np.float32))
    assert np.asarray(ok)[0, 0].tolist() == [128, 128, 128]
    assert np.asarray(load_image(torch.ones(2, 2, 3))).max() == 255  # a tensor in [0, 1] converts too


def test_ignored_parameters_warn(toy_gen, caplog):
    with caplog.at_level(logging.WARNING, logger="diffcore.stages.input_validation"):
        toy_gen.generate(prompt="a cat", num_frames=5, **SMALL)
        toy_gen.generate(prompt="a cat", negative_prompt="blurry", guidance_scale=1.0, **SMALL)
    text = caplog.text
    assert "num_frames=5 is ignored: this model makes images" in text
    assert "negative_prompt is ignored: classifier-free guidance is off (guidance_scale <= 1)" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffcore.stages.input_validation"):
        toy_gen.generate(prompt="a cat", negative_prompt="blurry", **SMALL)  # CFG on: used, no warning
    assert "ignored" not in caplog.text


def _edited_copy(toy_folder, tmp_path, sub, file, **changes):
    folder = tmp_path / "model"
    shutil.copytree(toy_folder, folder)
    path = folder / sub / file
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder, path


@pytest.mark.parametrize("sub,file,changes,field", [
    ("transformer", "config.json", {"num_layers": "1"}, "num_layers"),
    ("transformer", "config.json", {"hidden_size": 32.5}, "hidden_size"),
    ("vae", "config.json", {"block_out_channels": 16}, "block_out_channels"),
    ("vae", "config.json", {"scaling_factor": True}, "scaling_factor"),
    ("scheduler", "scheduler_config.json", {"shift": "3"}, "shift"),
    ("scheduler", "scheduler_config.json", {"num_train_timesteps": None}, "num_train_timesteps"),
])
def test_wrong_types_in_config_files_name_file_and_field(toy_folder, toy_manager, tmp_path, sub, file, changes, field):
    folder, path = _edited_copy(toy_folder, tmp_path, sub, file, **changes)
    with pytest.raises(ConfigFileError) as e:
        DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, plugin_manager=toy_manager)
    assert e.value.file == str(path) and e.value.field == field
    assert str(path) in str(e.value) and repr(field) in str(e.value) and "expected" in str(e.value)


def test_values_a_constructor_rejects_name_the_file(toy_folder, toy_manager, tmp_path):
    folder, path = _edited_copy(toy_folder, tmp_path, "transformer", "config.json", hidden_size=-32)
    with pytest.raises(ConfigFileError, match="cannot build ToyTransformer2DModel") as e:
        DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, plugin_manager=toy_manager)
    assert e.value.file == str(path)


def test_the_generator_is_unchanged_after_every_error(toy_gen, tmp_path):
    """Same generator, same seed: bit-identical output before and after a run of refused requests."""
    before = _out(toy_gen)
    bad = [dict(guidance_scale=math.nan), dict(height=10**6), dict(num_inference_steps=10**9),
           dict(prompt="\ud800"), dict(callback=3), dict(image=str(tmp_path)), dict(output_type="gif"),
           dict(max_sequence_length=10**6), dict(seed=-1), dict(bogus=1)]
    for kwargs in bad:
        with pytest.raises(DiffcoreError):
            toy_gen.generate(**{"prompt": "a cat", **kwargs})
    assert np.array_equal(_out(toy_gen), before)


@pytest.mark.parametrize("output,message", [
    ("missing/out.png", "folder '{tmp}/missing' does not exist; create it first"),
    ("adir.png", "it is a directory"),
    ("file.txt/out.png", "is not a directory"),
    ("/proc/diffcore-test.png", "is not writable"),
])
def test_cli_output_is_checked_before_loading(tmp_path, capsys, monkeypatch, output, message):
    from diffcore import cli

    (tmp_path / "adir.png").mkdir()
    (tmp_path / "file.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(DiffGenerator, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    if output.startswith("missing"):
        output = str(tmp_path / output)
    code = cli.main(["generate", "--prompt", "a cat", "--output", output])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot save") and message.format(tmp=tmp_path) in err
    assert "Traceback" not in err


def test_result_save_index_out_of_range(toy_gen, tmp_path):
    result = toy_gen.generate(prompt="a cat", **SMALL)
    with pytest.raises(InputError, match="holds 1 item"):
        result.save(tmp_path / "x.png", index=3)


def test_a_check_before_the_run_says_its_warnings_once(toy_gen, caplog):
    """A server checks a request on arrival (DiffGenerator.check) and runs it later: the warnings about its
    parameters come from the run only, once, not from the check too."""
    kwargs = dict(prompt="a cat", negative_prompt="blurry", guidance_scale=1.0, num_frames=5, **SMALL)
    with caplog.at_level(logging.WARNING):
        toy_gen.check(kwargs)
        assert "ignored" not in caplog.text  # the check is silent
        toy_gen.generate(**kwargs)
    assert caplog.text.count("negative_prompt is ignored") == 1 and caplog.text.count("num_frames=5 is ignored") == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        with pytest.raises(SamplingParamError):  # the check still refuses what the run would refuse
            toy_gen.check(dict(kwargs, num_inference_steps=0))
