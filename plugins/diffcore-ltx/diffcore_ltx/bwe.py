"""LTX-2.3's vocoder with bandwidth extension (diffusers' ``LTX2VocoderWithBWE``): mel -> 48 kHz waveform.

Why two vocoders: the audio VAE's mel spectrogram is 16 kHz audio; a first vocoder renders it at 16 kHz, a
causal log-mel spectrogram of that waveform (hop 80: twice the frame rate) feeds the bandwidth extender, a
second vocoder that predicts only the missing high band as a residual on top of the 16 kHz waveform
resampled to 48 kHz. The STFT bases and mel filterbank are buffers the checkpoint supplies (zeros until
loaded, as in diffusers); the resampler's filter is computed (not stored).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.errors import ConfigError
from diffcore.models.base import ModelMixin

from .antialias import UpSample1d
from .vocoder import LTX2Vocoder

_SHARED = ("in_channels", "hidden_channels", "out_channels", "upsample_kernel_sizes", "upsample_factors",
           "resnet_kernel_sizes", "resnet_dilations", "act_fn", "leaky_relu_negative_slope", "antialias",
           "antialias_ratio", "antialias_kernel_size", "final_act_fn", "final_bias")


class CausalSTFT(nn.Module):
    """Magnitude of a left-padded (causal) STFT through the stored windowed-DFT basis."""

    def __init__(self, filter_length: int, hop_length: int, window_length: int):
        super().__init__()
        self.hop_length, self.window_length = hop_length, window_length
        n_freqs = filter_length // 2 + 1
        self.register_buffer("forward_basis", torch.zeros(n_freqs * 2, 1, filter_length))
        self.register_buffer("inverse_basis", torch.zeros(n_freqs * 2, 1, filter_length))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = F.pad(waveform.unsqueeze(1), (max(0, self.window_length - self.hop_length), 0))
        spec = F.conv1d(x, self.forward_basis, stride=self.hop_length)
        real, imag = spec.chunk(2, dim=1)
        return torch.sqrt(real ** 2 + imag ** 2)


class MelSTFT(nn.Module):
    def __init__(self, filter_length: int, hop_length: int, window_length: int, num_mel_channels: int):
        super().__init__()
        self.stft_fn = CausalSTFT(filter_length, hop_length, window_length)
        self.register_buffer("mel_basis", torch.zeros(num_mel_channels, filter_length // 2 + 1))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """(N, samples) -> log-mel (N, mel, frames)."""
        magnitude = self.stft_fn(waveform)
        return torch.log(torch.clamp(torch.matmul(self.mel_basis.to(magnitude.dtype), magnitude), min=1e-5))


class LTX2VocoderWithBWE(ModelMixin):
    diffusers_class_name = "LTX2VocoderWithBWE"

    def __init__(self, in_channels: int = 128, hidden_channels: int = 1536, out_channels: int = 2,
                 upsample_kernel_sizes: tuple = (11, 4, 4, 4, 4, 4), upsample_factors: tuple = (5, 2, 2, 2, 2, 2),
                 resnet_kernel_sizes: tuple = (3, 7, 11), resnet_dilations: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
                 act_fn: str = "snakebeta", leaky_relu_negative_slope: float = 0.1, antialias: bool = True,
                 antialias_ratio: int = 2, antialias_kernel_size: int = 12, final_act_fn: Optional[str] = None, final_bias: bool = False,
                 bwe_in_channels: int = 128, bwe_hidden_channels: int = 512, bwe_out_channels: int = 2,
                 bwe_upsample_kernel_sizes: tuple = (12, 11, 4, 4, 4), bwe_upsample_factors: tuple = (6, 5, 2, 2, 2),
                 bwe_resnet_kernel_sizes: tuple = (3, 7, 11),
                 bwe_resnet_dilations: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5)), bwe_act_fn: str = "snakebeta",
                 bwe_leaky_relu_negative_slope: float = 0.1, bwe_antialias: bool = True, bwe_antialias_ratio: int = 2,
                 bwe_antialias_kernel_size: int = 12, bwe_final_act_fn: Optional[str] = None, bwe_final_bias: bool = False,
                 filter_length: int = 512, hop_length: int = 80, window_length: int = 512, num_mel_channels: int = 64,
                 input_sampling_rate: int = 16000, output_sampling_rate: int = 48000):
        super().__init__()
        if output_sampling_rate % input_sampling_rate:
            raise ConfigError(f"LTX2VocoderWithBWE: output_sampling_rate {output_sampling_rate} must be a multiple of "
                              f"input_sampling_rate {input_sampling_rate} (the resampler upsamples by an integer)")
        args = locals()
        self.vocoder = LTX2Vocoder(**{k: args[k] for k in _SHARED}, output_sampling_rate=input_sampling_rate)
        self.bwe_generator = LTX2Vocoder(**{k: args["bwe_" + k] for k in _SHARED},
                                         output_sampling_rate=output_sampling_rate)
        self.mel_stft = MelSTFT(filter_length, hop_length, window_length, num_mel_channels)
        self.resampler = UpSample1d(output_sampling_rate // input_sampling_rate, window_type="hann", persistent=False)
        self.hop_length = hop_length
        self.input_sampling_rate, self.output_sampling_rate = input_sampling_rate, output_sampling_rate

    def forward(self, mel_spec: torch.Tensor) -> torch.Tensor:
        """Mel (B, C, T, mel) -> waveform (B, C, T * upsampling * output / input rate) in [-1, 1]."""
        x = self.vocoder(mel_spec)
        b, channels, samples = x.shape
        if samples % self.hop_length:  # whole STFT frames
            x = F.pad(x, (0, self.hop_length - samples % self.hop_length))
        mel = self.mel_stft(x.flatten(0, 1)).unflatten(0, (b, channels))  # (B, C, mel, frames)
        residual = self.bwe_generator(mel, time_last=True)
        wave = torch.clamp(residual + self.resampler(x), -1, 1)
        return wave[..., :samples * self.output_sampling_rate // self.input_sampling_rate]
