"""Z-Image single files in the original layout (Tongyi-MAI's code, ComfyUI's ``z_image_turbo_bf16.safetensors``,
unsloth's GGUFs): the key mapping equals diffusers' ``convert_z_image_transformer_checkpoint_to_diffusers``, and
the pipeline takes such files (safetensors: the same output bit for bit; Q8_0 GGUF: close)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffcore.loader.safetensors_io import skip_init
from diffcore.testing.key_layouts import assert_converts_like, tagged
from diffcore_zimage.key_layouts import LAYOUTS, ORIGINAL_LAYOUT
from diffcore_zimage.transformer import ZImageTransformer2DModel


def to_original(state: dict) -> dict:
    """A Diffusers-named Z-Image state dict in the original layout (fused qkv, ``out``, ``q_norm``, no ``2-1``)."""
    out = {}
    for key, value in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            out[key.replace(".to_q.", ".qkv.")] = torch.cat([value, state[key.replace(".to_q.", ".to_k.")],
                                                               state[key.replace(".to_q.", ".to_v.")]])
            continue
        for new, old in ((".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
                         (".attention.norm_k.", ".attention.k_norm."), ("all_final_layer.2-1.", "final_layer."),
                         ("all_x_embedder.2-1.", "x_embedder.")):
            key = key.replace(new, old)
        out[key] = value
    return out


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_mapping_equals_diffusers_converter(prefix):
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    config = dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, in_channels=4,
                  axes_dims=[8, 12, 12])
    with skip_init():
        model = ZImageTransformer2DModel.from_config(config, device="meta")
    original = to_original({k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()})
    shapes = {prefix + k: tuple(v.shape) for k, v in original.items()} | {prefix + "norm_final.weight": (64,)}
    state = tagged(shapes)
    ref = convert_z_image_transformer_checkpoint_to_diffusers(dict(state))
    assert_converts_like(state, ref, LAYOUTS, ORIGINAL_LAYOUT)
    assert set(ref) == set(model.state_dict())


def test_pipeline_takes_original_files(load, folders, tmp_path):
    folder = folders["turbo"]
    original = to_original(load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    save_file(original, tmp_path / "z_image_turbo_tiny.safetensors")
    full = {f"model.diffusion_model.{k}": v for k, v in original.items()} | {"norm_final.weight": torch.ones(4)}
    save_file(full, tmp_path / "z_image_turbo_tiny_comfy.safetensors")
    kw = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=0, output_type="np")
    base = load(folder).generate(**kw).output
    for name in ("z_image_turbo_tiny.safetensors", "z_image_turbo_tiny_comfy.safetensors"):
        assert (load(folder, gguf=tmp_path / name).generate(**kw).output == base).all(), name

    pytest.importorskip("gguf")
    from diffcore.loader.gguf_io import GGUFWeight
    from diffcore.testing.gguf import write_gguf

    written = write_gguf(original, tmp_path / "z_image_turbo_tiny-Q8_0.gguf", "Q8_0")
    gen = load(folder, gguf=tmp_path / "z_image_turbo_tiny-Q8_0.gguf")
    packed = [n for n, p in gen.components["transformer"].named_parameters() if isinstance(p, GGUFWeight)]
    fused = sum(v == "Q8_0" and ".qkv." in k for k, v in written.items())
    assert len(packed) == sum(v == "Q8_0" for v in written.values()) + 2 * fused > 10  # qkv split, still packed
    mse = float(((gen.generate(**kw).output - base) ** 2).mean())
    assert 0 < mse < 1e-3, mse


def test_config_of_the_checkpoint_is_honoured(folders):
    """axes_lens comes from config.json (the class default differs from the real checkpoint's [1536, 512, 512])."""
    config = json.loads((folders["turbo"] / "transformer" / "config.json").read_text())
    model = ZImageTransformer2DModel.from_config(config)
    assert model.rope_spec.axes_lens == tuple(config["axes_lens"]) == (256, 64, 64)
