"""RMSNorm as diffusers computes it, shared by the family plugins whose DiTs use it.

Why here: the statistics are taken in fp32 and the result cast to a half weight's dtype before scaling;
a family that writes its own copy drifts from that rule, and parity breaks in bf16 only.
"""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """diffusers' RMSNorm: statistics in fp32, cast to a half weight's dtype before scaling (parameter
    ``weight``, as in the checkpoints)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight
