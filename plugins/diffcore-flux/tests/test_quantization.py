"""torchao quantization of the FLUX transformer through EngineArgs(quantization=...)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torchao")

from diffcore import DiffGenerator  # noqa: E402
from diffcore.errors import ConfigError  # noqa: E402

KW = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=0, output_type="np")


def _psnr(a, b) -> float:
    return float(10 * np.log10(1.0 / max(float(((a - b) ** 2).mean()), 1e-20)))


@pytest.mark.parametrize("scheme", ["int8_weight_only", "fp8_weight_only"])
def test_quantized_transformer_tracks_full_precision(flux_folders, scheme):
    folder = flux_folders["dev"]
    base = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False).generate(**KW).output
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, quantization=scheme)
    transformer = gen.components["transformer"]
    kinds = {type(m.weight).__name__ for m in transformer.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds - {"Parameter"}, kinds  # the linear weights are torchao tensors now
    assert all(type(m.weight) is torch.nn.Parameter for m in gen.components["text_encoder"].modules()
               if isinstance(m, torch.nn.Linear))  # text encoders stay as they are
    out = gen.generate(**KW).output
    psnr = _psnr(out, base)
    print(f"{scheme}: PSNR vs unquantized {psnr:.1f} dB")
    assert 25 < psnr < 120  # changed by the quantization, but close


def test_unsupported_and_unknown_schemes_are_refused_before_loading(flux_folders):
    with pytest.raises(ConfigError, match="compute capability >= 8.9"):
        DiffGenerator.from_pretrained(flux_folders["dev"], quantization="fp8")
    with pytest.raises(ConfigError, match="unknown quantization 'int3'"):
        DiffGenerator.from_pretrained(flux_folders["dev"], quantization="int3")
