"""FLUX.2's VAE (``AutoencoderKLFlux2``): the core 2-D KL autoencoder, 32 latent channels, plus the latent
normalisation FLUX.2 keeps in a BatchNorm's running statistics over 2x2-patchified latents.

Why a subclass: the encoder/decoder are diffusers' ``Encoder`` / ``Decoder`` (as for FLUX.1), but the
latent statistics are buffers (``bn.running_mean`` / ``bn.running_var``, 4 x latent_channels), not config
scalars, and normalisation happens after the 2x2 patchify (channel ``c*4 + dy*2 + dx``), so the pipeline
asks the VAE for ``normalize`` / ``denormalize`` of patchified latents instead of reading a config.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from diffcore.models.autoencoder_kl import AutoencoderKL, Decoder


def patchify(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), channel order ``c*4 + dy*2 + dx`` (diffusers' ``_patchify_latents``)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    b, c, h, w = z.shape
    return z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


class AutoencoderKLFlux2(AutoencoderKL):
    """State-dict keys equal diffusers' ``AutoencoderKLFlux2`` (encoder, decoder, quant convs, ``bn``)."""

    diffusers_class_name = "AutoencoderKLFlux2"

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 down_block_types: Sequence[str] = ("DownEncoderBlock2D",) * 4,
                 up_block_types: Sequence[str] = ("UpDecoderBlock2D",) * 4,
                 block_out_channels: Sequence[int] = (128, 256, 512, 512),
                 decoder_block_out_channels: Optional[Sequence[int]] = None, layers_per_block: int = 2,
                 act_fn: str = "silu", latent_channels: int = 32, norm_num_groups: int = 32, sample_size: int = 1024,
                 force_upcast: bool = True, use_quant_conv: bool = True, use_post_quant_conv: bool = True,
                 mid_block_add_attention: bool = True, batch_norm_eps: float = 1e-4, batch_norm_momentum: float = 0.1,
                 patch_size: Sequence[int] = (2, 2)):
        super().__init__(in_channels=in_channels, out_channels=out_channels, down_block_types=down_block_types,
                         up_block_types=up_block_types, block_out_channels=block_out_channels,
                         layers_per_block=layers_per_block, act_fn=act_fn, latent_channels=latent_channels,
                         norm_num_groups=norm_num_groups, sample_size=sample_size, scaling_factor=1.0,
                         force_upcast=force_upcast, use_quant_conv=use_quant_conv,
                         use_post_quant_conv=use_post_quant_conv, mid_block_add_attention=mid_block_add_attention)
        if tuple(patch_size) != (2, 2):
            raise ValueError(f"AutoencoderKLFlux2 supports patch_size (2, 2), got {tuple(patch_size)}")
        if decoder_block_out_channels and tuple(decoder_block_out_channels) != tuple(block_out_channels):
            if len(decoder_block_out_channels) != len(up_block_types):
                raise ValueError("decoder_block_out_channels needs one entry per up block")
            self.decoder = Decoder(latent_channels, out_channels, decoder_block_out_channels, layers_per_block,
                                   norm_num_groups, act_fn, mid_block_add_attention)
        self.batch_norm_eps = batch_norm_eps
        self.bn = nn.BatchNorm2d(math.prod(patch_size) * latent_channels, eps=batch_norm_eps,
                                 momentum=batch_norm_momentum, affine=False, track_running_stats=True)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, C, H, W) -> diffusion latents: patchified, then ``(z - mean) / std``."""
        z = patchify(z)
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion latents (B, 4C, h, w) -> VAE latents (B, C, 2h, 2w)."""
        mean, std = self._stats(z)
        return unpatchify(z * std + mean)
