"""LoRA on Qwen-Image against diffusers + PEFT (fp32, tiny perturbed checkpoint): diffusers-format adapters
(one, two with different weights, fused) and the community layout of the Qwen-Image-Lightning LoRAs
(kohya names with alphas; flattened ``lora_unet_`` names) against diffusers' own conversion."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffcore import DiffGenerator
from diffcore.testing.lora import diffusers_with_loras, kohya_name, save_peft_lora
from diffcore.testing.weights import max_abs_diff, psnr

KW = dict(prompt="a red circle on a blue background", height=32, width=32, num_inference_steps=2, true_cfg_scale=1.0)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "img_mod.1", "txt_mlp.net.2",
           "img_mlp.net.0.proj", "img_in", "proj_out", "norm_out.linear", "linear_1"]


def _compare(ours, ref):
    diff, quality = max_abs_diff(ours, ref), psnr(ours, ref)
    print(f"max|diff|={diff:.2e} psnr={quality:.1f} dB")
    assert quality >= 45 and diff <= 2e-3, f"max|diff|={diff:.2e} psnr={quality:.1f}"


def _ref_run(pipe):
    return pipe(**KW, generator=torch.Generator("cpu").manual_seed(5), output_type="np").images


@pytest.fixture(scope="module")
def folder(qwen_folders):
    return qwen_folders["t2i"]


@pytest.fixture(scope="module")
def adapters(folder, tmp_path_factory):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    root = tmp_path_factory.mktemp("qwen-lora")
    return {
        "a": save_peft_lora(QwenImagePipeline, QwenImageTransformer2DModel, folder, root / "a", TARGETS, rank=4,
                            alpha=2, seed=1, alpha_pattern={"img_mod.1": 6.0}, std=0.5),
        "b": save_peft_lora(QwenImagePipeline, QwenImageTransformer2DModel, folder, root / "b", ["to_k", "txt_mod.1"],
                            rank=3, alpha=5, seed=2, std=0.5),
    }


def test_adapters_one_two_and_fused_match_diffusers(folder, adapters, qwen_reference):
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    for name, path in adapters.items():
        gen.load_lora(path, name=name)
    base = gen.generate(**KW, seed=5, output_type="np").output
    for selection in ({"a": 1.0}, {"a": 0.5, "b": 1.5}):
        ref = _ref_run(diffusers_with_loras(qwen_reference(folder, "t2i"),
                                            {n: (adapters[n], w) for n, w in selection.items()}))
        assert psnr(base, ref) < 40  # the adapters change the picture
        _compare(gen.generate(**KW, seed=5, output_type="np", loras=selection).output, ref)
    gen.fuse_lora(selection)
    fused = gen.generate(**KW, seed=5, output_type="np").output
    gen.unfuse_lora()
    _compare(fused, ref)
    assert np.array_equal(gen.generate(**KW, seed=5, output_type="np").output, base)


def _lightning_state(gen, seed=3):
    """Qwen-Image-Lightning's layout: diffusers module names, lora_down / lora_up, an alpha per layer."""
    t, g = gen.components["transformer"], torch.Generator().manual_seed(seed)
    state = {}
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.1.img_mod.1",
             "transformer_blocks.1.txt_mlp.net.0.proj", "transformer_blocks.1.attn.to_out.0", "img_in"]
    for j, name in enumerate(names):
        layer = t.get_submodule(name)
        r = 2 + j % 2
        state[f"{name}.lora_down.weight"] = torch.randn(r, layer.in_features, generator=g) * 0.4
        state[f"{name}.lora_up.weight"] = torch.randn(layer.out_features, r, generator=g) * 0.4
        if j % 3:  # some layers without alpha: scale 1 there
            state[f"{name}.alpha"] = torch.tensor(float(r + j))
    return state


def test_lightning_layouts_match_diffusers(folder, tmp_path, qwen_reference):
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    state = _lightning_state(gen)
    files = {"lightning": state,
             "prefixed": {f"diffusion_model.{k}": v for k, v in state.items()},
             "flat": {kohya_name(k): v for k, v in state.items()}}
    for name, sd in files.items():
        save_file(sd, tmp_path / f"{name}.safetensors")
    ref = _ref_run(diffusers_with_loras(qwen_reference(folder, "t2i"), {"l": (tmp_path / "lightning.safetensors", 0.8)}))
    assert psnr(gen.generate(**KW, seed=5, output_type="np").output, ref) < 40
    for name in files:
        gen.load_lora(tmp_path / f"{name}.safetensors")
        assert gen.loras[name].format == "qwen-image-community"
        _compare(gen.generate(**KW, seed=5, output_type="np", loras={name: 0.8}).output, ref)


def test_a_batch_mixes_requests_with_different_adapters(folder, adapters):
    """Requests with different adapters (or none) share one batch (true CFG: each branch's rows scaled by
    their own weights), every result equal to its solo run."""
    from diffcore.testing.concurrency import assert_batch_equals_solo

    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    for name, path in adapters.items():
        gen.load_lora(path, name=name)
    base = {**KW, "output_type": "np"}
    requests = [dict(base, seed=1, loras={"a": 1.0}), dict(base, seed=2), dict(base, seed=3, loras={"a": 0.5, "b": 1.5})]
    calls = assert_batch_equals_solo(gen, requests)
    assert calls["batch"] == calls["solo"][0]  # one group: the adapters did not split it
    assert psnr(gen.generate(**base, seed=1).output, gen.generate_batch(requests[:2])[0].output) < 40
