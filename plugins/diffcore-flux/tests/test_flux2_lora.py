"""LoRA on FLUX.2 against diffusers + PEFT (fp32, tiny perturbed klein checkpoint): a diffusers/PEFT adapter
per request and fused, the kohya and ai-toolkit (BFL ``diffusion_model.``) layouts diffusers converts, and a
LoKr file refused with a clear message."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffcore import DiffGenerator
from diffcore.errors import LoraFormatError
from diffcore.testing.lora import diffusers_with_loras, save_peft_lora
from diffcore.testing.weights import assert_parity, psnr

KW = dict(prompt="a red circle on a blue background", height=32, width=48, num_inference_steps=2,
          max_sequence_length=16)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out", "to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out",
           "linear_in", "linear_out", "double_stream_modulation_img.linear", "x_embedder", "context_embedder"]


def _reference(folder):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ref_run(pipe):
    return pipe(**KW, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images


@pytest.fixture(scope="module")
def klein(flux2_folders):
    return flux2_folders["klein"]


@pytest.fixture(scope="module")
def gen(klein):
    return DiffGenerator.from_pretrained(klein, dtype="float32", progress=False)


def test_peft_adapter_per_request_and_fused_match_diffusers(klein, gen, tmp_path):
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    path = save_peft_lora(Flux2KleinPipeline, Flux2Transformer2DModel, klein, tmp_path / "a", TARGETS, rank=4,
                          alpha=8, seed=1)
    ref = _ref_run(diffusers_with_loras(_reference(klein), {"a": (path, 0.8)}))
    base = gen.generate(**KW, seed=3, output_type="np").output
    assert psnr(base, ref) < 40  # the adapter changes the picture: the comparison has teeth
    gen.load_lora(path.parent, name="a")
    assert_parity(gen.generate(**KW, seed=3, output_type="np", loras={"a": 0.8}).output, ref)
    gen.fuse_lora({"a": 0.8})
    try:
        assert_parity(gen.generate(**KW, seed=3, output_type="np").output, ref)
    finally:
        gen.unfuse_lora()
    assert np.array_equal(gen.generate(**KW, seed=3, output_type="np").output, base)


def _bfl_layers(d: int, mlp: int) -> dict[str, tuple[int, int]]:
    """BFL module names of the tiny klein transformer (1 double, 2 single blocks) -> (out, in)."""
    shapes = {}
    for s in ("img", "txt"):
        shapes |= {f"double_blocks.0.{s}_attn.qkv": (3 * d, d), f"double_blocks.0.{s}_attn.proj": (d, d),
                   f"double_blocks.0.{s}_mlp.0": (2 * mlp, d), f"double_blocks.0.{s}_mlp.2": (d, mlp)}
    for i in (0, 1):
        shapes |= {f"single_blocks.{i}.linear1": (3 * d + 2 * mlp, d), f"single_blocks.{i}.linear2": (d, d + mlp)}
    return shapes


def _community_file(path, style: str, d: int, mlp: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for j, (name, (out_f, in_f)) in enumerate(sorted(_bfl_layers(d, mlp).items())):
        r = 2 + j % 3
        down, up = torch.randn(r, in_f, generator=g) * 0.3, torch.randn(out_f, r, generator=g) * 0.3
        if style == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
            if j % 2 == 0:
                state[f"{key}.alpha"] = torch.tensor(float(r + 1))
        else:  # ai-toolkit / BFL
            state |= {f"diffusion_model.{name}.lora_A.weight": down, f"diffusion_model.{name}.lora_B.weight": up}
    save_file(state, path)
    return path


@pytest.mark.parametrize("style", ["kohya", "ai-toolkit"])
def test_community_layouts_match_diffusers(klein, gen, tmp_path, style):
    t = gen.components["transformer"]
    path = _community_file(tmp_path / f"{style}.safetensors", style, t.inner_dim,
                           t.transformer_blocks[0].ff.linear_out.in_features, seed=4)
    ref = _ref_run(diffusers_with_loras(_reference(klein), {"c": (path, 0.9)}))
    assert psnr(gen.generate(**KW, seed=3, output_type="np").output, ref) < 40  # the LoRA matters
    name = gen.load_lora(path, name=style)
    assert gen.loras[name].format == "flux2-bfl"
    assert_parity(gen.generate(**KW, seed=3, output_type="np", loras={name: 0.9}).output, ref)


def test_lokr_is_refused_with_a_clear_message(gen, tmp_path):
    state = {"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": torch.zeros(4, 4),
             "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2": torch.zeros(24, 8)}
    save_file(state, tmp_path / "lokr.safetensors")
    with pytest.raises(LoraFormatError, match="LoKr"):
        gen.load_lora(tmp_path / "lokr.safetensors", name="lokr")
    assert "lokr" not in gen.loras
