"""LoRA on FLUX against diffusers + PEFT (fp32, tiny perturbed checkpoint): diffusers-format adapters
(one, two with different weights, fused), and the community layouts (kohya / ComfyUI, XLabs) against
diffusers' own converters."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffcore import DiffGenerator
from diffcore.lora.adapter import parse_peft_layout
from diffcore.testing.lora import diffusers_with_loras, probe_deltas, save_peft_lora
from diffcore.testing.weights import max_abs_diff, psnr

KW = dict(prompt="a red circle on a blue background", height=32, width=48, num_inference_steps=2,
          guidance_scale=3.5, max_sequence_length=16)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out", "proj_mlp", "proj_out", "norm1.linear",
           "norm.linear", "ff.net.0.proj", "ff_context.net.2", "x_embedder", "context_embedder", "linear_1"]


def _compare(ours, ref):
    diff, quality = max_abs_diff(ours, ref), psnr(ours, ref)
    print(f"max|diff|={diff:.2e} psnr={quality:.1f} dB")
    assert quality >= 45 and diff <= 2e-3, f"max|diff|={diff:.2e} psnr={quality:.1f}"


def _reference(folder):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ref_run(pipe):
    return pipe(**KW, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images


@pytest.fixture(scope="module")
def adapters(flux_folders, tmp_path_factory):
    """Two PEFT adapters: rank 4 alpha 8 with per-layer patterns, and rank 2 alpha 3."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    root, folder = tmp_path_factory.mktemp("flux-lora"), flux_folders["dev"]
    a = save_peft_lora(FluxPipeline, FluxTransformer2DModel, folder, root / "a", TARGETS, rank=4, alpha=8, seed=1,
                       rank_pattern={"proj_mlp": 6}, alpha_pattern={"^transformer_blocks.0.attn.to_q": 2.0})
    b = save_peft_lora(FluxPipeline, FluxTransformer2DModel, folder, root / "b", ["to_q", "to_v", "ff.net.2", "proj_out"],
                       rank=2, alpha=3, seed=2)
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def gen(flux_folders, adapters):
    gen = DiffGenerator.from_pretrained(flux_folders["dev"], dtype="float32", progress=False)
    for name, path in adapters.items():
        assert gen.load_lora(path.parent, name=name) == name  # a folder with pytorch_lora_weights.safetensors
    return gen


def test_one_and_two_adapters_match_diffusers(flux_folders, adapters, gen):
    base = gen.generate(**KW, seed=3, output_type="np").output
    for selection in ({"a": 0.8}, {"a": 0.7, "b": 1.3}):
        ref = _ref_run(diffusers_with_loras(_reference(flux_folders["dev"]),
                                            {n: (adapters[n], w) for n, w in selection.items()}))
        ours = gen.generate(**KW, seed=3, output_type="np", loras=selection).output
        _compare(ours, ref)
        assert psnr(base, ref) < 40  # the adapters change the picture: the comparison has teeth
    assert gen.loras["a"].ranks == (4, 6) and gen.loras["b"].ranks == (2,)


def test_fused_matches_diffusers_and_unfuse_restores_the_base_bitwise(flux_folders, adapters, gen):
    selection = {"a": 0.6, "b": -0.9}
    base = gen.generate(**KW, seed=3, output_type="np").output
    ref = _ref_run(diffusers_with_loras(_reference(flux_folders["dev"]), {n: (adapters[n], w) for n, w in selection.items()}))
    unfused = gen.generate(**KW, seed=3, output_type="np", loras=selection).output
    gen.fuse_lora(selection)
    try:
        assert gen.loras["a"].fused == 0.6
        fused = gen.generate(**KW, seed=3, output_type="np").output
    finally:
        gen.unfuse_lora()
    _compare(fused, ref)
    _compare(fused, unfused)
    assert np.array_equal(gen.generate(**KW, seed=3, output_type="np").output, base)
    assert gen.loras["a"].fused is None


# -- community layouts vs diffusers' converters --------------------------------------------------------

