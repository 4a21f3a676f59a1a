"""User errors end in one line (CLI: exit 2) or a typed error naming what is wrong, never a raw exception
(issue 30 item 10 and the last bullet's cases)."""
from __future__ import annotations

import errno
import io
import json
import math

import numpy as np
import pytest
import torch

from diffcore.cli import main
from diffcore.errors import InputError, LoraFormatError, SamplingParamError
from diffcore.stages.input_validation import load_image

SMALL = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=3)


@pytest.mark.parametrize("flags,says", [
    (["--port", "70000"], "--port 70000"),
    (["--request-timeout", "inf"], "request_timeout"),
    (["--batch-wait-ms", "-1"], "batch_wait_ms"),
    (["--batch-wait-ms", "nan"], "batch_wait_ms"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--lora", "/nonexistent/style.safetensors"], "/nonexistent/style.safetensors"),
])
def test_bad_serve_invocations_are_one_line_and_exit_2(flags, says, capsys):
    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and says in err, err


@pytest.fixture(scope="module")
def result(toy_gen):
    return toy_gen.generate(**SMALL)


def test_save_into_a_missing_folder_or_a_directory_names_the_path(result, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        result.save(tmp_path / "missing" / "x.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        result.save(tmp_path / "dir.png")
    assert result.save(tmp_path / "ok.png").is_file()


def test_save_on_a_full_disk_names_the_path_and_leaves_no_file(result, tmp_path, monkeypatch):
    from PIL import Image

    def full(self, fp, *a, **k):
        open(fp, "wb").write(b"\\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    target = tmp_path / "x.png"
    with pytest.raises(InputError, match="No space left on device") as e:
        result.save(target)
    assert str(target) in str(e.value) and not target.exists()


def _lora_file(model, metadata: dict) -> dict:
    layer = model.get_submodule("proj_out")
    return {"transformer.proj_out.lora_A.weight": torch.ones(2, layer.in_features) * 0.01,
            "transformer.proj_out.lora_B.weight": torch.ones(layer.out_features, 2) * 0.01}


@pytest.mark.parametrize("meta,says", [({"lora_alpha": "eight", "r": 2}, "lora_alpha is 'eight'"),
                                       ({"lora_alpha": 8, "r": 0}, "r=0"),
                                       ({"lora_alpha": 8, "r": math.inf}, "r is inf")])
def test_bad_lora_metadata_is_a_lora_error(toy_gen, tmp_path, meta, says):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file(_lora_file(toy_gen.components["transformer"], meta), str(path),
              metadata={"lora_adapter_metadata": json.dumps(meta)})
    with pytest.raises(LoraFormatError, match=says):
        toy_gen.load_lora(path)
    assert not toy_gen.loras


@pytest.mark.parametrize("bad", [["text"], "text", [None]])
def test_generate_batch_takes_a_list_of_dicts(toy_gen, bad):
    with pytest.raises(SamplingParamError, match="generate_batch|requests"):
        toy_gen.generate_batch(bad)


def test_a_bf16_tensor_image_is_converted():
    image = torch.rand(8, 8, 3).to(torch.bfloat16)
    got = np.asarray(load_image(image))
    assert got.shape == (8, 8, 3) and np.abs(got.astype(int) - (image.float().numpy() * 255).round()).max() <= 1


def test_a_closed_or_truncated_pil_image_is_an_error_naming_it():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(buf, format="PNG")
    truncated = Image.open(io.BytesIO(buf.getvalue()[:-40]))
    with pytest.raises(SamplingParamError, match="truncated"):
        load_image(truncated)
    closed = Image.open(io.BytesIO(buf.getvalue()))
    closed.close()
    with pytest.raises(SamplingParamError, match="closed"):
        load_image(closed)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_or_bool_weights_where_floats_belong_are_a_weight_mismatch(toy_folder, toy_manager, tmp_path, dtype):
    import shutil

    from safetensors.torch import load_file, save_file

    from diffcore import DiffGenerator
    from diffcore.errors import WeightMismatchError

    folder = shutil.copytree(toy_folder, tmp_path / "model")
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    key = sorted(state)[2]
    state[key] = state[key].to(dtype)
    save_file(state, str(path))
    with pytest.raises(WeightMismatchError, match=f"{key}.*{dtype}.*floating-point"):
        DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, plugin_manager=toy_manager)


def test_a_folder_of_another_family_declared_as_wan_is_refused_before_loading(toy_folder, tmp_path, monkeypatch):
    """The toy folder (an image model: vae AutoencoderKL) with model_index.json saying WanPipeline."""
    import shutil

    from diffcore import DiffGenerator, loader
    from diffcore.errors import RegistryError

    folder = shutil.copytree(toy_folder, tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanPipeline"}))
    monkeypatch.setattr(loader, "load_component", lambda *a, **k: pytest.fail("loaded a component"))
    with pytest.raises(RegistryError, match="component 'vae' is a AutoencoderKL.*AutoencoderKLWan"):
        DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)


def test_replicas_without_ray_is_one_line_and_exit_2(capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError("No module named 'ray'", name="ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert main(["serve", "--replicas", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "need the ray extra (ray is missing)" in err
