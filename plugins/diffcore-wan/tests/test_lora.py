"""LoRA on Wan against diffusers + PEFT (fp32, tiny perturbed checkpoints): diffusers-format adapters (one,
two with different weights, fused; Wan 2.2's second expert) and the original-Wan / lightx2v and
musubi layouts against diffusers' own conversion."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffcore import DiffGenerator
from diffcore.testing.lora import diffusers_with_loras, kohya_name, save_peft_lora
from wan_testlib import compare, reference

KW = dict(prompt="a red circle", num_frames=5, height=32, width=32, num_inference_steps=2, guidance_scale=4.0,
          negative_prompt="blurry")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "time_proj", "proj_out", "linear_1"]


def _fresh_reference(folder, kind):
    return reference.__wrapped__(folder, kind)  # not the cached pipeline other tests share


def _ref_run(pipe):
    return pipe(**KW, generator=torch.Generator("cpu").manual_seed(7), output_type="np").frames


def _ours(gen, **kw):
    return gen.generate(**KW, seed=7, output_type="np", **kw).output


def _changes(a, b):
    from diffcore.testing.weights import psnr

    return psnr(a, b) < 40


def test_adapters_one_two_and_fused_match_diffusers(wan_folders, tmp_path):
    from diffusers import WanPipeline, WanTransformer3DModel

    folder = wan_folders["t2v21"]
    files = {"a": save_peft_lora(WanPipeline, WanTransformer3DModel, folder, tmp_path / "a", TARGETS, rank=4, alpha=3,
                                 seed=1, std=0.3, rank_pattern={"net.2": 2}),
             "b": save_peft_lora(WanPipeline, WanTransformer3DModel, folder, tmp_path / "b", ["to_q", "to_out.0"], rank=2,
                                 alpha=4, seed=2, std=0.3)}
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    for name, path in files.items():
        gen.load_lora(path, name=name)
    base = _ours(gen)
    for selection in ({"b": 1.2}, {"a": 0.9, "b": -0.6}):
        ref = _ref_run(diffusers_with_loras(_fresh_reference(folder, "t2v21"),
                                            {n: (files[n], w) for n, w in selection.items()}))
        assert _changes(base, ref)
        compare(_ours(gen, loras=selection), ref)
    gen.fuse_lora(selection)
    fused = _ours(gen)
    gen.unfuse_lora()
    compare(fused, ref)
    assert np.array_equal(_ours(gen), base)


def test_second_expert_adapter_matches_diffusers(wan_folders, tmp_path):
    """Wan 2.2 A14B: ``component="transformer_2"`` is diffusers' ``load_into_transformer_2=True``."""
    from diffusers import WanPipeline, WanTransformer3DModel

    folder = wan_folders["t2v22"]
    path = save_peft_lora(WanPipeline, WanTransformer3DModel, folder, tmp_path / "low", TARGETS, rank=4, alpha=6,
                          seed=3, std=0.3, subfolder="transformer_2")
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    gen.load_lora(path, name="low", component="transformer_2")
    assert gen.loras["low"].component == "transformer_2"
    ref = _ref_run(diffusers_with_loras(_fresh_reference(folder, "t2v22"), {"low": (path, 0.7)},
                                        load_into_transformer_2=True))
    compare(_ours(gen, loras={"low": 0.7}), ref)


def _original_state(gen, seed=4, lora_names=("lora_down", "lora_up")):
    """lightx2v / ComfyUI layout for the tiny model: LoRA on every block's attention and FFN (alpha on some),
    diff_b bias deltas, head.head as a full ``diff``, all-zero norm deltas."""
    t, g = gen.components["transformer"], torch.Generator().manual_seed(seed)
    down, up = lora_names
    layers = {}
    for i in range(len(t.blocks)):
        for src, dst in (("self_attn", "attn1"), ("cross_attn", "attn2")):
            for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0")):
                layers[f"blocks.{i}.{src}.{o}"] = t.get_submodule(f"blocks.{i}.{dst}.{c}")
        layers[f"blocks.{i}.ffn.0"] = t.get_submodule(f"blocks.{i}.ffn.net.0.proj")
        layers[f"blocks.{i}.ffn.2"] = t.get_submodule(f"blocks.{i}.ffn.net.2")
    state = {}
    for j, (name, layer) in enumerate(layers.items()):
        r = 2 + j % 3
        state[f"diffusion_model.{name}.{down}.weight"] = torch.randn(r, layer.in_features, generator=g) * 0.3
        state[f"diffusion_model.{name}.{up}.weight"] = torch.randn(layer.out_features, r, generator=g) * 0.3
        state[f"diffusion_model.{name}.alpha"] = torch.tensor(float(r + j % 4))
        # on every LoRA layer: diffusers (PEFT lora_bias) leaves layers without one uninitialised
        state[f"diffusion_model.{name}.diff_b"] = torch.randn(layer.out_features, generator=g) * 0.1
    head = t.proj_out
    state["diffusion_model.head.head.diff"] = torch.randn(head.out_features, head.in_features, generator=g) * 0.05
    state["diffusion_model.head.head.diff_b"] = torch.randn(head.out_features, generator=g) * 0.05
    state["diffusion_model.blocks.0.norm3.diff"] = torch.zeros(t.blocks[0].norm2.weight.shape[0])
    return state