def _kohya_state(dims: dict, blocks=(0,), singles=(0,), seed=0, linear1=True, globals_=True, alpha=True, std=0.1):
    """A synthetic sd-scripts FLUX LoRA: ``dims`` has D (hidden), in_channels, joint, pooled."""
    g = torch.Generator().manual_seed(seed)
    d = dims["D"]
    shapes = {}
    for i in blocks:
        for s in ("img", "txt"):
            shapes |= {f"double_blocks_{i}_{s}_attn_qkv": (3 * d, d), f"double_blocks_{i}_{s}_attn_proj": (d, d),
                       f"double_blocks_{i}_{s}_mlp_0": (4 * d, d), f"double_blocks_{i}_{s}_mlp_2": (d, 4 * d),
                       f"double_blocks_{i}_{s}_mod_lin": (6 * d, d)}
    for i in singles:
        shapes |= {f"single_blocks_{i}_linear2": (d, 5 * d), f"single_blocks_{i}_modulation_lin": (3 * d, d)}
        if linear1:
            shapes[f"single_blocks_{i}_linear1"] = (7 * d, d)
    if globals_:
        shapes |= {"img_in": (d, dims["in"]), "txt_in": (d, dims["joint"]), "time_in_in_layer": (d, 256),
                   "vector_in_out_layer": (d, d), "final_layer_adaLN_modulation_1": (2 * d, d)}
    state = {}
    for j, (name, (out_f, in_f)) in enumerate(sorted(shapes.items())):
        r = 2 + j % 3
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(r, in_f, generator=g) * std
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out_f, r, generator=g) * std
        if alpha and j % 2 == 0:
            state[f"lora_unet_{name}.alpha"] = torch.tensor(float(r + 1 + j % 4))
    return state


def _ours_probe(state_ours, probes):
    out = {}
    for module, lw in parse_peft_layout(state_ours, {}, "test").items():
        out[module] = (lw.up.double() @ (lw.down.double() @ probes[lw.down.shape[1]])) * lw.scale
    return out


