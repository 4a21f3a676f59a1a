"""Anti-aliased activations of the LTX-2.3 vocoder (BigVGAN style), with diffusers' parameter names.

A periodic activation (Snake / SnakeBeta: ``x + sin(alpha x)^2 / beta``) creates harmonics above the Nyquist
rate; BigVGAN runs it at twice the rate: upsample with a low-pass filter, activate, low-pass and decimate.
The filters are deterministic functions of the ratio and kernel size; diffusers stores them as buffers
(``upsample.filter`` / ``downsample.filter``) which a checkpoint then supplies.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def kaiser_sinc(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """A windowed-sinc low-pass filter (Kaiser window, beta from the attenuation), normalised to sum 1."""
    half = kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, beta=beta, periodic=False)
    t = torch.arange(-half, half) + 0.5 if kernel_size % 2 == 0 else torch.arange(kernel_size) - half
    if cutoff == 0.0:
        return torch.zeros_like(t)
    t = 2 * cutoff * t
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(math.pi * t) / math.pi / t)
    taps = 2 * cutoff * window * sinc
    return taps / taps.sum()


class UpSample1d(nn.Module):
    """Zero-stuffing upsampling by ``ratio`` through a low-pass filter (Kaiser sinc, or the Hann-windowed
    sinc of the bandwidth extender's resampler), replicate-padded at both ends."""

    def __init__(self, ratio: int = 2, kernel_size: int | None = None, window_type: str = "kaiser",
                 persistent: bool = True):
        super().__init__()
        self.ratio, self.window_type = ratio, window_type
        if window_type == "hann":
            self.width = math.ceil(self.ZEROS / self.ROLLOFF)
            self.kernel_size = 2 * self.width * ratio + 1
            self.pad, self.pad_left, self.pad_right = self.width, 2 * self.width * ratio, self.kernel_size - ratio
        else:
            self.kernel_size = kernel_size if kernel_size is not None else int(6 * ratio // 2) * 2
            self.pad = self.kernel_size // ratio - 1
            self.pad_left = self.pad * ratio + (self.kernel_size - ratio) // 2
            self.pad_right = self.pad * ratio + (self.kernel_size - ratio + 1) // 2
        self.register_buffer("filter", self._taps(), persistent=persistent)

    ROLLOFF, ZEROS = 0.99, 6  # the Hann resampler's roll-off and zero crossings

    def _taps(self) -> torch.Tensor:
        if self.window_type == "hann":
            t = (torch.arange(self.kernel_size) / self.ratio - self.width) * self.ROLLOFF
            window = torch.cos(t.clamp(-self.ZEROS, self.ZEROS) * math.pi / self.ZEROS / 2) ** 2
            taps = torch.sinc(t) * window * self.ROLLOFF / self.ratio
        else:
            taps = kaiser_sinc(0.5 / self.ratio, 0.6 / self.ratio, self.kernel_size)
        return taps.view(1, 1, -1)

    def _init_buffers(self, device) -> None:
        """The loader's hook for buffers no checkpoint holds (the resampler's): recompute them."""
        with torch.device(device):
            self.filter = self._taps()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        taps = self.filter.to(x).expand(channels, -1, -1)
        x = self.ratio * F.conv_transpose1d(x, taps, stride=self.ratio, groups=channels)
        return x[..., self.pad_left:-self.pad_right]


class DownSample1d(nn.Module):
    """Low-pass (Kaiser sinc) and keep every ``ratio``-th sample."""

    def __init__(self, ratio: int = 2, kernel_size: int | None = None):
        super().__init__()
        self.ratio = ratio
        self.kernel_size = kernel_size or int(6 * ratio // 2) * 2
        self.pad_left = self.kernel_size // 2 + self.kernel_size % 2 - 1
        self.pad_right = self.kernel_size // 2
        self.register_buffer("filter", kaiser_sinc(0.5 / ratio, 0.6 / ratio, self.kernel_size).view(1, 1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        x = F.pad(x, (self.pad_left, self.pad_right), mode="replicate")
        return F.conv1d(x, self.filter.to(x).expand(channels, -1, -1), stride=self.ratio, groups=channels)


class SnakeBeta(nn.Module):
    """``x + sin(alpha x)^2 / (beta + eps)`` per channel; alpha, beta stored as logs (``logscale``).
    Without ``use_beta`` (plain Snake) alpha divides too."""

    def __init__(self, channels: int, use_beta: bool = True, eps: float = 1e-9):
        super().__init__()
        self.eps, self.use_beta = eps, use_beta
        self.alpha = nn.Parameter(torch.zeros(channels))
        if use_beta:
            self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.view(1, -1, 1).exp()
        amplitude = self.beta.view(1, -1, 1).exp() if self.use_beta else alpha
        return x + (1.0 / (amplitude + self.eps)) * torch.sin(x * alpha).pow(2)


class AntiAliasAct1d(nn.Module):
    """``act`` run at ``ratio`` times the sample rate: upsample, activate, downsample."""

    def __init__(self, act: nn.Module, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.upsample = UpSample1d(ratio, kernel_size)
        self.act = act
        self.downsample = DownSample1d(ratio, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))


def activation(act_fn: str, channels: int, antialias: bool, ratio: int, kernel_size: int, slope: float) -> nn.Module:
    """One vocoder activation: Snake(Beta) or leaky ReLU, anti-aliased when asked."""
    act = SnakeBeta(channels, use_beta=act_fn == "snakebeta") if act_fn in ("snake", "snakebeta") \
        else nn.LeakyReLU(slope)
    return AntiAliasAct1d(act, ratio, kernel_size) if antialias else act
