"""Wan transformer from GGUF files (Q8_0, Q5_K, Q4_K): parity with diffusers on the same file."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")

import diffusers  # noqa: E402  (the test oracle)
from diffusers.models.model_loading_utils import load_gguf_checkpoint  # noqa: E402
from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor  # noqa: E402

from diffcore.testing.gguf import assert_gguf_parity, check_gguf_parity  # noqa: E402
from diffcore_wan.transformer import WanTransformer3DModel  # noqa: E402

ORACLE_GGUF = (load_gguf_checkpoint, dequantize_gguf_tensor)  # diffusers' own GGUF reader and dequantizer

CFG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=4, out_channels=4, text_dim=256,
           freq_dim=256, ffn_dim=512, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
           rope_max_seq_len=1024)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(2, 4, 3, 6, 10, generator=g), timestep=torch.tensor([731.0, 96.5]),
                encoder_hidden_states=torch.randn(2, 7, 256, generator=g))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_K", "Q4_K"])
def test_gguf_transformer_matches_diffusers_on_the_same_file(qtype, tmp_path):
    r = check_gguf_parity(WanTransformer3DModel, diffusers.WanTransformer3DModel, CFG, _inputs(), tmp_path, qtype, ORACLE_GGUF)
    print(f"wan {qtype}: {r}")
    assert_gguf_parity(r, min_quantized=10)
