"""Linear layers through oneDNN on the CPU, optionally with GELU fused into the GEMM.

Why: on the benchmark machine (AVX-512 EPYC, torch 2.13) oneDNN's fp32 GEMM is ~8% faster than the
MKL path ``F.linear`` takes, and fusing ``gelu(tanh)`` into the GEMM epilogue saves a full pass
over an MLP's widest activation (~17% of that layer in fp32 and bf16). bf16 ``F.linear`` already
uses oneDNN; there only the fusion helps. Results equal ``F.linear`` up to GEMM summation order.

``Linear`` layers also re-lay out their weight once, on first use, in oneDNN's blocked format
(``PREPACK``): each GEMM then skips re-packing the weight, 3-7% faster per call, bit-identical. The
packed weight replaces the plain one (no second copy; pages of a memory-mapped checkpoint are handed
back); ``state_dict``, ``load_state_dict`` and ``.to()`` see and give plain tensors as usual.

The fast path is taken for CPU float32/bfloat16 inference (no autograd) where ``diffcore.fastpaths``
found it works on this CPU (bf16 oneDNN GEMMs fail on AVX2-only CPUs); anything else (other devices,
half precision, gradients, torch.compile tracing, which fuses on its own, ``DIFFCORE_PORTABLE=1``)
runs the plain PyTorch ops. A oneDNN call that fails where ``F.linear`` works switches the path off
for that dtype. ``ONEDNN = False`` turns it off, ``PREPACK = False`` only the re-layout.
"""
from __future__ import annotations

import sys
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffcore import fastpaths
from diffcore.lora.runtime import lora_delta
from diffcore.memory import release_pages

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
PREPACK = ONEDNN and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
_PACK_LOCK = threading.Lock()  # one thread re-lays out a weight; concurrent callers use the plain one meanwhile


_PLAIN = (torch.Tensor, nn.Parameter)  # quantized weights (torchao, GGUF) are subclasses: plain F.linear serves them


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear`` takes the oneDNN path for this input and weight (side paths such as LoRA ask too)."""
    return (ONEDNN and type(weight) in _PLAIN and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and weight.dtype == x.dtype and (weight.is_mkldnn or weight.is_contiguous())
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and fastpaths.enabled("onednn_linear", x.dtype))


def _packed(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s weight in oneDNN's layout, packing it on first use when ``layer`` alone owns it."""
    w = layer.weight
    if w.is_mkldnn or not PREPACK or not isinstance(layer, Linear) or w.requires_grad:
        return w
    if not fastpaths.enabled("prepack", w.dtype):
        return w
    if not _PACK_LOCK.acquire(blocking=False):
        return w
    try:
        # tied, referenced elsewhere, or in use by another thread (refs: _parameters, w, the call's argument)
        if layer._parameters["weight"] is not w or sys.getrefcount(w) > 3:
            return w
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, max(1, x.numel() // x.shape[-1]))
        except RuntimeError as exc:
            fastpaths.failed("prepack", w.dtype, exc)
            return w
        layer._parameters["weight"] = nn.Parameter(packed, requires_grad=False)
    finally:
        _PACK_LOCK.release()
    release_pages(w)
    return packed


def linear(x: torch.Tensor, layer: nn.Linear, activation: Optional[str] = None) -> torch.Tensor:
    """``layer(x)``, or ``gelu(layer(x), approximate="tanh")`` with ``activation="gelu_tanh"``.

    A layer holding LoRA adapters (``lora_layers``, set by ``diffcore.lora``) adds the active ones'
    low-rank product before the activation; with none active this is the plain path.
    """
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"unsupported activation {activation!r}; expected None or 'gelu_tanh'")
    if getattr(layer, "lora_layers", None):
        delta = lora_delta(layer, x)
        if delta is not None:
            y = _linear(x, layer, None) + delta
            return F.gelu(y, approximate="tanh") if activation else y
    return _linear(x, layer, activation)


def _linear(x: torch.Tensor, layer: nn.Linear, activation: Optional[str]) -> torch.Tensor:
    if _onednn(x, layer.weight):
        try:
            return _onednn_linear(x, layer, activation)
        except RuntimeError as exc:
            y = _plain_linear(x, layer, activation)  # a genuine input error raises here, path untouched
            fastpaths.failed("onednn_linear", x.dtype, exc)
            if isinstance(layer, Linear):
                layer.unpack()
            return y
    return _plain_linear(x, layer, activation)


def _onednn_linear(x: torch.Tensor, layer: nn.Linear, activation: Optional[str]) -> torch.Tensor:
    weight = _packed(layer, x)
    bias = layer.bias if layer.bias is None or layer.bias.dtype == x.dtype else layer.bias.to(x.dtype)
    if activation is None:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh")


def _plain_linear(x: torch.Tensor, layer: nn.Linear, activation: Optional[str]) -> torch.Tensor:
    weight = layer.weight.to_dense() if layer.weight.is_mkldnn else layer.weight
    y = F.linear(x, weight, layer.bias)
    return F.gelu(y, approximate="tanh") if activation else y


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) that takes the oneDNN path when it can."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self)

    def unpack(self) -> None:
        """Put the weight back in the plain layout (before ``.to()``, state-dict loads, copies); the next
        inference call packs it again."""
        w = self._parameters.get("weight")
        if w is not None and w.is_mkldnn:
            self._parameters["weight"] = nn.Parameter(w.to_dense(), requires_grad=False)

    def __getstate__(self):  # copy.deepcopy, pickling
        self.unpack()
        return super().__getstate__()

    def _apply(self, fn, recurse=True):
        self.unpack()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = destination.get(prefix + "weight")
        if w is not None and w.is_mkldnn:
            destination[prefix + "weight"] = w.to_dense()

    def _load_from_state_dict(self, *args, **kwargs):
        self.unpack()
        return super()._load_from_state_dict(*args, **kwargs)
