"""LTX-2 vocoders (diffusers' ``LTX2Vocoder`` and ``LTX2VocoderWithBWE``, classes local to its LTX-2 pipelines).

``LTX2Vocoder`` is HiFi-GAN style: the stereo mel spectrogram (B, 2, T, 64) is flattened to 128 input
channels, then transposed convolutions upsample time by prod(upsample_factors) (240 in LTX-2.0: 16 kHz /
hop 160 -> 24 kHz output) with, after each, the mean of a few dilated residual stacks. LTX-2.0 uses leaky
ReLUs and tanh; LTX-2.3's stages use anti-aliased SnakeBeta activations (BigVGAN, ``antialias.py``) and no
final squashing. ``LTX2VocoderWithBWE`` (LTX-2.3): a 16 kHz vocoder, the causal log-mel spectrogram of its
output, a second vocoder (the bandwidth extender) predicting a residual at 48 kHz, added to the 16 kHz
waveform resampled x3 by a Hann-windowed sinc, clamped to [-1, 1].
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.errors import ConfigError
from diffcore.models.base import ModelMixin

from .antialias import AntiAliasAct1d, SnakeBeta, UpSample1d, activation

_ACTS = ("leaky_relu", "snake", "snakebeta")


class ResBlock(nn.Module):
    """Dilated conv pairs with an activation before each conv, residual after each pair."""

    def __init__(self, channels: int, kernel: int, dilations, act_fn: str, slope: float, antialias: bool,
                 ratio: int, aa_kernel: int):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, dilation=d, padding="same") for d in dilations)
        self.acts1 = nn.ModuleList(activation(act_fn, channels, antialias, ratio, aa_kernel, slope) for _ in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, padding="same") for _ in dilations)
        self.acts2 = nn.ModuleList(activation(act_fn, channels, antialias, ratio, aa_kernel, slope) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for a1, c1, a2, c2 in zip(self.acts1, self.convs1, self.acts2, self.convs2):
            x = x + c2(a2(c1(a1(x))))
        return x


class LTX2Vocoder(ModelMixin):
    diffusers_class_name = "LTX2Vocoder"

    def __init__(self, in_channels: int = 128, hidden_channels: int = 1024, out_channels: int = 2,
                 upsample_kernel_sizes: tuple = (16, 15, 8, 4, 4), upsample_factors: tuple = (6, 5, 2, 2, 2),
                 resnet_kernel_sizes: tuple = (3, 7, 11), resnet_dilations: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
                 act_fn: str = "leaky_relu", leaky_relu_negative_slope: float = 0.1, antialias: bool = False,
                 antialias_ratio: int = 2, antialias_kernel_size: int = 12, final_act_fn: Optional[str] = "tanh",
                 final_bias: bool = True, output_sampling_rate: int = 24000):
        super().__init__()
        if act_fn not in _ACTS:
            raise ConfigError(f"LTX2Vocoder: act_fn must be one of {_ACTS}, got {act_fn!r}")
        if act_fn == "leaky_relu" and antialias:
            raise ConfigError("LTX2Vocoder: anti-aliased leaky ReLUs are in no LTX-2 checkpoint (LTX-2.0 uses plain "
                              "leaky ReLUs, LTX-2.3 anti-aliased SnakeBeta); set antialias false or act_fn 'snakebeta'")
        if len(upsample_kernel_sizes) != len(upsample_factors) or len(resnet_kernel_sizes) != len(resnet_dilations):
            raise ConfigError("LTX2Vocoder: upsample_kernel_sizes / upsample_factors and resnet_kernel_sizes / "
                              "resnet_dilations must have equal lengths")
        self.slope, self.final_act_fn, self.leaky = leaky_relu_negative_slope, final_act_fn, act_fn == "leaky_relu"
        self.per_upsample = len(resnet_kernel_sizes)
        self.total_upsample_factor = math.prod(upsample_factors)
        self.output_sampling_rate = output_sampling_rate
        self.conv_in = nn.Conv1d(in_channels, hidden_channels, 7, padding=3)
        self.upsamplers, self.resnets = nn.ModuleList(), nn.ModuleList()
        channels = hidden_channels
        for stride, kernel in zip(upsample_factors, upsample_kernel_sizes):
            self.upsamplers.append(nn.ConvTranspose1d(channels, channels // 2, kernel, stride=stride,
                                                      padding=(kernel - stride) // 2))
            channels //= 2
            for k, dilations in zip(resnet_kernel_sizes, resnet_dilations):
                self.resnets.append(ResBlock(channels, k, dilations, act_fn, leaky_relu_negative_slope, antialias,
                                             antialias_ratio, antialias_kernel_size))
        # the leaky-ReLU output activation keeps torch's default slope (0.01), as diffusers (and the original)
        self.act_out = nn.LeakyReLU() if self.leaky else \
            AntiAliasAct1d(SnakeBeta(channels, use_beta=True), antialias_ratio, antialias_kernel_size)
        self.conv_out = nn.Conv1d(channels, out_channels, 7, padding=3, bias=final_bias)

    def forward(self, hidden_states: torch.Tensor, time_last: bool = False) -> torch.Tensor:
        """Mel (B, C, T, mel) (or (B, C, mel, T) with ``time_last``) -> waveform (B, out_channels, samples)."""
        x = hidden_states if time_last else hidden_states.transpose(2, 3)
        x = self.conv_in(x.flatten(1, 2))
        n = self.per_upsample
        for i, up in enumerate(self.upsamplers):
            x = up(F.leaky_relu(x, self.slope) if self.leaky else x)  # Snake activations sit inside the stacks
            x = torch.stack([self.resnets[j](x) for j in range(i * n, (i + 1) * n)]).mean(dim=0)
        x = self.conv_out(self.act_out(x))
        if self.final_act_fn == "tanh":
            return torch.tanh(x)
        return x.clamp(-1, 1) if self.final_act_fn == "clamp" else x