@pytest.mark.parametrize("layout", ["original", "original-lora_A", "musubi"])
def test_community_layouts_match_diffusers(wan_folders, tmp_path, layout):
    folder = wan_folders["t2v21"]
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    state = _original_state(gen, lora_names=("lora_A", "lora_B") if layout == "original-lora_A" else ("lora_down", "lora_up"))
    if layout == "musubi":  # kohya-style flat names, LoRA layers only
        state = {kohya_name(k.removeprefix("diffusion_model.")): v for k, v in state.items()
                 if "blocks." in k and not k.endswith((".diff", ".diff_b"))}
    save_file(state, tmp_path / "lora.safetensors")
    ref = _ref_run(diffusers_with_loras(_fresh_reference(folder, "t2v21"), {"x": (tmp_path / "lora.safetensors", 0.8)}))
    assert _changes(_ours(gen), ref)
    gen.load_lora(tmp_path / "lora.safetensors", name="x")
    assert gen.loras["x"].format == "wan-original"
    compare(_ours(gen, loras={"x": 0.8}), ref)


def test_linear_diff_deltas_are_applied_and_nonzero_norm_deltas_refused(wan_folders, tmp_path):
    """diffusers drops ``diff`` deltas of linear layers other than head.head; diffcore applies them:
    fused, the weight is exactly W + weight * diff (and the bias b + weight * diff_b)."""
    from diffcore.errors import LoraFormatError

    gen = DiffGenerator.from_pretrained(wan_folders["t2v21"], dtype="float32", progress=False)
    layer = gen.components["transformer"].get_submodule("blocks.1.attn2.to_v")
    g = torch.Generator().manual_seed(0)
    diff, diff_b = torch.randn(layer.weight.shape, generator=g), torch.randn(layer.out_features, generator=g)
    save_file({"diffusion_model.blocks.1.cross_attn.v.diff": diff, "diffusion_model.blocks.1.cross_attn.v.diff_b": diff_b},
              tmp_path / "d.safetensors")
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    gen.load_lora(tmp_path / "d.safetensors", name="d")
    assert gen.loras["d"].ranks == (0,)
    gen.fuse_lora({"d": 0.5})
    assert torch.equal(layer.weight.to_dense(), (w0 + 0.5 * diff)) and torch.equal(layer.bias, b0 + 0.5 * diff_b)
    gen.unfuse_lora()
    assert torch.equal(layer.weight.to_dense(), w0)
    save_file({"diffusion_model.blocks.0.norm3.diff": torch.ones(32)}, tmp_path / "n.safetensors")
    with pytest.raises(LoraFormatError, match="non-zero deltas .*blocks.0.norm3"):
        gen.load_lora(tmp_path / "n.safetensors")


def test_loras_for_another_family_or_size_are_refused_and_change_nothing(wan_folders, tmp_path):
    from diffcore.errors import LoraFormatError, LoraShapeError

    gen = DiffGenerator.from_pretrained(wan_folders["t2v21"], dtype="float32", progress=False)
    base = _ours(gen)
    flux = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 32),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(96, 2)}
    save_file(flux, tmp_path / "flux.safetensors")
    with pytest.raises(LoraFormatError, match="'flux'") as info:
        gen.load_lora(tmp_path / "flux.safetensors")
    if "flux-kohya" in gen.registry.names("lora_formats"):
        assert "flux-kohya" in str(info.value) and "FluxTransformer2DModel" in str(info.value)
    bigger = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 64),
              "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, 2)}  # a wider Wan
    save_file(bigger, tmp_path / "wan14b.safetensors")
    with pytest.raises(LoraShapeError, match="'wan14b'.*another model size.*blocks.0.attn1.to_q"):
        gen.load_lora(tmp_path / "wan14b.safetensors")
    assert not gen.loras and np.array_equal(_ours(gen), base)


def test_a_batch_mixes_requests_with_different_adapters(wan_folders, tmp_path):
    """Requests with different adapters (or none) share one batch (CFG: both branches' rows scaled by their
    own weights), every video equal to its solo run."""
    from diffusers import WanPipeline, WanTransformer3DModel

    from diffcore.testing.concurrency import assert_batch_equals_solo

    folder = wan_folders["t2v21"]
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    gen.load_lora(save_peft_lora(WanPipeline, WanTransformer3DModel, folder, tmp_path / "a", TARGETS, rank=4, alpha=3,
                                 seed=1, std=0.3), name="a")
    base = {**KW, "output_type": "np"}
    requests = [dict(base, seed=1, loras={"a": 0.9}), dict(base, seed=2), dict(base, seed=3, loras={"a": -0.5})]
    calls = assert_batch_equals_solo(gen, requests)
    assert calls["batch"] == calls["solo"][0]  # one group: the adapters did not split it
    assert _changes(_ours(gen), gen.generate_batch([dict(base, seed=7, loras={"a": 0.9}), dict(base, seed=2)])[0].output)
