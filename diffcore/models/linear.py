"""Linear layers through oneDNN on the CPU, optionally with GELU fused into the GEMM.

Why: on the benchmark machine (AVX-512 EPYC, torch 2.13) oneDNN's fp32 GEMM is ~8% faster than the
MKL path ``F.linear`` takes, and fusing ``gelu(tanh)`` into the GEMM epilogue saves a full pass
over an MLP's widest activation (~17% of that layer in fp32 and bf16). bf16 ``F.linear`` already
uses oneDNN; there only the fusion helps. Results equal ``F.linear`` up to GEMM summation order.

The fast path is taken for CPU float32/bfloat16 inference (no autograd); anything else (other
devices, half precision, gradients, torch.compile tracing, which fuses on its own) runs the plain
PyTorch ops. ``ONEDNN = False`` turns it off.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (ONEDNN and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and weight.dtype == x.dtype and weight.is_contiguous() and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x: torch.Tensor, layer: nn.Linear, activation: Optional[str] = None) -> torch.Tensor:
    """``layer(x)``, or ``gelu(layer(x), approximate="tanh")`` with ``activation="gelu_tanh"``."""
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"unsupported activation {activation!r}; expected None or 'gelu_tanh'")
    if _onednn(x, layer.weight):
        bias = layer.bias if layer.bias is None or layer.bias.dtype == x.dtype else layer.bias.to(x.dtype)
        if activation is None:
            return torch.ops.mkldnn._linear_pointwise(x, layer.weight, bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, bias, "gelu", [], "tanh")
    y = F.linear(x, layer.weight, layer.bias)
    return F.gelu(y, approximate="tanh") if activation else y


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) that takes the oneDNN path when it can."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self)
