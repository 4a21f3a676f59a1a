"""LTX-2 audio VAE (diffusers' ``AutoencoderKLLTX2Audio``): stereo mel spectrograms <-> audio latents.

A 2-D conv autoencoder over (time, mel) images, causal along time (``causality_axis="height"``: convolutions
pad only the past), compressing both axes 4x: 8 latent channels x 16 mel bins per latent frame, 25 latent
frames per second at 16 kHz / hop 160. ``latents_mean`` / ``latents_std`` (buffers, one per packed feature
= channel x latent mel bin) normalise the packed latents the DiT sees.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.errors import ConfigError
from diffcore.models.base import DiagonalGaussianDistribution, ModelMixin

DOWNSAMPLE = 4  # latent compression along time and mel (diffusers' LATENT_DOWNSAMPLE_FACTOR)
_CAUSAL_PAD = {"none": lambda h, w: (w // 2, w - w // 2, h // 2, h - h // 2),
               "height": lambda h, w: (w // 2, w - w // 2, h, 0),
               "width": lambda h, w: (w, 0, h // 2, h - h // 2),
               "width-compatibility": lambda h, w: (w, 0, h // 2, h - h // 2)}


class CausalConv2d(nn.Module):
    """A conv padded asymmetrically along the causal axis (``conv`` holds the weights)."""

    def __init__(self, cin: int, cout: int, kernel: int, causality_axis: Optional[str]):
        super().__init__()
        self.padding = _CAUSAL_PAD[causality_axis](kernel - 1, kernel - 1) if causality_axis else None
        self.conv = nn.Conv2d(cin, cout, kernel, padding=0 if causality_axis else kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding) if self.padding else x)


def _conv(cin: int, cout: int, kernel: int, causality_axis: Optional[str]) -> nn.Module:
    return CausalConv2d(cin, cout, kernel, causality_axis) if causality_axis else nn.Conv2d(cin, cout, kernel, padding=kernel // 2)


def _norm(channels: int, norm_type: str) -> nn.Module:
    if norm_type == "group":
        return nn.GroupNorm(32, channels, eps=1e-6)
    if norm_type == "pixel":
        return PixelNorm()
    raise ConfigError(f"AutoencoderKLLTX2Audio: norm_type must be 'group' or 'pixel', got {norm_type!r}")


class PixelNorm(nn.Module):
    """RMS over channels at every (time, mel) location."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, norm_type: str, causality_axis: Optional[str]):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, norm_type), _conv(cin, cout, 3, causality_axis)
        self.norm2, self.conv2 = _norm(cout, norm_type), _conv(cout, cout, 3, causality_axis)
        if cin != cout:
            self.nin_shortcut = _conv(cin, cout, 1, causality_axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all (time, mel) positions, 1x1 conv projections."""

    def __init__(self, channels: int, norm_type: str):
        super().__init__()
        self.norm = _norm(channels, norm_type)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    _PAD = {"none": (0, 1, 0, 1), "width": (2, 0, 0, 1), "height": (0, 1, 2, 0), "width-compatibility": (1, 0, 0, 1)}

    def __init__(self, channels: int, causality_axis: Optional[str]):
        super().__init__()
        self.pad = self._PAD[causality_axis or "none"]
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


class Upsample(nn.Module):
    def __init__(self, channels: int, causality_axis: Optional[str]):
        super().__init__()
        self.axis = causality_axis
        self.conv = _conv(channels, channels, 3, causality_axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        if self.axis == "height":  # drop the first (padding-only) row: causal upsampling keeps 2n - 1
            return x[:, :, 1:]
        return x[:, :, :, 1:] if self.axis == "width" else x


def _stage(blocks: list, attn: list) -> nn.Module:
    stage = nn.Module()
    stage.block, stage.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    return stage


def _mid(channels: int, norm_type: str, axis: Optional[str], attention: bool) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, norm_type, axis)
    mid.attn_1 = AttnBlock(channels, norm_type) if attention else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, norm_type, axis)
    return mid


def _run_stage(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(stage.block):
        x = block(x)
        if len(stage.attn):
            x = stage.attn[i](x)
    return x


class Encoder(nn.Module):
    def __init__(self, base: int, ch_mult, num_res_blocks: int, attn_resolutions, in_channels: int, resolution: int,
                 latent_channels: int, norm_type: str, axis: Optional[str], mid_attention: bool, double_z: bool):
        super().__init__()
        self.conv_in = _conv(in_channels, base, 3, axis)
        self.down, block_in, res = nn.ModuleList(), base, resolution
        for level, mult in enumerate(ch_mult):
            blocks, attn = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, base * mult, norm_type, axis))
                block_in = base * mult
                if attn_resolutions and res in attn_resolutions:
                    attn.append(AttnBlock(block_in, norm_type))
            stage = _stage(blocks, attn)
            if level != len(ch_mult) - 1:
                stage.downsample, res = Downsample(block_in, axis), res // 2
            self.down.append(stage)
        self.mid = _mid(block_in, norm_type, axis, mid_attention)
        self.norm_out = _norm(block_in, norm_type)
        self.conv_out = _conv(block_in, 2 * latent_channels if double_z else latent_channels, 3, axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in self.down:
            x = _run_stage(stage, x)
            if hasattr(stage, "downsample"):
                x = stage.downsample(x)
        x = self.mid.block_2(self.mid.attn_1(self.mid.block_1(x)))
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, base: int, ch_mult, num_res_blocks: int, attn_resolutions, out_channels: int, resolution: int,
                 latent_channels: int, norm_type: str, axis: Optional[str], mid_attention: bool, mel_bins):
        super().__init__()
        self.axis, self.out_channels, self.mel_bins = axis, out_channels, mel_bins
        block_in = base * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = _conv(latent_channels, block_in, 3, axis)
        self.mid = _mid(block_in, norm_type, axis, mid_attention)
        self.up = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            blocks, attn = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, base * ch_mult[level], norm_type, axis))
                block_in = base * ch_mult[level]
                if attn_resolutions and res in attn_resolutions:
                    attn.append(AttnBlock(block_in, norm_type))
            stage = _stage(blocks, attn)
            if level != 0:
                stage.upsample, res = Upsample(block_in, axis), res * 2
            self.up.insert(0, stage)
        self.norm_out = _norm(block_in, norm_type)
        self.conv_out = _conv(block_in, out_channels, 3, axis)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        frames, mel = z.shape[2], z.shape[3]
        target_t = max(frames * DOWNSAMPLE - (DOWNSAMPLE - 1), 1) if self.axis is not None else frames * DOWNSAMPLE
        target_f = self.mel_bins if self.mel_bins is not None else mel
        x = self.conv_in(z)
        x = self.mid.block_2(self.mid.attn_1(self.mid.block_1(x)))
        for level in reversed(range(len(self.up))):
            x = _run_stage(self.up[level], x)
            if hasattr(self.up[level], "upsample"):
                x = self.up[level].upsample(x)
        x = self.conv_out(F.silu(self.norm_out(x)))[:, :self.out_channels, :target_t, :target_f]
        pad_t, pad_f = target_t - x.shape[2], target_f - x.shape[3]
        return F.pad(x, (0, max(pad_f, 0), 0, max(pad_t, 0))) if pad_t > 0 or pad_f > 0 else x


class AutoencoderKLLTX2Audio(ModelMixin):
    diffusers_class_name = "AutoencoderKLLTX2Audio"

    def __init__(self, base_channels: int = 128, output_channels: int = 2, ch_mult: tuple = (1, 2, 4),
                 num_res_blocks: int = 2, attn_resolutions: Optional[tuple] = None, in_channels: int = 2,
                 resolution: int = 256, latent_channels: int = 8, norm_type: str = "pixel",
                 causality_axis: Optional[str] = "height", dropout: float = 0.0, mid_block_add_attention: bool = False,
                 sample_rate: int = 16000, mel_hop_length: int = 160, is_causal: bool = True,
                 mel_bins: Optional[int] = 64, double_z: bool = True):
        super().__init__()
        if causality_axis not in _CAUSAL_PAD:
            raise ConfigError(f"AutoencoderKLLTX2Audio: causality_axis must be one of {sorted(_CAUSAL_PAD)}, "
                              f"got {causality_axis!r}")
        attn = set(attn_resolutions) if attn_resolutions else None
        self.encoder = Encoder(base_channels, ch_mult, num_res_blocks, attn, in_channels, resolution, latent_channels,
                               norm_type, causality_axis, mid_block_add_attention, double_z)
        self.decoder = Decoder(base_channels, ch_mult, num_res_blocks, attn, output_channels, resolution,
                               latent_channels, norm_type, causality_axis, mid_block_add_attention, mel_bins)
        # sized by base_channels as in diffusers (128 = 8 latent channels x 16 latent mel bins in LTX-2)
        self.register_buffer("latents_mean", torch.zeros(base_channels))
        self.register_buffer("latents_std", torch.ones(base_channels))
        self.temporal_compression_ratio = self.mel_compression_ratio = DOWNSAMPLE
        self.sample_rate, self.mel_hop_length, self.latent_channels, self.mel_bins = (
            sample_rate, mel_hop_length, latent_channels, mel_bins)

    def encode(self, mel: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.encoder(mel))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, frames, mel / 4) -> mel spectrogram (B, 2, 4 * frames - 3, mel_bins)."""
        return self.decoder(z)
