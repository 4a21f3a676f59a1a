"""Never a silent black picture: non-finite latents, weights and adapter tensors are errors naming a cause.

Why: a NaN or an inf anywhere in a diffusion run spreads to every pixel, and converting NaN to uint8
gives black. A user then sees a black picture and no reason. So the final latents (and the decoded
output) are checked once per request, where it costs one reduction, and the weights and LoRA tensors
are checked as they are loaded (one reduction per tensor, on the tensor's device).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .errors import CorruptCheckpointError, NonFiniteError


def all_finite(t: torch.Tensor) -> bool:
    """One pass, no copy of ``t``: min and max propagate a NaN, and an inf shows in one of them (quantized
    tensor subclasses, e.g. packed GGUF weights, are not looked into). Why min/max and not a sum: a float32
    sum of a bf16 tensor converts every element (24x slower at load, measured on a 63M-parameter model), and
    a sum of large finite weights can overflow to inf, refusing a sound checkpoint."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or not t.is_floating_point() or t.numel() == 0:
        return True
    try:
        low, high = torch.aminmax(t.detach())
    except (RuntimeError, NotImplementedError):  # dtypes without a min/max kernel (float8): the float32 sum
        return bool(torch.isfinite(torch.sum(t, dtype=torch.float32)))
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _causes(req) -> str:
    params = getattr(req, "params", None)
    causes = []
    for name in ("guidance_scale", "true_cfg_scale"):
        value = getattr(params, name, None)
        if isinstance(value, (int, float)) and value > 20:
            causes.append(f"{name}={value:g} is far above what models are trained for (1-20): lower it")
    loras = getattr(params, "loras", None)
    if loras:
        causes.append(f"the LoRA adapter(s) {', '.join(loras)} in this request (try without them, or a lower weight)")
    causes.append("corrupt or overflowing weights (re-download the checkpoint; in float16 try dtype='bfloat16' or "
                  "'float32')")
    return "; ".join(causes)


def check_latents(latents: torch.Tensor, req, what: str = "the final latents") -> None:
    """Refuse to decode (or return) non-finite latents: the picture would be black."""
    if not all_finite(latents):
        raise NonFiniteError(f"{what} hold NaN or inf values, so the result would be a black picture; likely "
                             f"causes: {_causes(req)}")


def check_output(output: torch.Tensor, req) -> None:
    if not all_finite(output):
        raise NonFiniteError("the decoded output holds NaN or inf values (the latents were finite), so the result "
                             "would be black; the VAE's weights are likely corrupt (re-download the checkpoint), or "
                             "it overflows in float16 (try dtype='bfloat16' or 'float32')")


def check_weight(name: str, tensor: torch.Tensor, source) -> None:
    """A loaded weight must be finite: a NaN in a checkpoint makes every picture black. The check reads every
    weight once at load (pages of a memory-mapped file are read then rather than at the first step);
    ``DIFFCORE_CHECK_WEIGHTS=0`` skips it for checkpoints you trust."""
    if os.environ.get("DIFFCORE_CHECK_WEIGHTS", "1").strip().lower() in ("0", "false", "no"):
        return
    if not all_finite(tensor):
        raise CorruptCheckpointError(f"weight {name!r} from {source} holds NaN or inf values: the checkpoint is corrupt, "
                             "re-download it (or, if a conversion wrote it, convert it again)")


def first_non_finite(tensors: dict) -> Optional[str]:
    """The first key of ``tensors`` whose tensor is not finite, or None."""
    return next((k for k, t in tensors.items() if isinstance(t, torch.Tensor) and not all_finite(t)), None)
