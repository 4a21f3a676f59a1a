"""Timestep and rotary-position helpers shared by several model families.

Numerics follow diffusers' ``get_timestep_embedding`` / ``get_1d_rotary_pos_embed`` so that
modules built on them match the public checkpoints.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .linear import Linear


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: int = 10000,
) -> torch.Tensor:
    """Sinusoidal embedding of 1-D ``timesteps`` into ``(N, dim)`` (diffusers' get_timestep_embedding)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half - downscale_freq_shift)
    emb = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    emb = scale * emb
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1, 0, 0))
    return emb


class Timesteps(nn.Module):
    """Parameter-free sinusoidal projection (diffusers ``Timesteps``)."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1.0):
        super().__init__()
        self.num_channels, self.flip_sin_to_cos = num_channels, flip_sin_to_cos
        self.downscale_freq_shift, self.scale = downscale_freq_shift, scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift, self.scale)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP over a sinusoidal embedding; parameter names ``linear_1`` / ``linear_2``.
    ``bias=False``: diffusers' ``sample_proj_bias=False`` (bias-free models such as FLUX.2)."""

    def __init__(self, in_channels: int, time_embed_dim: int, out_dim: int | None = None, act: str = "silu",
                 bias: bool = True):
        super().__init__()
        self.linear_1 = Linear(in_channels, time_embed_dim, bias=bias)
        self.act = nn.SiLU() if act == "silu" else nn.GELU(approximate="tanh")
        self.linear_2 = Linear(time_embed_dim, out_dim or time_embed_dim, bias=bias)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(sample)))


def rope_frequencies(dim: int, positions: torch.Tensor, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real cos/sin tables ``(len(positions), dim)`` with interleaved pairs (diffusers' use_real, repeat_interleave)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device)[: dim // 2] / dim))
    angles = torch.outer(positions.to(torch.float64), freqs)
    cos = angles.cos().repeat_interleave(2, dim=1).float()
    sin = angles.sin().repeat_interleave(2, dim=1).float()
    return cos, sin
