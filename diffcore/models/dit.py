"""Building blocks shared by the MMDiT-style transformers (FLUX, Qwen-Image): fused AdaLN modulation,
interleaved RoPE as one complex multiply, and the tanh-GELU MLP with GELU fused into its first GEMM.

Why shared: they are the hot elementwise parts of every step; one tuned copy keeps the plugins fast
and their numerics identical to diffusers' (checked by each plugin's fp32 parity tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.models.linear import Linear, linear


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``layer_norm(x) * (1 + scale) + shift`` (affine-free norm).

    For one sample with one ``(D,)`` scale/shift they are the norm's own affine (a single fused kernel);
    otherwise (batches, per-token modulation) one ``addcmul`` after the norm.
    """
    d = x.shape[-1]
    if x.shape[0] == 1 and scale.numel() == d:
        return F.layer_norm(x, (d,), (1 + scale).reshape(d), shift.reshape(d), eps=eps)
    return torch.addcmul(shift, F.layer_norm(x, (d,), eps=eps), 1 + scale)


def rotary_table(rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Interleaved ``(cos, sin)`` tables ``(S, D)`` -> per-pair ``[cos, sin]`` ``(1, S, 1, D/2, 2)`` in fp32;
    build it once per model call, not per attention."""
    cos, sin = rope
    return torch.stack([cos[:, 0::2], sin[:, 0::2]], dim=-1).float()[None, :, None]


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` ``(B, S, H, D)`` by ``table`` in fp32 and cast back (as diffusers).

    Eager: one complex multiply. Under torch.compile (inductor has no complex kernels): the real form.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        re, im = pairs.unbind(-1)
        cos, sin = table.unbind(-1)
        out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    else:
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(table))
    return out.flatten(3).to(x.dtype)


class GELUProj(nn.Module):
    """``net.0`` of diffusers' FeedForward (``GELU(approximate="tanh")``): ``proj`` with GELU fused in."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = Linear(dim, inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.proj, "gelu_tanh")


class FeedForward(nn.Module):
    """tanh-GELU MLP with diffusers' names: ``net.0.proj``, ``net.1`` (parameter-free dropout), ``net.2``."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, dim * mult), nn.Identity(), Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))
