"""One attention entry point for every model, so backends and sequence parallelism plug in here.

Layout is diffusers' dispatch layout: ``(batch, seq, heads, head_dim)`` in and out.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]


def _sdpa(query, key, value, attn_mask=None, scale=None):
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return out.transpose(1, 2)


def _math(query, key, value, attn_mask=None, scale=None):
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = (q * scale) @ k.transpose(-1, -2)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return (scores.softmax(-1) @ v).transpose(1, 2)


_BACKENDS: dict[str, AttentionFn] = {"sdpa": _sdpa, "math": _math}
_active = "sdpa"


def register_backend(name: str, fn: AttentionFn) -> None:
    """Add an attention implementation (plugins do this through ``register_attention_backends``)."""
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def set_backend(name: str) -> None:
    """Select the process-wide backend; unknown names list the alternatives."""
    global _active
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(available_backends())}")
    _active = name


def get_backend() -> str:
    return _active


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Scaled dot-product attention over ``(B, S, H, D)`` tensors.

    ``attn_mask`` is broadcastable to ``(B, H, S_q, S_k)``: bool (True = attend) or additive float.
    """
    return _BACKENDS[_active](query, key, value, attn_mask=attn_mask, scale=scale)
