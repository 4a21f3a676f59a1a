"""LoRA on Z-Image against diffusers + PEFT (fp32, tiny perturbed checkpoint): a diffusers-format adapter, and the
community layouts diffusers' Z-Image loader converts (kohya with fused qkv and alphas, ComfyUI / ai-toolkit
``diffusion_model.`` names, the dot spelling)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffcore.testing.lora import diffusers_with_loras, kohya_name, save_peft_lora
from diffcore.testing.weights import max_abs_diff, psnr

pytest.importorskip("peft")

KW = dict(prompt="a red circle on a blue background", height=32, width=48, num_inference_steps=2,
          guidance_scale=3.0, cfg_truncation=0.5)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3", "layers.1.adaLN_modulation.0", "cap_embedder.1",
           "noise_refiner.0.adaLN_modulation.0", "all_final_layer.2-1.adaLN_modulation.1",
           "all_x_embedder.2-1", "t_embedder.mlp.0", "all_final_layer.2-1.linear"]


def _reference(folder, loras):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe = diffusers_with_loras(pipe, loras)
    return pipe(**KW, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images


def _compare(ours, ref):
    diff, quality = max_abs_diff(ours, ref), psnr(ours, ref)
    assert quality >= 45 and diff <= 2e-3, f"max|diff|={diff:.2e} psnr={quality:.1f}"


def test_peft_adapter_matches_diffusers(base, folders, tmp_path):
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    path = save_peft_lora(ZImagePipeline, ZImageTransformer2DModel, folders["base"], tmp_path / "a", TARGETS, rank=4,
                          alpha=8, seed=1, rank_pattern={"w2": 6})
    ref = _reference(folders["base"], {"a": (path, 0.8)})
    plain = base.generate(**KW, seed=3, output_type="np").output
    assert psnr(plain, ref) < 40  # the LoRA matters
    base.load_lora(path.parent, name="a")
    _compare(base.generate(**KW, seed=3, output_type="np", loras={"a": 0.8}).output, ref)


def _community_state(model, seed: int, std: float = 0.3, fused: bool = True) -> dict:
    """Layers of the original module tree: fused qkv (or, ``fused=False``, diffusers' to_q/k/v), ``out``, SwiGLU,
    adaLN; alphas on some."""
    g = torch.Generator().manual_seed(seed)
    d = model.dim
    shapes = {}
    for kind, n in (("layers", len(model.layers)), ("noise_refiner", len(model.noise_refiner))):
        for i in range(n):
            qkv = {f"{kind}.{i}.attention.qkv": (3 * d, d)} if fused else \
                {f"{kind}.{i}.attention.to_{c}": (d, d) for c in "qkv"}
            shapes |= qkv | {f"{kind}.{i}.attention.out": (d, d),
                       f"{kind}.{i}.feed_forward.w1": (model.layers[0].feed_forward.w1.out_features, d)}
    shapes |= {"context_refiner.0.attention.to_v": (d, d), "layers.0.adaLN_modulation.0": (4 * d, min(d, 256))}
    state = {}
    for j, (name, (out_f, in_f)) in enumerate(sorted(shapes.items())):
        r = 2 + j % 3
        state[f"{name}.lora_down.weight"] = torch.randn(r, in_f, generator=g) * std
        state[f"{name}.lora_up.weight"] = torch.randn(out_f, r, generator=g) * std
        if j % 2 == 0:
            state[f"{name}.alpha"] = torch.tensor(float(r + 1 + j % 4))
    return state


@pytest.mark.parametrize("spelling", ["kohya", "comfyui", "dots"])
def test_community_files_match_diffusers_end_to_end(base, folders, tmp_path, spelling):
    from diffcore_zimage.lora import is_community

    # diffusers splits a fused qkv only in the kohya and dot spellings (its ``diffusion_model.`` path keeps the
    # key, which then matches no module): ComfyUI / ai-toolkit files name q, k, v apart
    state = _community_state(base.components["transformer"], seed=4, fused=spelling != "comfyui")
    if spelling == "kohya":
        state = {kohya_name(k): v for k, v in state.items()}
    elif spelling == "comfyui":
        state = {"diffusion_model." + k: v for k, v in state.items()}
    else:
        state = {k.replace(".lora_down.", ".lora.down.").replace(".lora_up.", ".lora.up."): v for k, v in state.items()}
    path = tmp_path / f"{spelling}.safetensors"
    save_file(state, path)
    assert is_community(state)
    ref = _reference(folders["base"], {"c": (path, 0.9)})
    assert psnr(base.generate(**KW, seed=3, output_type="np").output, ref) < 40  # the LoRA matters
    base.load_lora(path, name="c")
    assert base.loras["c"].format == "zimage-community"
    _compare(base.generate(**KW, seed=3, output_type="np", loras={"c": 0.9}).output, ref)