def test_kohya_conversion_matches_diffusers_at_full_flux_size():
    """Real FLUX.1 sizes (diffusers' converter hard-codes them for single blocks), rank 2-4, probed."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from diffcore_flux.lora import convert_kohya, is_kohya

    dims = {"D": 3072, "in": 64, "joint": 4096}
    state = _kohya_state(dims, blocks=(0, 18), singles=(0, 37), globals_=False)
    assert is_kohya(list(state))
    g = torch.Generator().manual_seed(9)
    probes = {n: torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (3072, 4 * 3072, 5 * 3072)}
    want = probe_deltas(_convert_kohya_flux_lora_to_diffusers(dict(state)), probes)
    got = _ours_probe(convert_kohya(dict(state)), probes)
    assert sorted(got) == sorted(want) and len(got) == 2 * 14 + 2 * 6
    for module in want:
        # diffusers bakes alpha / rank into the fp32 factors: agreement to fp32 rounding
        assert ((got[module] - want[module]).norm() / want[module].norm()) < 1e-6, module


def test_kohya_global_layers_follow_the_bfl_mapping():
    """diffusers converts these but then drops them (no ``transformer.`` prefix): checked against the BFL
    names and the final layer's (shift, scale) -> (scale, shift) swap directly."""
    from diffcore_flux.lora import convert_kohya

    dims = {"D": 8, "in": 4, "joint": 6}
    state = _kohya_state(dims, blocks=(), singles=(), alpha=False)
    layers = parse_peft_layout(convert_kohya(dict(state)), {}, "test")
    assert sorted(layers) == ["context_embedder", "norm_out.linear", "time_text_embed.text_embedder.linear_2",
                              "time_text_embed.timestep_embedder.linear_1", "x_embedder"]
    up = state["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    assert torch.equal(layers["norm_out.linear"].up, torch.cat([up[8:], up[:8]]))


def _comfy_name(key: str) -> str:
    """sd-scripts -> ComfyUI spelling: lora_unet_double_blocks_0_img_attn_qkv.X -> diffusion_model.double_blocks.0.img_attn.qkv.X"""
    m = re.fullmatch(r"lora_unet_(double|single)_blocks_(\d+)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
    kind, i, module, part = m.groups()
    module = re.sub(r"_(qkv|proj|0|2|lin)$", r".\1", module)
    return f"diffusion_model.{kind}_blocks.{i}.{module}.{part}"


def _tiny_dims(gen):
    t = gen.components["transformer"]
    return {"D": t.inner_dim, "in": t.x_embedder.in_features, "joint": t.context_embedder.in_features}


def test_kohya_and_comfyui_files_match_diffusers_end_to_end(flux_folders, tmp_path):
    folder = flux_folders["dev"]
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    # single blocks' linear1 and the global layers are left out: diffusers cannot load those at tiny sizes
    state = _kohya_state(_tiny_dims(gen), blocks=(0,), singles=(0, 1), linear1=False, globals_=False, seed=4, std=0.5)
    save_file(state, tmp_path / "kohya.safetensors")
    comfy = {_comfy_name(k): v for k, v in state.items()}
    save_file(comfy, tmp_path / "comfy.safetensors")
    ref = _ref_run(diffusers_with_loras(_reference(folder), {"k": (tmp_path / "kohya.safetensors", 0.9)}))
    assert psnr(gen.generate(**KW, seed=3, output_type="np").output, ref) < 40  # the LoRA matters
    for name in ("kohya", "comfy"):
        gen.load_lora(tmp_path / f"{name}.safetensors")
        assert gen.loras[name].format == "flux-kohya"
        _compare(gen.generate(**KW, seed=3, output_type="np", loras={name: 0.9}).output, ref)


def test_xlabs_file_matches_diffusers_end_to_end(flux_folders, tmp_path):
    folder = flux_folders["dev"]
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    d, g = gen.components["transformer"].inner_dim, torch.Generator().manual_seed(5)
    shapes = {"double_blocks.0.processor.qkv_lora1": 3 * d, "double_blocks.0.processor.qkv_lora2": 3 * d,
              "double_blocks.0.processor.proj_lora1": d, "double_blocks.0.processor.proj_lora2": d,
              "single_blocks.1.processor.qkv_lora": 3 * d, "single_blocks.1.processor.proj_lora": d}
    state = {}
    for name, out_f in shapes.items():
        in_f = 5 * d if name.endswith("single_blocks.1.processor.proj_lora") else d
        state[f"{name}.down.weight"] = torch.randn(3, in_f, generator=g) * 0.5
        state[f"{name}.up.weight"] = torch.randn(out_f, 3, generator=g) * 0.5
    # XLabs' single-block proj LoRA targets proj_out, whose input is [attn, mlp] (5D wide)
    save_file(state, tmp_path / "xlabs.safetensors")
    ref = _ref_run(diffusers_with_loras(_reference(folder), {"x": (tmp_path / "xlabs.safetensors", 1.1)}))
    assert psnr(gen.generate(**KW, seed=3, output_type="np").output, ref) < 40  # the LoRA matters
    assert gen.load_lora(tmp_path / "xlabs.safetensors", name="x") == "x" and gen.loras["x"].format == "flux-xlabs"
    _compare(gen.generate(**KW, seed=3, output_type="np", loras={"x": 1.1}).output, ref)


def test_unfused_adapters_run_through_the_step_cache(flux_folders, adapters):
    """fbcache with threshold 0 recomputes every step through cache_embed/blocks/tail: same result as
    the plain forward, with the adapter applied."""
    plain = DiffGenerator.from_pretrained(flux_folders["dev"], dtype="float32", progress=False)
    cached = DiffGenerator.from_pretrained(flux_folders["dev"], dtype="float32", progress=False, cache="fbcache",
                                           cache_threshold=0.0)
    for g in (plain, cached):
        g.load_lora(adapters["a"], name="a")
    want = plain.generate(**KW, seed=3, output_type="np", loras={"a": 0.8}).output
    got = cached.generate(**KW, seed=3, output_type="np", loras={"a": 0.8}).output
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert psnr(cached.generate(**KW, seed=3, output_type="np").output, want) < 40


def test_adapters_on_quantized_weights_apply_unfused_and_refuse_to_fuse(flux_folders, adapters):
    """torchao int8 weights: the low-rank product adds to the quantized GEMM; fusing would need the
    full-precision weight, so it is refused with the layer named, and nothing changes."""
    pytest.importorskip("torchao")
    from diffcore.errors import LoraError

    full = DiffGenerator.from_pretrained(flux_folders["dev"], dtype="float32", progress=False)
    gen = DiffGenerator.from_pretrained(flux_folders["dev"], dtype="float32", progress=False,
                                        quantization="int8_weight_only")
    for g in (full, gen):
        g.load_lora(adapters["a"], name="a")
    base = gen.generate(**KW, seed=3, output_type="np").output
    want = full.generate(**KW, seed=3, output_type="np", loras={"a": 0.8}).output
    got = gen.generate(**KW, seed=3, output_type="np", loras={"a": 0.8}).output
    assert psnr(got, want) > psnr(base, want) + 10  # the adapter applied on top of the int8 base
    with pytest.raises(LoraError, match="'a'.*quantized.*per request"):
        gen.fuse_lora({"a": 0.8})
    assert gen.loras["a"].fused is None and np.array_equal(gen.generate(**KW, seed=3, output_type="np").output, base)


def test_a_batch_mixes_requests_with_different_adapters(gen):
    """Requests with different adapters (or none) share one batch, each row with its own weights: every
    result equals its solo run, in one transformer call per step for the whole batch."""
    from diffcore.testing.concurrency import assert_batch_equals_solo

    base = {**KW, "output_type": "np"}
    requests = [dict(base, seed=1, loras={"a": 0.8}), dict(base, seed=2),
                dict(base, seed=3, prompt=["a cat", "a dog"], loras={"a": -0.4, "b": 1.2}), dict(base, seed=4, loras={"b": 0.9})]
    calls = assert_batch_equals_solo(gen, requests)
    assert calls["batch"] == calls["solo"][0] == KW["num_inference_steps"]  # one group: the adapters did not split it
    plain = gen.generate(**base, seed=1).output
    assert psnr(plain, gen.generate_batch(requests[:2])[0].output) < 40  # row 0's adapter really applied in the batch
