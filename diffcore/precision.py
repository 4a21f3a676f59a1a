"""The precision a component computes in when the user leaves ``dtype=None``: what the model asks for,
unless this device cannot compute that fast.

Why: FLUX, Qwen-Image and Wan ask for bfloat16. CUDA GPUs and CPUs with native bf16 arithmetic
(AVX512-BF16 or AMX) run it at about twice the fp32 rate, but a CPU without either emulates every
bf16 product: a 1024x1536x6144 MLP took ~6x longer in bf16 than in fp32 on a 2-core AVX2 EPYC
(6.6 s vs 1.1 s). There the bf16 checkpoint is converted to float32 at load (twice the memory of the
bf16 weights) and one log line says so; ``dtype="bfloat16"`` keeps bf16 anyway. The CPU's features
come from ``diffcore.fastpaths.cpu_features()``.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from . import fastpaths

log = logging.getLogger(__name__)


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """``(fast, why)``: whether ``device`` does bf16 arithmetic natively."""
    device = torch.device(device)
    if device.type == "cpu":
        f = fastpaths.cpu_features()
        if f["amx_tile"] or f["avx512_bf16"]:
            return True, f"CPU with {'AMX' if f['amx_tile'] else 'AVX512-BF16'}"
        return False, f"CPU without AVX512-BF16 or AMX (torch reports {f['capability']})"
    if device.type == "cuda" and torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, "CUDA GPU" + ("" if ok else " without bf16 support")
    return True, f"{device.type} device (left as the model asks)"


def resolve(config, names, override: Optional[torch.dtype], device) -> tuple[dict[str, torch.dtype], Optional[str]]:
    """``(dtype per component, why)``: ``override`` for all, or the model's per-component choice with bf16
    replaced by float32 where ``device`` has no native bf16; ``why`` is None when nothing was replaced."""
    wanted = {n: config.dtype_for(n, override) for n in names}
    if override is not None or torch.bfloat16 not in wanted.values():
        return wanted, None
    fast, why = native_bf16(device)
    if fast:
        return wanted, None
    return {n: torch.float32 if d == torch.bfloat16 else d for n, d in wanted.items()}, why


def explain(components: dict, why: Optional[str]) -> None:
    """The one log line saying which loaded modules compute in float32 instead of bf16, and why."""
    if why is None:
        return
    names = sorted(n for n, c in components.items() if isinstance(c, torch.nn.Module))
    log.warning("computing %s in float32 instead of the model's bfloat16: this is a %s, where bf16 matmuls are "
                "several times slower than fp32 (pass dtype='bfloat16' to keep bf16)", ", ".join(names), why)
