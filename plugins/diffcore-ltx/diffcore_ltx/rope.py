"""LTX-2 positions: [start, end) boxes of each token in pixels and seconds, and their RoPE tables.

Video tokens cover ``scale_factors`` (8 frames, 32 x 32 pixels per latent voxel); their time boxes are
shifted for the causal first frame (``causal_offset - 8``, clamped at 0) and divided by the frame rate, so
time is in seconds. Audio tokens cover ``audio_scale_factor`` mel frames of ``hop_length / sampling_rate``
seconds. RoPE takes each box's midpoint as a fraction of the axis maximum (20 s, 2048 px). The audio<->video
cross-attention uses the time axis alone (``ca`` tables), at the audio stream's width.
"""
from __future__ import annotations

from typing import Optional

import torch

from .attention import Rope, rope_tables


class AudioVideoRope:
    """The four tables one DiT call needs: video, audio, and time-only video / audio for the cross-modal attention."""

    def __init__(self, dim: int, audio_dim: int, cross_dim: int, heads: int, audio_heads: int, patch_size: int,
                 patch_size_t: int, audio_patch_size_t: int, max_pos: int, audio_max_pos: int, base_height: int,
                 base_width: int, scale_factors: tuple, audio_scale_factor: int, sampling_rate: int, hop_length: int,
                 theta: float, causal_offset: int, rope_type: str, double_precision: bool):
        self.dim, self.audio_dim, self.cross_dim = dim, audio_dim, cross_dim
        self.heads, self.audio_heads = heads, audio_heads
        self.patch, self.patch_t, self.audio_patch_t = patch_size, patch_size_t, audio_patch_size_t
        self.max_pos, self.audio_max_pos = max_pos, audio_max_pos
        self.base_height, self.base_width = base_height, base_width
        self.scale_factors, self.audio_scale_factor = scale_factors, audio_scale_factor
        self.sampling_rate, self.hop_length = sampling_rate, hop_length
        self.theta, self.causal_offset, self.rope_type, self.double = theta, causal_offset, rope_type, double_precision

    def video_coords(self, batch: int, frames: int, height: int, width: int, device, fps: float = 24.0) -> torch.Tensor:
        """(B, 3, N, 2) pixel-space [start, end) per patch; the time axis in seconds."""
        axes = [torch.arange(0, n, step, dtype=torch.float32, device=device)
                for n, step in ((frames, self.patch_t), (height, self.patch), (width, self.patch))]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
        size = torch.tensor((self.patch_t, self.patch, self.patch), dtype=torch.float32, device=device)
        boxes = torch.stack([grid, grid + size.view(3, 1, 1, 1)], dim=-1).flatten(1, 3)
        pixels = boxes * torch.tensor(self.scale_factors, device=device).view(3, 1, 1)
        pixels[0] = (pixels[0] + self.causal_offset - self.scale_factors[0]).clamp(min=0) / fps
        return pixels.unsqueeze(0).repeat(batch, 1, 1, 1)

    def audio_coords(self, batch: int, frames: int, device, shift: int = 0) -> torch.Tensor:
        """(B, 1, N, 2) [start, end) in seconds per latent audio frame."""
        f = torch.arange(shift, frames + shift, self.audio_patch_t, dtype=torch.float32, device=device)
        s = self.audio_scale_factor

        def seconds(mel):
            return (mel + self.causal_offset - s).clip(min=0) * self.hop_length / self.sampling_rate

        boxes = torch.stack([seconds(f * s), seconds((f + self.audio_patch_t) * s)], dim=-1)
        return boxes[None, None].expand(batch, 1, -1, -1)

    def _table(self, coords: torch.Tensor, maxima: tuple, dim: int, heads: int) -> Rope:
        mid = coords.mean(dim=-1)  # (B, n_axes, N): box midpoints
        grid = torch.stack([mid[:, i] / maxima[i] for i in range(mid.shape[1])], dim=-1)
        return rope_tables(grid, dim, self.theta, heads, self.rope_type, self.double)

    def tables(self, video_coords: torch.Tensor, audio_coords: torch.Tensor) -> tuple[Rope, Rope, Rope, Rope]:
        cross_max = max(self.max_pos, self.audio_max_pos)
        return (self._table(video_coords, (self.max_pos, self.base_height, self.base_width), self.dim, self.heads),
                self._table(audio_coords, (self.audio_max_pos,), self.audio_dim, self.audio_heads),
                self._table(video_coords[:, :1], (cross_max,), self.cross_dim, self.heads),
                self._table(audio_coords[:, :1], (cross_max,), self.cross_dim, self.audio_heads))

    def for_request(self, batch: int, frames: int, height: int, width: int, audio_frames: int, fps: float,
                    device: Optional[torch.device] = None):
        """All tables for one request's latent sizes (they do not change between steps)."""
        return self.tables(self.video_coords(batch, frames, height, width, device, fps),
                           self.audio_coords(batch, audio_frames, device))
