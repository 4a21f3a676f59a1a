"""LTX-2 attention and rotary embeddings, shared by the DiT and the text connectors.

Parameter names equal diffusers' ``LTX2Attention`` (``to_q`` / ``to_k`` / ``to_v``, ``norm_q`` / ``norm_k``
RMSNorms across all heads, ``to_out.0``, the optional per-head ``to_gate_logits`` of LTX-2.3). Query and key
may carry different RoPE tables: the audio<->video cross-attention rotates video queries by video time and
audio keys by audio time. A table is ``(cos, sin)``: interleaved ``(B, S, D)`` or split ``(B, H_rope, S, D/2)``
(whose head grouping need not be the attention's; it is the table's own, as in diffusers).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.models.attention import attention
from diffcore.models.linear import Linear

Rope = tuple[torch.Tensor, torch.Tensor]


def rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Affine-free RMSNorm in float32, rounded back (diffusers' ``RMSNorm(elementwise_affine=False)``)."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate ``x`` (B, S, C) by an interleaved or split table, in float32."""
    cos, sin = rope
    if cos.ndim == 4:  # split: halves of each head's channels rotate against each other
        h, s, r = cos.shape[1:]
        b = x.shape[0]  # the table may have batch 1 (one table per request) and broadcast
        xs = x.float().reshape(b, s, h, 2, r).transpose(1, 2)  # (B, H, S, 2, r)
        first, second = xs[..., 0, :], xs[..., 1, :]
        out = torch.stack([first * cos - second * sin, second * cos + first * sin], dim=-2)
        return out.transpose(1, 2).reshape(b, s, -1).to(x.dtype)
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def rope_tables(grid: torch.Tensor, dim: int, theta: float, heads: int, rope_type: str,
                double_precision: bool = True) -> Rope:
    """cos/sin tables from positions ``grid`` (B, S, n_axes) already divided by their maxima (fractions).

    Frequencies ``theta ** linspace(0, 1, dim / (2 n_axes)) * pi / 2``, angle ``(2 * frac - 1) * freq``,
    laid out frequency-major (axis fastest) and padded at the front with identity rotations."""
    n_axes = grid.shape[-1]
    dtype = torch.float64 if double_precision else torch.float32
    steps = dim // (2 * n_axes)
    powers = torch.pow(theta, torch.linspace(0.0, 1.0, steps, dtype=dtype, device=grid.device))
    freqs = (powers * math.pi / 2.0).to(torch.float32)
    angles = ((grid.unsqueeze(-1) * 2 - 1) * freqs).transpose(-1, -2).flatten(2)  # (B, S, steps * n_axes)
    cos, sin = angles.cos(), angles.sin()
    if rope_type == "interleaved":
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        pad = dim % (2 * n_axes)
    else:
        pad = dim // 2 - cos.shape[-1]
    if pad:
        cos = torch.cat([torch.ones_like(cos[..., :pad]), cos], dim=-1)
        sin = torch.cat([torch.zeros_like(sin[..., :pad]), sin], dim=-1)
    if rope_type == "split":
        b, s = cos.shape[:2]
        cos = cos.reshape(b, s, heads, -1).transpose(1, 2)
        sin = sin.reshape(b, s, heads, -1).transpose(1, 2)
    return cos, sin


class LTX2Attention(nn.Module):
    """Self- or cross-attention with RMS-normed queries/keys across heads and optional per-head gates."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: Optional[int] = None,
                 bias: bool = True, out_bias: bool = True, eps: float = 1e-6, gated: bool = False):
        super().__init__()
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.norm_q = nn.RMSNorm(inner, eps=eps)
        self.norm_k = nn.RMSNorm(inner, eps=eps)
        self.to_q = Linear(query_dim, inner, bias=bias)
        self.to_k = Linear(kv_dim, inner, bias=bias)
        self.to_v = Linear(kv_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([Linear(inner, query_dim, bias=out_bias), nn.Identity()])
        self.to_gate_logits = Linear(query_dim, heads, bias=True) if gated else None

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                q_rope: Optional[Rope] = None, k_rope: Optional[Rope] = None,
                perturb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``mask``: additive, broadcastable to (B, H, S_q, S_k). ``perturb`` (spatio-temporal guidance): per
        row 0 = skip the attention (the output is the values), 1 = attend; None attends everywhere."""
        context = x if context is None else context
        value = self.to_v(context)
        if perturb is not None and not bool(perturb.any()):
            out = value
        else:
            q, k = self.norm_q(self.to_q(x)), self.norm_k(self.to_k(context))
            if q_rope is not None:
                q, k = apply_rope(q, q_rope), apply_rope(k, k_rope if k_rope is not None else q_rope)
            out = attention(q.unflatten(2, (self.heads, -1)), k.unflatten(2, (self.heads, -1)),
                            value.unflatten(2, (self.heads, -1)), attn_mask=mask).flatten(2).to(q.dtype)
            if perturb is not None:
                out = torch.lerp(value, out, perturb.to(out.dtype))
        if self.to_gate_logits is not None:
            gates = 2.0 * torch.sigmoid(self.to_gate_logits(x))
            out = (out.unflatten(2, (self.heads, -1)) * gates.unsqueeze(-1)).flatten(2)
        return self.to_out[0](out)
