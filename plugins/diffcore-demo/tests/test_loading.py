"""The shipped folder is an ordinary Diffusers checkpoint: diffcore loads it by alias and by path, and
diffusers' own FluxPipeline loads it and produces the same image (fp32)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from diffcore import DiffGenerator
from diffcore_demo.plugin import model_path

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def demo():
    return DiffGenerator.from_pretrained("demo", progress=False)


def test_folder_is_diffusers_format():
    folder = model_path()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for name in ("scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer", "vae"):
        assert (folder / name).is_dir(), name
    for name in ("transformer", "vae"):
        assert (folder / name / "config.json").is_file()
        assert (folder / name / "diffusion_pytorch_model.safetensors").is_file()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 20e6, f"shipped model is {size / 1e6:.1f} MB"


def test_alias_and_path_load_the_same_model(demo):
    from diffcore_demo.configs import DemoConfig, DemoSamplingParams

    by_path = DiffGenerator.from_pretrained(str(model_path()), progress=False)
    for gen in (demo, by_path):
        assert type(gen.config) is DemoConfig and gen.sampling_params_cls is DemoSamplingParams
    a = demo.generate(prompt=PROMPT, seed=3, num_inference_steps=4, output_type="np").output
    b = by_path.generate(prompt=PROMPT, seed=3, num_inference_steps=4, output_type="np").output
    assert a.shape == (1, 128, 128, 3)
    np.testing.assert_array_equal(a, b)


def test_diffusers_loads_it_and_agrees(demo):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.FluxPipeline.from_pretrained(model_path(), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, negative_prompt="", true_cfg_scale=2.5, height=128, width=128, num_inference_steps=8,
               guidance_scale=0.0, max_sequence_length=12,
               generator=torch.Generator("cpu").manual_seed(5), output_type="np").images
    ours = demo.generate(prompt=PROMPT, seed=5, num_inference_steps=8, output_type="np").output
    diff = float(np.abs(ours - ref).max())
    psnr = 10 * np.log10(1.0 / max(float(((ours - ref) ** 2).mean()), 1e-20))
    assert diff <= 2e-3 and psnr >= 45, (diff, psnr)
