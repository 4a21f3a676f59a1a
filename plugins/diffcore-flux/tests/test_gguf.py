"""FLUX transformer from GGUF files (Q8_0, Q5_K, Q4_K): parity with diffusers on the same file; end to end."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")

import diffusers  # noqa: E402  (the test oracle)
from diffusers.models.model_loading_utils import load_gguf_checkpoint  # noqa: E402
from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor  # noqa: E402

from diffcore.testing.gguf import assert_gguf_parity, check_gguf_parity, write_gguf  # noqa: E402
from diffcore_flux.transformer import FluxTransformer2DModel  # noqa: E402

ORACLE_GGUF = (load_gguf_checkpoint, dequantize_gguf_tensor)  # diffusers' own GGUF reader and dequantizer

# widths that are multiples of 256, so K-quant blocks fit most weights
CFG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=2,
           joint_attention_dim=256, pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(5.0), indexing="ij"), -1).reshape(-1, 3)
    return dict(hidden_states=torch.randn(2, 15, 64, generator=g), encoder_hidden_states=torch.randn(2, 7, 256, generator=g),
                pooled_projections=torch.randn(2, 256, generator=g), timestep=torch.tensor([0.3, 0.8]),
                guidance=torch.tensor([3.5, 2.0]), img_ids=ids, txt_ids=torch.zeros(7, 3))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_K", "Q4_K"])
def test_gguf_transformer_matches_diffusers_on_the_same_file(qtype, tmp_path):
    r = check_gguf_parity(FluxTransformer2DModel, diffusers.FluxTransformer2DModel, CFG, _inputs(), tmp_path, qtype, ORACLE_GGUF)
    print(f"flux {qtype}: {r}")
    assert_gguf_parity(r, min_quantized=20)


def test_pipeline_loads_transformer_from_gguf(flux_folders, tmp_path):
    from safetensors.torch import load_file

    from diffcore import DiffGenerator
    from diffcore.errors import ConfigError
    from diffcore.loader.gguf_io import GGUFWeight

    folder = flux_folders["dev"]
    state = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    written = write_gguf(state, tmp_path / "t.gguf", "Q8_0")
    kw = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=0, output_type="np")
    base = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False).generate(**kw).output
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, gguf=tmp_path / "t.gguf")
    packed = [n for n, p in gen.components["transformer"].named_parameters() if isinstance(p, GGUFWeight)]
    assert len(packed) == sum(v == "Q8_0" for v in written.values()) > 10
    out = gen.generate(**kw).output
    mse = float(((out - base) ** 2).mean())
    assert 0 < mse < 1e-3, mse  # Q8_0: close to the full-precision output, not equal
    with pytest.raises(ConfigError, match="gguf names component"):
        DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, gguf={"transformer_3": tmp_path / "t.gguf"})
