"""Qwen-Image transformer from GGUF files (Q8_0, Q5_K, Q4_K): parity with diffusers on the same file."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")

import diffusers  # noqa: E402  (the test oracle)
from diffusers.models.model_loading_utils import load_gguf_checkpoint  # noqa: E402
from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor  # noqa: E402

from diffcore.testing.gguf import assert_gguf_parity, check_gguf_parity  # noqa: E402
from diffcore_qwen.transformer import QwenImageTransformer2DModel  # noqa: E402

ORACLE_GGUF = (load_gguf_checkpoint, dequantize_gguf_tensor)  # diffusers' own GGUF reader and dequantizer

CFG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128, num_attention_heads=2,
           joint_attention_dim=256, axes_dims_rope=(16, 56, 56))


def _inputs():
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(7)[None] < torch.tensor([7, 4])[:, None]).long()
    return dict(hidden_states=torch.randn(2, 15, 64, generator=g), encoder_hidden_states=torch.randn(2, 7, 256, generator=g),
                encoder_hidden_states_mask=mask, timestep=torch.tensor([0.9, 0.3]), img_shapes=[[(1, 3, 5)]] * 2)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_K", "Q4_K"])
def test_gguf_transformer_matches_diffusers_on_the_same_file(qtype, tmp_path):
    r = check_gguf_parity(QwenImageTransformer2DModel, diffusers.QwenImageTransformer2DModel, CFG, _inputs(), tmp_path, qtype, ORACLE_GGUF)
    print(f"qwen {qtype}: {r}")
    assert_gguf_parity(r, min_quantized=15)


def test_gguf_under_the_comfyui_prefix_loads_the_same_weights(tmp_path):
    """Qwen-Image single files keep the Diffusers names (diffusers' from_single_file maps them as they are); a full
    checkpoint puts them under ``model.diffusion_model.`` beside other components, which the loader leaves out."""
    from diffcore.loader.gguf_io import GGUFWeight
    from diffcore.loader.safetensors_io import load_into_module, skip_init
    from diffcore.testing.gguf import write_gguf

    torch.manual_seed(0)
    state = diffusers.QwenImageTransformer2DModel(**CFG).state_dict()
    write_gguf(state, tmp_path / "qwen-image-Q8_0.gguf", "Q8_0")
    write_gguf({f"model.diffusion_model.{k}": v for k, v in state.items()} | {"text_encoders.qwen25_7b.w": torch.zeros(3)},
               tmp_path / "qwen-image-full-Q8_0.gguf", "Q8_0")
    loaded = []
    for name in ("qwen-image-Q8_0.gguf", "qwen-image-full-Q8_0.gguf"):
        with skip_init():
            model = QwenImageTransformer2DModel.from_config(dict(CFG), device="meta")
        loaded.append(dict(load_into_module(model, [tmp_path / name], dtype=torch.float32).named_parameters()))
    plain, prefixed = loaded
    assert sum(isinstance(p, GGUFWeight) for p in prefixed.values()) >= 15
    for k, p in plain.items():
        q = prefixed[k]
        assert type(p) is type(q) and torch.equal(p.packed() if isinstance(p, GGUFWeight) else p,
                                                  q.packed() if isinstance(q, GGUFWeight) else q), k
