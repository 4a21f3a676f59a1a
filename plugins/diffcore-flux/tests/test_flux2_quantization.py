"""FLUX.2 transformer quantized: torchao int8 / fp8 weight-only (EngineArgs.quantization) and a city96-style
GGUF in the BFL layout (rows of the fused qkv split while packed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcore import DiffGenerator
from diffcore.loader.gguf_io import GGUFWeight
from diffcore.testing.gguf import write_gguf
from diffcore.testing.weights import psnr

KW = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=0, max_sequence_length=16,
          output_type="np")


@pytest.fixture(scope="module")
def base(flux2_folders):
    return DiffGenerator.from_pretrained(flux2_folders["klein"], dtype="float32", progress=False).generate(**KW).output


@pytest.mark.parametrize("scheme", ["int8_weight_only", "fp8_weight_only"])
def test_quantized_transformer_tracks_full_precision(flux2_folders, base, scheme):
    pytest.importorskip("torchao")
    gen = DiffGenerator.from_pretrained(flux2_folders["klein"], dtype="float32", progress=False, quantization=scheme)
    kinds = {type(m.weight).__name__ for m in gen.components["transformer"].modules() if isinstance(m, torch.nn.Linear)}
    assert kinds - {"Parameter"}, kinds  # the linear weights are torchao tensors now
    quality = psnr(gen.generate(**KW).output, base)
    print(f"{scheme}: PSNR vs unquantized {quality:.1f} dB")
    assert 25 < quality < 120  # changed by the quantization, but close


def test_bfl_gguf_loads_packed_and_tracks_full_precision(flux2_folders, base, tmp_path, flux2_to_bfl):
    from safetensors.torch import load_file

    state = load_file(flux2_folders["klein"] / "transformer" / "diffusion_pytorch_model.safetensors")
    path = tmp_path / "flux-2-klein-tiny-Q8_0.gguf"
    write_gguf({f"model.diffusion_model.{k}": v for k, v in flux2_to_bfl(state).items()}, path, "Q8_0")
    gen = DiffGenerator.from_pretrained(flux2_folders["klein"], dtype="float32", progress=False, gguf=path)
    packed = [n for n, p in gen.components["transformer"].named_parameters() if isinstance(p, GGUFWeight)]
    assert any(n.endswith("attn.to_q.weight") for n in packed)  # a row range of the fused qkv, still packed
    quality = psnr(gen.generate(**KW).output, base)
    print(f"Q8_0 GGUF: PSNR vs unquantized {quality:.1f} dB")
    assert 30 < quality < 120 and not np.array_equal(gen.generate(**KW).output, base)
