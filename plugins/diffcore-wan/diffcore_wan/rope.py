"""Wan's 3-axis RoPE: the per-request cos/sin tables and the rotation applied to queries and keys.

The tables depend only on the latent size, so the model builds them once per request (float64 on the CPU,
like diffusers' buffers, then float32 on the model's device) in the compact ``(S, 1, head_dim / 2)`` cos/sin
halves rather than diffusers' pair-duplicated ``(1, S, 1, D)``; the rotation is one complex multiply in
float32, rounded once to the activation dtype.
"""
from __future__ import annotations

import torch

Rope = tuple[torch.Tensor, torch.Tensor]


def rope_tables(patch_size: tuple[int, int, int], head_dim: int, max_seq_len: int, num_frames: int, height: int,
                width: int, device: torch.device | str, theta: float = 10000.0, start_frame: int = 0) -> Rope:
    """RoPE cos/sin half tables ``(S, 1, head_dim/2)`` for a latent of ``num_frames x height x width``
    whose first frame is frame ``start_frame`` of the video (block-causal generation).

    The head dim is split into time / height / width parts (``h = w = 2 * (D // 6)``, time gets
    the rest), each with its own 1-D frequencies over that axis' patch index.
    """
    pt, ph, pw = patch_size
    sizes = (num_frames // pt, height // ph, width // pw)
    if max(sizes[0] + start_frame // pt, *sizes[1:]) > max_seq_len:
        raise ValueError(f"latent grid {sizes} (from frame {start_frame}) exceeds rope_max_seq_len={max_seq_len}")
    d_hw = 2 * (head_dim // 6)
    dims = (head_dim - 2 * d_hw, d_hw, d_hw)
    angles = []
    for axis, (n, d) in enumerate(zip(sizes, dims)):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        first = start_frame // pt if axis == 0 else 0
        a = torch.outer(torch.arange(first, first + n, dtype=torch.float64), freqs)
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        angles.append(a.view(shape).expand(*sizes, d // 2))
    angles = torch.cat(angles, dim=-1).reshape(-1, 1, head_dim // 2)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def rope_table(rope: Rope) -> torch.Tensor | Rope:
    """Half tables ``(S, 1, D/2)`` -> the complex rotations ``cos + i sin``, built once per call.

    Under torch.compile (inductor has no complex kernels) the ``(cos, sin)`` pair is kept.
    """
    return rope if torch.compiler.is_compiling() else torch.complex(*rope)


def apply_rope(x: torch.Tensor, table: torch.Tensor | Rope) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` ``(B, S, H, D)`` by ``rope_table(...)``; math in float32, as diffusers."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if isinstance(table, tuple):
        (x1, x2), (cos, sin) = pairs.unbind(-1), table
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    else:
        out = torch.view_as_real(torch.view_as_complex(pairs) * table)
    return out.flatten(-2).to(x.dtype)
