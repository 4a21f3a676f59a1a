"""LTX-2 video VAE (diffusers' ``AutoencoderKLLTX2Video``, same parameter names and numerics).

Pixels are patchified 4x4 into channels, then 3-D conv blocks with per-channel RMS norms compress space
32x and time 8x into 128 latent channels; the first frame is coded alone (causal time padding repeats it),
so F = 8k + 1 frames give k + 1 latent frames. Down/up-sampling is space-/time-to-depth with a
parameter-free residual (averaged or repeated channels). ``latents_mean`` / ``latents_std`` are buffers the
pipeline uses to (de)normalise latents. Timestep-conditioned decoding (``timestep_conditioning``, off in all
released LTX-2 VAEs) and decoder noise injection are not implemented (ConfigError).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.errors import ConfigError
from diffcore.models.base import DiagonalGaussianDistribution, ModelMixin


def _channel_rms(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


def _triple(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


class CausalConv3d(nn.Module):
    """3-D conv; time is padded by repeating edge frames (first only when causal), space by ``padding_mode``."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride=1, padding_mode: str = "zeros"):
        super().__init__()
        self.kernel_t = kernel
        self.conv = nn.Conv3d(cin, cout, kernel, stride=_triple(stride), padding=(0, kernel // 2, kernel // 2),
                              padding_mode=padding_mode)

    def forward(self, x: torch.Tensor, causal: bool = True) -> torch.Tensor:
        k = self.kernel_t - 1
        if causal:
            x = torch.cat([x[:, :, :1].repeat(1, 1, k, 1, 1), x], dim=2)
        else:
            x = torch.cat([x[:, :, :1].repeat(1, 1, k // 2, 1, 1), x, x[:, :, -1:].repeat(1, 1, k // 2, 1, 1)], dim=2)
        return self.conv(x)


class ResnetBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int, eps: float, padding_mode: str):
        super().__init__()
        self.conv1 = CausalConv3d(cin, cout, padding_mode=padding_mode)
        self.conv2 = CausalConv3d(cout, cout, padding_mode=padding_mode)
        self.norm3 = self.conv_shortcut = None
        if cin != cout:
            self.norm3 = nn.LayerNorm(cin, eps=eps)
            self.conv_shortcut = nn.Conv3d(cin, cout, 1)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        h = self.conv1(F.silu(_channel_rms(x)), causal)
        h = self.conv2(F.silu(_channel_rms(h)), causal)
        if self.norm3 is not None:
            x = self.conv_shortcut(self.norm3(x.movedim(1, -1)).movedim(-1, 1))
        return h + x


def _to_depth(x: torch.Tensor, stride: tuple) -> torch.Tensor:
    """(B, C, F*s0, H*s1, W*s2) -> (B, C*s0*s1*s2, F, H, W), diffusers' channel order."""
    x = x.unflatten(4, (-1, stride[2])).unflatten(3, (-1, stride[1])).unflatten(2, (-1, stride[0]))
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).flatten(1, 4)


def _from_depth(x: torch.Tensor, stride: tuple) -> torch.Tensor:
    """(B, C*s0*s1*s2, F, H, W) -> (B, C, F*s0, H*s1, W*s2)."""
    b, _, f, h, w = x.shape
    x = x.reshape(b, -1, *stride, f, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).flatten(6, 7).flatten(4, 5).flatten(2, 3)


class Downsampler3d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: tuple, padding_mode: str):
        super().__init__()
        self.stride = stride
        n = stride[0] * stride[1] * stride[2]
        self.group_size = cin * n // cout
        self.conv = CausalConv3d(cin, cout // n, padding_mode=padding_mode)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = torch.cat([x[:, :, :self.stride[0] - 1], x], dim=2)
        residual = _to_depth(x, self.stride).unflatten(1, (-1, self.group_size)).mean(dim=2)
        return _to_depth(self.conv(x, causal), self.stride) + residual


class Upsampler3d(nn.Module):
    def __init__(self, cin: int, stride: tuple, residual: bool, upscale_factor: int, padding_mode: str):
        super().__init__()
        self.stride, self.residual, self.upscale_factor = stride, residual, upscale_factor
        self.conv = CausalConv3d(cin, cin * stride[0] * stride[1] * stride[2] // upscale_factor,
                                 padding_mode=padding_mode)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        drop = self.stride[0] - 1
        out = _from_depth(self.conv(x, causal), self.stride)[:, :, drop:]
        if self.residual:
            repeats = self.stride[0] * self.stride[1] * self.stride[2] // self.upscale_factor
            out = out + _from_depth(x, self.stride).repeat(1, repeats, 1, 1, 1)[:, :, drop:]
        return out


_STRIDES = {"spatial": (1, 2, 2), "temporal": (2, 1, 1), "spatiotemporal": (2, 2, 2)}


class DownBlock3D(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, eps: float, scale: bool, kind: str, padding_mode: str):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock3d(cin, cin, eps, padding_mode) for _ in range(layers))
        self.downsamplers = None
        if scale:
            down = (CausalConv3d(cin, cin, stride=2, padding_mode=padding_mode) if kind == "conv"
                    else Downsampler3d(cin, cout, _STRIDES[kind], padding_mode))
            self.downsamplers = nn.ModuleList([down])

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, causal)
        for down in self.downsamplers or ():
            x = down(x, causal)
        return x


class MidBlock3d(nn.Module):
    def __init__(self, channels: int, layers: int, eps: float, padding_mode: str):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock3d(channels, channels, eps, padding_mode) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, causal)
        return x


class UpBlock3d(MidBlock3d):
    def __init__(self, cin: int, cout: int, layers: int, eps: float, scale: bool, kind: str, residual: bool,
                 factor: int, padding_mode: str):
        super().__init__(cout, layers, eps, padding_mode)
        self.conv_in = ResnetBlock3d(cin, cout, eps, padding_mode) if cin != cout else None
        self.upsamplers = None
        if scale:
            self.upsamplers = nn.ModuleList([Upsampler3d(cout * factor, _STRIDES[kind], residual, factor, padding_mode)])

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        if self.conv_in is not None:
            x = self.conv_in(x, causal)
        for up in self.upsamplers or ():
            x = up(x, causal)
        return super().forward(x, causal)


def _per_block(value, n: int) -> tuple:
    return (value,) * n if isinstance(value, bool) else tuple(value)


class Encoder3d(nn.Module):
    def __init__(self, in_channels, latent_channels, block_out, layers, scaling, down_types, patch, patch_t, eps,
                 causal, padding_mode):
        super().__init__()
        self.patch, self.patch_t, self.is_causal = patch, patch_t, causal
        self.conv_in = CausalConv3d(in_channels * patch ** 2, latent_channels, padding_mode=padding_mode)
        channels, self.down_blocks = latent_channels, nn.ModuleList()
        for i, out in enumerate(block_out):
            self.down_blocks.append(DownBlock3D(channels, out, layers[i], eps, scaling[i], down_types[i], padding_mode))
            channels = out
        self.mid_block = MidBlock3d(channels, layers[-1], eps, padding_mode)
        self.conv_out = CausalConv3d(channels, latent_channels + 1, padding_mode=padding_mode)

    def forward(self, x: torch.Tensor, causal: Optional[bool] = None) -> torch.Tensor:
        causal = causal or self.is_causal
        b, c, f, h, w = x.shape
        p, pt = self.patch, self.patch_t
        x = x.reshape(b, c, f // pt, pt, h // p, p, w // p, p).permute(0, 1, 3, 7, 5, 2, 4, 6).flatten(1, 4)
        x = self.conv_in(x, causal)
        for block in self.down_blocks:
            x = block(x, causal)
        x = self.conv_out(F.silu(_channel_rms(self.mid_block(x, causal))), causal)
        return torch.cat([x, x[:, -1:].repeat(1, x.shape[1] - 2, 1, 1, 1)], dim=1)  # mean, one shared logvar


class Decoder3d(nn.Module):
    def __init__(self, latent_channels, out_channels, block_out, layers, scaling, up_types, patch, patch_t, eps,
                 causal, residual, factors, padding_mode):
        super().__init__()
        self.patch, self.patch_t, self.is_causal = patch, patch_t, causal
        block_out, scaling, layers = block_out[::-1], scaling[::-1], layers[::-1]
        residual, factors = residual[::-1], factors[::-1]
        channels = block_out[0]
        self.conv_in = CausalConv3d(latent_channels, channels, padding_mode=padding_mode)
        self.mid_block = MidBlock3d(channels, layers[0], eps, padding_mode)
        self.up_blocks = nn.ModuleList()
        for i, out in enumerate(block_out):
            cin, channels = channels // factors[i], out // factors[i]
            self.up_blocks.append(UpBlock3d(cin, channels, layers[i + 1], eps, scaling[i], up_types[i], residual[i],
                                            factors[i], padding_mode))
        self.conv_out = CausalConv3d(channels, out_channels * patch ** 2, padding_mode=padding_mode)

    def forward(self, z: torch.Tensor, causal: Optional[bool] = None) -> torch.Tensor:
        causal = causal or self.is_causal
        x = self.mid_block(self.conv_in(z, causal), causal)
        for block in self.up_blocks:
            x = block(x, causal)
        x = self.conv_out(F.silu(_channel_rms(x)), causal)
        p, pt = self.patch, self.patch_t
        b, _, f, h, w = x.shape
        x = x.reshape(b, -1, pt, p, p, f, h, w)
        return x.permute(0, 1, 5, 2, 6, 4, 7, 3).flatten(6, 7).flatten(4, 5).flatten(2, 3)


class AutoencoderKLLTX2Video(ModelMixin):
    diffusers_class_name = "AutoencoderKLLTX2Video"

    def __init__(self, in_channels: int = 3, out_channels: int = 3, latent_channels: int = 128,
                 block_out_channels: tuple = (256, 512, 1024, 2048), down_block_types: tuple = ("LTX2VideoDownBlock3D",) * 4,
                 decoder_block_out_channels: tuple = (256, 512, 1024), layers_per_block: tuple = (4, 6, 6, 2, 2),
                 decoder_layers_per_block: tuple = (5, 5, 5, 5), spatio_temporal_scaling=(True, True, True, True),
                 decoder_spatio_temporal_scaling=(True, True, True), decoder_inject_noise=(False, False, False, False),
                 downsample_type: tuple = ("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
                 upsample_type: tuple = ("spatiotemporal", "spatiotemporal", "spatiotemporal"),
                 upsample_residual=(True, True, True), upsample_factor: tuple = (2, 2, 2),
                 timestep_conditioning: bool = False, patch_size: int = 4, patch_size_t: int = 1,
                 resnet_norm_eps: float = 1e-6, scaling_factor: float = 1.0, encoder_causal: bool = True,
                 decoder_causal: bool = True, encoder_spatial_padding_mode: str = "zeros",
                 decoder_spatial_padding_mode: str = "reflect", spatial_compression_ratio: Optional[int] = None,
                 temporal_compression_ratio: Optional[int] = None):
        super().__init__()
        n_dec = len(decoder_layers_per_block)
        if timestep_conditioning or any(_per_block(decoder_inject_noise, n_dec)):
            raise ConfigError("AutoencoderKLLTX2Video: timestep_conditioning / decoder_inject_noise (not used by the "
                              "released LTX-2 VAEs) are not supported")
        if any(t != "LTX2VideoDownBlock3D" for t in down_block_types):
            raise ConfigError(f"AutoencoderKLLTX2Video: unknown down_block_types {down_block_types}")
        scaling = _per_block(spatio_temporal_scaling, len(layers_per_block) - 1)
        self.encoder = Encoder3d(in_channels, latent_channels, block_out_channels, layers_per_block, scaling,
                                 downsample_type, patch_size, patch_size_t, resnet_norm_eps, encoder_causal,
                                 encoder_spatial_padding_mode)
        self.decoder = Decoder3d(latent_channels, out_channels, decoder_block_out_channels, decoder_layers_per_block,
                                 _per_block(decoder_spatio_temporal_scaling, n_dec - 1), upsample_type, patch_size,
                                 patch_size_t, resnet_norm_eps, decoder_causal, _per_block(upsample_residual, n_dec - 1),
                                 tuple(upsample_factor), decoder_spatial_padding_mode)
        self.register_buffer("latents_mean", torch.zeros(latent_channels))
        self.register_buffer("latents_std", torch.ones(latent_channels))
        self.scaling_factor = scaling_factor
        self.spatial_compression_ratio = spatial_compression_ratio or patch_size * 2 ** sum(scaling)
        self.temporal_compression_ratio = temporal_compression_ratio or patch_size_t * 2 ** sum(scaling)

    def encode(self, x: torch.Tensor, causal: Optional[bool] = None) -> DiagonalGaussianDistribution:
        """Video (B, 3, 8k + 1, H, W) in [-1, 1] -> the latent posterior (B, 128, k + 1, H / 32, W / 32)."""
        return DiagonalGaussianDistribution(self.encoder(x, causal))

    def decode(self, z: torch.Tensor, causal: Optional[bool] = None) -> torch.Tensor:
        """Latents -> video (B, 3, 8k + 1, H, W) in about [-1, 1]."""
        return self.decoder(z, causal)
